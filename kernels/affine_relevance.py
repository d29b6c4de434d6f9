"""The ``triton`` backend's two primitives, under the names they have everywhere (backend
methods, C++ ops ``torch.ops.rlrp_fast.*``): ``affine_relevance`` (the classic rules'
contraction) and ``affine_relevance_l1`` (the R-LRP contraction with per-sample L1 norms).

Each picks the kernel of the layer's kind — :mod:`.affine_relevance_dense` (Linear) or
:mod:`.affine_relevance_conv` (Conv1d/Conv2d: an implicit GEMM, or for depthwise and narrow
grouped convolutions an elementwise kernel across groups) — and runs it in one launch. The
arguments are those of :mod:`rlrp_fast.ops`, plus ``out`` (a preallocated float32 result, e.g. poisoned by
tests) and ``config`` (meta-parameters overriding the fixed/autotuned ones: tests use tiny
blocks to cover many tiles under the interpreter).

Tensors: CUDA (or CPU under ``TRITON_INTERPRET=1``); relevance ``g`` float32; ``weight``,
``a``, ``z`` float32/bfloat16/float16, upcast on load; any strides. The result is float32.
:func:`unsupported` says which calls the kernels do not take (the backend sends those to
``torch``); the entry points reject them with the same message.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import affine_relevance_conv, affine_relevance_dense
from ._common import INTERPRET

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported(g: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None,
                conv_dims: int) -> str | None:
    """Why the kernels cannot take these tensors (``others``: ``a``, ``z``, ``g_scale``, each
    possibly None), or None when they can."""
    if conv_dims not in (0, 1, 2):
        return f"they handle Linear, Conv1d and Conv2d, not Conv{conv_dims}d"
    if g.dtype != torch.float32:
        return f"the relevance must be float32, not {g.dtype}"
    if g.dim() < 2:
        return f"the relevance needs a batch dim and a feature dim, got shape {tuple(g.shape)}"
    if not (g.is_cuda or (INTERPRET and g.device.type == "cpu")):
        return (f"they run on CUDA tensors (on CPU only under TRITON_INTERPRET=1), not on "
                f"{g.device}")
    for name, t in zip(("weight", "a", "z", "g_scale"), (weight, *others)):
        if t is None:
            continue
        if t.dtype not in INPUT_DTYPES:
            return f"{name} must be float32, bfloat16 or float16, not {t.dtype}"
        if t.device != g.device:
            return f"{name} is on {t.device}, the relevance on {g.device}"
    return None


def _check(g, weight, a, z, g_scale, out, input_shape, stride, padding, dilation, groups,
           conv_dims) -> tuple[int, ...]:
    """Raise ValueError naming what does not fit; the input shape as a tuple."""
    reason = unsupported(g, weight, a, z, g_scale, conv_dims=conv_dims)
    if reason is not None:
        raise ValueError(f"rlrp_fast.kernels: {reason}")
    input_shape = tuple(int(s) for s in input_shape)
    if out is not None and (tuple(out.shape) != input_shape or out.dtype != torch.float32
                            or out.device != g.device):
        raise ValueError(f"out must be float32 of shape {input_shape} on {g.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if a is not None and tuple(a.shape) != input_shape:
        raise ValueError(f"a has shape {tuple(a.shape)}, but input_shape is {input_shape}")
    if z is not None and z.shape != g.shape:
        raise ValueError(f"z has shape {tuple(z.shape)}, but g has {tuple(g.shape)}")
    if g_scale is not None and g_scale.shape != (g.shape[0],):
        raise ValueError(f"g_scale must have shape ({g.shape[0]},) (one value per sample), "
                         f"got {tuple(g_scale.shape)}")
    if conv_dims == 0:
        if weight.dim() != 2:
            raise ValueError(f"a Linear weight is [OUT, IN], got shape {tuple(weight.shape)}")
        want = (*g.shape[:-1], weight.shape[1])
        if g.shape[-1] != weight.shape[0] or input_shape != want:
            raise ValueError(f"Linear weight {tuple(weight.shape)} maps an input of shape "
                             f"{want} to relevance of g's shape {tuple(g.shape)}; got "
                             f"input_shape {input_shape} and g's last dim {g.shape[-1]}")
        return input_shape
    dims = conv_dims
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    for name, values in geometry.items():
        if len(values) != dims:
            raise ValueError(f"Conv{dims}d needs {dims} {name} values, got {list(values)}")
    if weight.dim() != dims + 2 or g.dim() != dims + 2 or len(input_shape) != dims + 2:
        raise ValueError(f"Conv{dims}d needs {dims + 2}-d weight, g and input_shape; got "
                         f"{tuple(weight.shape)}, {tuple(g.shape)}, {input_shape}")
    c_in, c_out = input_shape[1], weight.shape[0]
    if groups < 1 or c_in % groups or c_out % groups or weight.shape[1] * groups != c_in:
        raise ValueError(f"weight {tuple(weight.shape)} with groups={groups} does not fit "
                         f"{c_in} input channels")
    out_spatial = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in zip(
        input_shape[2:], weight.shape[2:], stride, padding, dilation))
    if g.shape != (input_shape[0], c_out, *out_spatial):
        raise ValueError(f"relevance of shape {tuple(g.shape)} cannot come from an input of "
                         f"shape {input_shape} with weight {tuple(weight.shape)}, stride "
                         f"{list(stride)}, padding {list(padding)}, dilation {list(dilation)}")
    return input_shape


def affine_relevance(g: torch.Tensor, weight: torch.Tensor, *, a: torch.Tensor | None = None,
                     z: torch.Tensor | None = None, eps: float = 0.0,
                     input_shape: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int,
                     conv_dims: int, out: torch.Tensor | None = None,
                     config: dict | None = None) -> torch.Tensor:
    """``a ⊙ Wᵀ(g / stab(z))`` in one launch, ``g / stab(z)`` formed in registers
    (``stab(z) = z + eps·(sign(z) + (z == 0))``; ``eps`` 0 divides by ``z`` itself). ``a``
    None: no factor; ``z`` None: no division. Float32, ``input_shape`` (channels-last when
    ``a`` is)."""
    input_shape = _check(g, weight, a, z, None, out, input_shape, stride, padding, dilation,
                         groups, conv_dims)
    if conv_dims == 0:
        r, _ = affine_relevance_dense.launch(g, weight, a, z=z, eps=eps, compute_l1=False,
                                             in_features=input_shape[-1], out=out,
                                             config=config)
        return r
    r, _ = affine_relevance_conv.launch(g, weight, torch.Size(input_shape), stride, padding,
                                        dilation, groups, a, z=z, eps=eps, compute_l1=False,
                                        out=out, config=config)
    return r


def affine_relevance_l1(g: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, *,
                        g_scale: torch.Tensor | None = None, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], groups: int,
                        conv_dims: int, out: torch.Tensor | None = None,
                        config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R̃, ‖R̃‖₁ per sample)`` with ``R̃ = g_scale[n] · a ⊙ Wᵀg`` in one launch: the
    epilogue multiplies by ``a`` and ``g_scale`` (None: 1) and adds each sample's L1 norm
    into a float32 ``[N]`` buffer. ``R̃`` float32 of ``a``'s shape (channels-last when
    ``a`` is)."""
    input_shape = _check(g, weight, a, None, g_scale, out, a.shape, stride, padding, dilation,
                         groups, conv_dims)
    if conv_dims == 0:
        return affine_relevance_dense.launch(g, weight, a, scale=g_scale, compute_l1=True,
                                             in_features=input_shape[-1], out=out,
                                             config=config)
    return affine_relevance_conv.launch(g, weight, a.shape, stride, padding, dilation, groups,
                                        a, scale=g_scale, compute_l1=True, out=out,
                                        config=config)
