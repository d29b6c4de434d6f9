"""Backend registry and selection (``backend="auto" | "torch" | "triton" | "cpp"``).

``auto`` takes the fused backend of the tensor's device (``triton`` on CUDA, ``cpp`` on CPU)
when it is available, else ``torch``, and says once why (a warning). A backend requested by
name that is unavailable is an error that says how to get it.
"""
from __future__ import annotations

import importlib
import threading
import warnings

import torch

from .base import Backend
from .torch_backend import TorchBackend

BACKENDS = ("auto", "torch", "triton", "cpp")

# name → (module, class, device type it serves). Each module defines the class and
# ``unavailable_reason() -> str | None`` (None when usable, else what is missing and how to
# get it); importing the module must not fail when its dependencies are missing.
_FUSED = {"cpp": ("cpp_backend", "CppBackend", "cpu"),
          "triton": ("triton_backend", "TritonBackend", "cuda")}
_warned: set[str] = set()
_warn_lock = threading.Lock()


def unavailable_reason(name: str) -> str | None:
    """Why fused backend ``name`` cannot be used here, or None when it can."""
    module_name = _FUSED[name][0]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        return f"its module failed to import ({exc})"
    return module.unavailable_reason()


def _instantiate(name: str) -> Backend:
    module_name, class_name, _ = _FUSED[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)()


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend called ``name`` for tensors on ``device``; ``auto`` picks the fastest
    available one."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "torch":
        return TorchBackend()
    if name == "auto":
        fused = next((n for n, spec in _FUSED.items() if spec[2] == device.type), None)
        if fused is None:
            return TorchBackend()
        reason = unavailable_reason(fused)
        if reason is None:
            return _instantiate(fused)
        with _warn_lock:
            if fused not in _warned:
                _warned.add(fused)
                warnings.warn(f"rlrp_fast: backend 'auto' uses 'torch' on {device.type}: the "
                              f"fused {fused!r} backend is unavailable: {reason}",
                              RuntimeWarning, stacklevel=3)
        return TorchBackend()
    wanted_device = _FUSED[name][2]
    if device.type != wanted_device:
        raise ValueError(f"backend {name!r} runs on {wanted_device} tensors, but the model is "
                         f"on {device}; use backend='auto' or 'torch'")
    reason = unavailable_reason(name)
    if reason is not None:
        raise ValueError(f"backend {name!r} is unavailable: {reason}")
    return _instantiate(name)


__all__ = ["Backend", "TorchBackend", "get_backend", "unavailable_reason", "BACKENDS"]
