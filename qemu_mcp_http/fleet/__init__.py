"""What one server shares across hosts, calls and replicas: targets, change feed, bus, shutdown."""
