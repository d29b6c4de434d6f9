"""Typed Python entry points of the C++ ops ``torch.ops.rlrp_fast.*`` (``csrc/rlrp_ops.cpp``),
each with its fake (shape/dtype/layout) implementation beside it, so that ``torch.compile``
and FakeTensor can trace them.

Importing this module needs the compiled extension: it loads it through the ``cpp`` backend
(ahead-of-time build or first-use build) and raises ImportError, saying why and how to build
it, when that is impossible. The ``cpp`` backend imports it as soon as the extension is loaded.

Geometry arguments: ``conv_dims`` 0 for a Linear (``stride``, ``padding``, ``dilation`` empty,
``groups`` 1), 1/2/3 for ConvNd with ``conv_dims`` values each, as the layer has them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_OPS = ("affine_relevance", "affine_relevance_l1")


def _require_extension() -> None:
    """Make sure the ops are registered (the fakes below need them)."""
    if all(hasattr(torch.ops.rlrp_fast, name) for name in _OPS):
        return
    # not loaded yet: the cpp backend loads (or first builds) the extension on import
    from .backends import cpp_backend

    reason = cpp_backend.unavailable_reason()
    if reason is not None:
        raise ImportError(f"rlrp_fast.ops needs the compiled C++ extension: {reason}")


_require_extension()


def _layout(t: Tensor) -> torch.memory_format:
    """The memory format the C++ ops give their outputs (ATen's ``suggest_memory_format``)."""
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(t)


def affine_relevance(g: Tensor, weight: Tensor, *, a: Tensor | None = None,
                     z: Tensor | None = None, eps: float = 0.0, input_shape: Sequence[int],
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                     groups: int, conv_dims: int) -> Tensor:
    """``a ⊙ Wᵀ(g / stab(z))``: the classic rules' contraction, on CPU tensors.

    Args:
        g: relevance at the layer's output, ``[N, OUT...]`` float32 or float64.
        weight: the layer's weight (``[OUT, IN]`` or ``[C_out, C_in/groups, K...]``), of
            ``g``'s dtype.
        a: the layer's input, ``input_shape``, any float dtype (upcast); None: no factor
            (flat, w² rules).
        z: ``g``'s shape, any float dtype; None: no division. ``stab(z) = z + eps·(sign(z) +
            (z == 0))`` (zennit's); ``eps`` 0 divides by ``z`` itself (LRP-0).
        input_shape: the layer input's shape, the result's (a strided convolution maps several
            input sizes to one output size).

    Returns ``g``'s dtype, ``input_shape``, laid out like ``a`` (like ``g`` without ``a``).
    """
    return torch.ops.rlrp_fast.affine_relevance.default(
        g, weight, a, z, float(eps), list(input_shape), list(stride), list(padding),
        list(dilation), groups, conv_dims)


@torch.library.register_fake("rlrp_fast::affine_relevance")
def _(g, weight, a, z, eps, input_shape, stride, padding, dilation, groups, conv_dims):
    like = a if a is not None else (g if len(input_shape) == g.dim() else None)
    layout = torch.contiguous_format if like is None else _layout(like)
    return torch.empty(input_shape, dtype=g.dtype, device=g.device, memory_format=layout)


def affine_relevance_l1(g: Tensor, weight: Tensor, a: Tensor, *,
                        g_scale: Tensor | None = None, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], groups: int,
                        conv_dims: int) -> tuple[Tensor, Tensor]:
    """The R-LRP contraction on CPU tensors: ``(R̃, ‖R̃‖₁ per sample)`` with
    ``R̃ = g_scale[n] · a ⊙ Wᵀg``.

    Args:
        g: relevance at the layer's output, ``[N, OUT...]`` float32 or float64.
        weight: the layer's weight, of ``g``'s dtype.
        a: the layer's input ``[N, IN...]``, any float dtype (upcast).
        g_scale: ``[N]`` per-sample factor (any float dtype); None: 1.

    Returns ``R̃`` (``g``'s dtype, ``a``'s shape and layout) and the ``[N]`` norms, summed in
    fixed blocks (bit-identical for any thread count).
    """
    return torch.ops.rlrp_fast.affine_relevance_l1.default(
        g, weight, a, g_scale, list(stride), list(padding), list(dilation), groups, conv_dims)


@torch.library.register_fake("rlrp_fast::affine_relevance_l1")
def _(g, weight, a, g_scale, stride, padding, dilation, groups, conv_dims):
    torch._check(a.shape[0] == g.shape[0], lambda: "a and g disagree on the batch size")
    out = torch.empty(a.shape, dtype=g.dtype, device=g.device, memory_format=_layout(a))
    return out, g.new_empty((a.shape[0],))
