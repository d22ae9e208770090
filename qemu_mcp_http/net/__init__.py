"""A VM's networking: port forwards and the host ports they bind."""
