"""A VM's disks: images, chains, resizing, snapshots."""
