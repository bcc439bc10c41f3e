"""Triton kernels of fastdistill, installed as ``fastdistill.kernels``: only @triton.jit code lives here; launchers,
autograd and backend choice are in ``fastdistill.ops``."""
