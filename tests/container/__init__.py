"""Helpers of the container test (tests/test_container.py): podman, the base image, the build inputs."""
