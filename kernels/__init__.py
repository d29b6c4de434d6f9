"""Triton kernels of the ``triton`` backend, shipped as ``rlrp_fast.kernels``: the entry points
of the two primitives in :mod:`.affine_relevance`, over the dense and convolution kernels
(:mod:`.affine_relevance_dense`, :mod:`.affine_relevance_conv`); ``norm="neuron"``'s
:mod:`.affine_forward_abs`; attention's :mod:`.attention_relevance`.

Importing this package must not fail without Triton or CUDA: kernel modules import
``triton`` themselves and are only imported by ``rlrp_fast.backends.triton_backend``.
"""
