"""The ``triton`` backend: fused Triton kernels (``rlrp_fast.kernels.affine_relevance``) for
Linear, Conv1d and Conv2d, one launch per contraction with the prologue (``g / stab(z)``) and
epilogue (``a``, per-sample scale, per-sample L1) fused; attention's value mixing and its
relevance without the attention matrix (``rlrp_fast.kernels.attention_relevance``). Everything
else — Conv3d, float64, pools, forward passes — is the ``torch`` backend's.

Runs on CUDA tensors, and on CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` was set before the kernels were imported (for tests). Importing this
module does not import Triton; the kernels are imported on first use.
"""
from __future__ import annotations

import os

import torch

from .torch_backend import TorchBackend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else what is missing."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not importable ({exc}); install it with `pip install triton`"
    if _interpreting():
        return None
    if not torch.cuda.is_available():
        return ("no CUDA device is available (Triton kernels need an NVIDIA GPU; set "
                "TRITON_INTERPRET=1 before importing rlrp_fast to run them, slowly, on CPU)")
    return None


def _forward_abs():
    from ..kernels import affine_forward_abs  # imports triton
    return affine_forward_abs


def _kernels():
    from ..kernels import affine_relevance  # imports triton
    return affine_relevance


def _attention():
    from ..kernels import attention_relevance  # imports triton
    return attention_relevance


class TritonBackend(TorchBackend):
    name = "triton"

    def affine_relevance(self, step, weight, g, input_shape, a=None, z=None, eps=0.0):
        kernels = _kernels()
        if kernels.unsupported(g, weight, a, z, conv_dims=step.conv_dims) is not None:
            return super().affine_relevance(step, weight, g, input_shape, a, z, eps)
        return kernels.affine_relevance(g, weight, a=a, z=z, eps=eps, input_shape=input_shape,
                                        **step.geometry)

    def affine_relevance_l1(self, step, weight, g, a, g_scale=None):
        kernels = _kernels()
        if kernels.unsupported(g, weight, a, g_scale, conv_dims=step.conv_dims) is not None:
            return super().affine_relevance_l1(step, weight, g, a, g_scale)
        return kernels.affine_relevance_l1(g, weight, a, g_scale=g_scale, **step.geometry)

    def affine_abs(self, step, a, weight, scale, abs_weight):
        # what the kernels take: float32 weight (in the relevance slot), float/half a, CUDA
        if _kernels().unsupported(weight, weight, a, scale, conv_dims=step.conv_dims) is not None:
            return super().affine_abs(step, a, weight, scale, abs_weight)
        geometry = {k: v for k, v in step.geometry.items() if k != "conv_dims"}
        _, s = _forward_abs().affine_forward_abs(a, weight, scale=scale, store_z=False,
                                                 **geometry)
        return s

    # Attention: flash-style kernels, no (L, S) matrix; ``state`` is the rows' log-sum-exp.
    # Both methods fall back on the same test, so a fallback's ``P`` returns to torch.
    def attention_mix(self, q, k, v, bias, scale, abs_v):
        kernels = _attention()
        if kernels.unsupported(q, k, v, bias) is not None:
            return super().attention_mix(q, k, v, bias, scale, abs_v)
        return kernels.attention_mix(q, k, v, bias, scale, abs_v)

    def attention_relevance(self, q, k, v, g, bias, scale, state, compute_l1):
        kernels = _attention()
        if kernels.unsupported(q, k, v, bias) is not None:
            return super().attention_relevance(q, k, v, g, bias, scale, state, compute_l1)
        return kernels.attention_relevance(q, k, v, g, state, bias, scale,
                                           compute_l1=compute_l1)
