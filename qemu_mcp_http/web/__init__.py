"""What people open in a browser: the web console."""
