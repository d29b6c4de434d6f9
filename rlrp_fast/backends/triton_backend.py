"""The ``triton`` backend: fused Triton kernels (``rlrp_fast.kernels``) for Linear, Conv1d and
Conv2d, one launch per contraction with the prologue (``g / stab(z)``) and epilogue (``a``,
per-sample scale, per-sample L1) fused. Everything else — Conv3d, float64, pools, forward
passes — is the ``torch`` backend's.

Runs on CUDA tensors, and on CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` was set before the kernels were imported (for tests). Importing this
module does not import Triton; the kernels are imported on first use.
"""
from __future__ import annotations

import os

import torch

from ..plan import Affine
from .torch_backend import TorchBackend

_HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


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


def _kernels():
    from ..kernels import conv_relevance, linear_relevance  # imports triton
    return linear_relevance, conv_relevance


class TritonBackend(TorchBackend):
    name = "triton"

    def _covers(self, step: Affine, weight: torch.Tensor, g: torch.Tensor,
                *others: torch.Tensor | None) -> bool:
        """Whether the kernels handle this call (else the torch backend does)."""
        if step.conv_dims not in (0, 1, 2) or g.dtype != torch.float32 or g.dim() < 2:
            return False
        if not (g.is_cuda or (_interpreting() and g.device.type == "cpu")):
            return False
        return all(t is None or (t.dtype in _HALF_OR_FLOAT and t.device == g.device)
                   for t in (weight, *others))

    def _run(self, step, weight, g, input_shape, a, z, eps, scale, compute_l1):
        linear, conv = _kernels()
        if step.is_conv:
            return conv.conv_relevance(g, weight, input_shape, step.stride, step.padding,
                                       step.dilation, step.groups, a, z=z, eps=eps,
                                       scale=scale, compute_l1=compute_l1)
        r, l1 = linear.linear_relevance(g, weight, a, z=z, eps=eps, scale=scale,
                                        compute_l1=compute_l1, in_features=input_shape[-1])
        return r.view(input_shape), l1

    def affine_contract(self, step, weight, g, input_shape, a=None, z=None, eps=0.0):
        if not self._covers(step, weight, g, a, z):
            return super().affine_contract(step, weight, g, input_shape, a, z, eps)
        return self._run(step, weight, g, input_shape, a, z, eps, None, False)[0]

    def affine_contract_l1(self, step, weight, g, a, g_scale=None):
        if not self._covers(step, weight, g, a, g_scale):
            return super().affine_contract_l1(step, weight, g, a, g_scale)
        return self._run(step, weight, g, a.shape, a, None, 0.0, g_scale, True)
