"""Metrics of running VMs: pure parsers and the sampler."""
