"""Backend registry and selection (``backend="auto" | "torch" | "triton" | "cpp"``)."""
from __future__ import annotations

import torch

from .base import Backend
from .torch_backend import TorchBackend

BACKENDS = ("auto", "torch", "triton", "cpp")

# How to obtain each backend that is not built in; the fused backends land here.
_UNAVAILABLE = {
    "triton": "the fused Triton backend is not part of this build yet (it needs CUDA and "
              "triton); use backend='torch' or 'auto'",
    "cpp": "the compiled C++ backend is not part of this build yet; use backend='torch' or "
           "'auto'",
}


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend called ``name`` for tensors on ``device``; ``auto`` picks the fastest
    available one."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name in ("auto", "torch"):
        return TorchBackend()
    raise ValueError(f"backend {name!r} is unavailable: {_UNAVAILABLE[name]}")


__all__ = ["Backend", "TorchBackend", "get_backend", "BACKENDS"]
