"""Inside a guest: its agent's commands and files, readiness, the cloud-init seed."""
