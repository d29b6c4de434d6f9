"""The ``cpp`` backend: fused C++ CPU ops from ``csrc/`` (``torch.ops.rlrp_fast.*``).

Each contraction is one op: ATen's GEMM / transposed convolution for ``Wᵀ g``, with the
elementwise work around it fused into a single parallel pass (the division by ``stab(z)``
before; the product with ``a``, the per-sample scale and the per-sample L1 norm after).

The ops live in the compiled extension ``rlrp_fast._C``, built by ``setup.py``. Importing this
module never fails: without the extension, :func:`unavailable_reason` says how to build it.
"""
from __future__ import annotations

import torch

from ..plan import Affine
from .torch_backend import TorchBackend

_BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` from the source checkout "
               "(needs a C++ compiler and the installed torch)")


def _load() -> str | None:
    """Import the extension and register the fake implementations; the reason on failure."""
    try:
        from .. import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except ImportError as exc:
        return f"the compiled extension rlrp_fast._C is missing ({exc}); {_BUILD_HINT}"
    ops = torch.ops.rlrp_fast
    for name in ("affine_relevance_l1", "affine_relevance"):
        if not hasattr(ops, name):
            return (f"rlrp_fast._C does not register torch.ops.rlrp_fast.{name} (stale build?); "
                    f"{_BUILD_HINT}")
    _register_fakes()
    return None


def _layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format the C++ ops give their outputs (ATen's ``suggest_memory_format``)."""
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(t)


def _register_fakes() -> None:
    """Shape/dtype/layout functions so torch.compile and FakeTensor can trace the ops."""

    @torch.library.register_fake("rlrp_fast::affine_relevance_l1")
    def _(g, weight, a, g_scale, stride, padding, dilation, groups, conv_dims):
        torch._check(a.shape[0] == g.shape[0], lambda: "a and g disagree on the batch size")
        out = torch.empty(a.shape, dtype=g.dtype, device=g.device,
                          memory_format=_layout(a))
        return out, g.new_empty((a.shape[0],))

    @torch.library.register_fake("rlrp_fast::affine_relevance")
    def _(g, weight, a, z, eps, input_shape, stride, padding, dilation, groups, conv_dims):
        like = a if a is not None else (g if len(input_shape) == g.dim() else None)
        layout = torch.contiguous_format if like is None else _layout(like)
        return torch.empty(input_shape, dtype=g.dtype, device=g.device, memory_format=layout)


_REASON: str | None = _load()


def unavailable_reason() -> str | None:
    """None when the compiled ops are usable, else what is missing and how to build it."""
    return _REASON


def _geometry(step: Affine) -> tuple[list[int], list[int], list[int], int, int]:
    return (list(step.stride), list(step.padding), list(step.dilation), step.groups,
            step.conv_dims)


class CppBackend(TorchBackend):
    """Fused CPU contractions; forward and pooling adjoints are the torch backend's."""

    name = "cpp"

    def __init__(self) -> None:
        if _REASON is not None:
            raise RuntimeError(f"the cpp backend is unavailable: {_REASON}")

    def affine_contract(self, step, weight, g, input_shape, a=None, z=None, eps=0.0):
        return torch.ops.rlrp_fast.affine_relevance(g, weight, a, z, float(eps),
                                                    list(input_shape), *_geometry(step))

    def affine_contract_l1(self, step, weight, g, a, g_scale=None):
        return torch.ops.rlrp_fast.affine_relevance_l1(g, weight, a, g_scale, *_geometry(step))
