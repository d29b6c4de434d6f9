"""Triton kernels of the ``triton`` backend, shipped as ``rlrp_fast.kernels``.

Importing this package must not fail without Triton or CUDA: kernel modules import
``triton`` themselves and are only imported by ``rlrp_fast.backends.triton_backend``.
"""
