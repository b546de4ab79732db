"""Ops the model calls: PyTorch reference twins now; Triton kernels are chosen here per backend."""
