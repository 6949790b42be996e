"""Triton kernels and their launchers (shipped as hybridfast.kernels). No nn.Module, no autograd."""
