"""Monitoring of running VMs: pure parsers of QMP and /proc outputs, the sampler and its schedule."""
