"""The ``torch`` backend: plain PyTorch ops (GEMM, transposed convolution, elementwise).

Always available, on any device; the baseline every other backend must beat.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..plan import Affine, Pool
from ..numerics import l1_per_sample, per_sample, stabilize
from .base import Backend

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d,
                      3: F.adaptive_avg_pool3d}


def pool_forward(step: Pool, x: torch.Tensor) -> torch.Tensor:
    """``P x`` for a parameter-free linear step (the plan's forward and the rules use it)."""
    p = step.params
    if step.kind == "mean":
        return x.mean(dim=p["dims"], keepdim=p["keepdim"])
    if step.kind == "adaptive_avg":
        return _ADAPTIVE_AVG_POOL[step.dims](x, p["output_size"])
    extra = {} if step.dims == 1 else {"divisor_override": p["divisor_override"]}
    return _AVG_POOL[step.dims](x, p["kernel_size"], p["stride"], p["padding"],
                                p["ceil_mode"], p["count_include_pad"], **extra)


def attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                    scale: float | None) -> torch.Tensor:
    """``P = softmax(q kᵀ · scale + bias)`` ``(…, L, S)``, materialised (``scale`` None:
    ``1/√d``, torch's). A row whose scores are all -inf (every key masked) is 0: it attends
    to nothing, as torch's attention computes it (its output row is 0; torch.softmax alone
    would give NaN)."""
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    p = torch.softmax(scores, dim=-1)
    if bias is None:
        return p
    return p.masked_fill(scores.amax(-1, keepdim=True) == float("-inf"), 0.0)


def _output_padding(step: Affine, input_shape: torch.Size, g: torch.Tensor) -> list[int]:
    """The output_padding that makes the transposed convolution return ``input_shape``
    (a strided convolution maps several input sizes to the same output size)."""
    pads = []
    for i in range(step.conv_dims):
        k = step.weight.shape[2 + i]
        covered = ((g.shape[2 + i] - 1) * step.stride[i] - 2 * step.padding[i]
                   + step.dilation[i] * (k - 1) + 1)
        pads.append(input_shape[2 + i] - covered)
    return pads


def affine_forward(step: Affine, weight: torch.Tensor, bias: torch.Tensor | None,
                   x: torch.Tensor) -> torch.Tensor:
    """``W x + b`` with the step's geometry (the plan's forward and the rules use it)."""
    if not step.is_conv:
        return F.linear(x, weight, bias)
    return _CONV[step.conv_dims](x, weight, bias, step.stride, step.padding, step.dilation,
                                 step.groups)


class TorchBackend(Backend):
    name = "torch"

    def affine_forward(self, step, weight, bias, x):
        return affine_forward(step, weight, bias, x)

    def _transpose(self, step: Affine, weight: torch.Tensor, g: torch.Tensor,
                   input_shape: torch.Size) -> torch.Tensor:
        if not step.is_conv:
            return g.matmul(weight)
        return _CONV_T[step.conv_dims](g, weight, None, step.stride, step.padding,
                                       _output_padding(step, input_shape, g), step.groups,
                                       step.dilation)

    def affine_relevance(self, step, weight, g, input_shape, a=None, z=None, eps=0.0):
        if z is not None:
            g = g / stabilize(z.to(g.dtype), eps)
        back = self._transpose(step, weight, g, input_shape)
        return back if a is None else back.mul_(a)

    def affine_relevance_l1(self, step, weight, g, a, g_scale=None):
        r = self._transpose(step, weight, g, a.shape).mul_(a)
        if g_scale is not None:
            r.mul_(per_sample(g_scale, r))
        return r, l1_per_sample(r)

    def affine_abs(self, step, a, weight, scale, abs_weight):
        return affine_forward(step, abs_weight(), None, a.abs().to(weight.dtype))

    def attention_mix(self, q, k, v, bias, scale, abs_v):
        p = attention_probs(q, k, bias, scale)
        return p @ v, (p @ v.abs() if abs_v else None), p

    def attention_relevance(self, q, k, v, g, bias, scale, state, compute_l1):
        r = v * (state.transpose(-2, -1) @ g)
        return r, (l1_per_sample(r) if compute_l1 else None)

    def pool_forward(self, step: Pool, x):
        return pool_forward(step, x)

    def pool_adjoint(self, step: Pool, g, input_shape):
        like = g.new_empty(()).expand(input_shape)  # the ATen adjoints read only its shape
        if step.kind == "mean":
            dims = step.params["dims"]
            count = 1
            for d in dims:
                count *= input_shape[d]
            if not step.params["keepdim"]:
                for d in sorted(d % len(input_shape) for d in dims):
                    g = g.unsqueeze(d)
            return (g / count).expand(input_shape).contiguous()
        if step.dims == 1:  # ATen has no 1-d adjoints: run the 2-d ones on a height-1 image
            two_d = Pool(name=step.name, target=step.target, inputs=step.inputs,
                         output=step.output, kind=step.kind, dims=2,
                         params=_as_2d(step.params))
            return self.pool_adjoint(two_d, g.unsqueeze(2), (*input_shape[:2], 1,
                                                             input_shape[2])).squeeze(2)
        if step.kind == "adaptive_avg":
            fn = (torch.ops.aten._adaptive_avg_pool2d_backward if step.dims == 2
                  else torch.ops.aten._adaptive_avg_pool3d_backward)
            return fn(g.contiguous(), like)
        p = step.params
        n = step.dims
        kernel = _tup(p["kernel_size"], n)
        stride = _tup(p["stride"], n) if p["stride"] not in (None, ()) else kernel
        fn = (torch.ops.aten.avg_pool2d_backward if n == 2
              else torch.ops.aten.avg_pool3d_backward)
        return fn(g.contiguous(), like, kernel, stride, _tup(p["padding"], n), p["ceil_mode"],
                  p["count_include_pad"], p["divisor_override"])


def _tup(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


def _as_2d(params: dict) -> dict:
    """1-d pooling parameters as 2-d ones over a height-1 image."""
    out = dict(params)
    if "output_size" in out:
        size = out["output_size"]
        out["output_size"] = (1, size[0] if isinstance(size, (tuple, list)) else size)
        return out
    one = lambda v, fill: (fill, v[0] if isinstance(v, (tuple, list)) else v)  # noqa: E731
    out["kernel_size"] = one(params["kernel_size"], 1)
    stride = params["stride"] if params["stride"] not in (None, ()) else params["kernel_size"]
    out["stride"] = one(stride, 1)
    out["padding"] = one(params["padding"], 0)
    return out
