"""Kernels on other hosts through a Jupyter gateway: launcher, placement, doctor."""
