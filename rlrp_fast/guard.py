"""The model guard: an explainer refuses to explain a model that is no longer the one it
captured (a plan of the old model would explain a function the model no longer computes).

Checked on every call, cheaply: the training flags; the module tree (every submodule,
parameter and buffer is the same object, none added or removed); every parameter and buffer
still has the storage, version, dtype and device it had (``w.data = ...``, ``model.half()``,
in-place edits under ``no_grad``); and the contents of the small tensors the plan derived
copies from (BatchNorm statistics and affine parameters, biases), which an edit through
``.data`` changes without a version bump.
"""
from __future__ import annotations

import torch
import torch.nn as nn

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class StaleModelError(ValueError):
    """The model changed since the explainer was built."""


def check_eval(model: nn.Module, modules: list[nn.Module] | None = None) -> None:
    """Refuse a model with any submodule in training mode (``modules``: a cached
    ``list(model.modules())`` makes the common, passing case cheap)."""
    if modules is not None and not any(m.training for m in modules):
        return
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:5]) + (", ..." if len(training) > 5 else "")
        raise ValueError(f"the model is in training mode ({shown}); call model.eval() first: "
                         "explanations need BatchNorm running statistics and Dropout off")


def _derived(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The small tensors the plan copies values from: BatchNorm's, and every bias."""
    out = []
    for name, module in model.named_modules():
        for key, t in [*module.named_parameters(recurse=False),
                       *module.named_buffers(recurse=False)]:
            if t is not None and t.is_floating_point() and (
                    isinstance(module, _BATCHNORMS) or key == "bias"):
                out.append((f"{name}.{key}" if name else key, t))
    return out


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse or other storage-less layouts
        return None


class ModelGuard:
    """A snapshot of ``model`` at capture, and the per-call check against it."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        named = list(model.named_modules())
        self.modules = [m for _, m in named]
        # every module's children, parameters and buffers dicts: the tree, by object identity
        self._owners = [name for name, m in named for _ in range(3)]
        self._dicts = [d for _, m in named for d in (m._modules, m._parameters, m._buffers)]
        self._snapshot = [tuple(d.items()) for d in self._dicts]
        self._ids = self._tree_ids()
        self._names = {id(t): f"{name}.{key}" if name else key for name, m in named
                       for key, t in [*m._parameters.items(), *m._buffers.items()]
                       if t is not None}
        self._tensors = [t for _, m in named
                         for t in [*m._parameters.values(), *m._buffers.values()]
                         if t is not None]
        self._state = self._tensor_state()
        # holding the captured storages keeps their addresses from being reused, so a new
        # storage (model.bfloat16().float()) always shows as a new data_ptr
        self._held = [_storage(t) for t in self._tensors]
        self._derived = _derived(model)
        self._contents = self._derived_contents()

    def _tree_ids(self) -> list[tuple]:
        return [(k, id(v)) for d in self._dicts for k, v in d.items()]

    def _tensor_state(self) -> list[tuple]:
        return [(t.data_ptr(), t._version, t.dtype, t.device) for t in self._tensors]

    def _derived_contents(self) -> dict[torch.dtype, torch.Tensor]:
        # flat views made once (a new storage is caught by the data_ptr check before this)
        if not hasattr(self, "_flat"):
            self._flat: dict[torch.dtype, list[torch.Tensor]] = {}
            for _, t in self._derived:
                self._flat.setdefault(t.dtype, []).append(t.detach().view(-1))
        return {dtype: torch.cat(ts) for dtype, ts in self._flat.items()}

    def check(self) -> None:
        """Raise :class:`StaleModelError` (or ``ValueError`` for training mode) naming what
        changed since the snapshot."""
        check_eval(self._model, self.modules)
        if self._tree_ids() != self._ids:  # objects stay alive: their ids cannot be reused
            for owner, d, items in zip(self._owners, self._dicts, self._snapshot):
                if len(d) != len(items) or any(d.get(k) is not v for k, v in items):
                    raise StaleModelError(self._message(self._tree_change(owner, d, items)))
        state = self._tensor_state()
        if state != self._state:
            i = next(i for i, (a, b) in enumerate(zip(state, self._state)) if a != b)
            name = self._names.get(id(self._tensors[i]), "a tensor")
            raise StaleModelError(self._message(
                f"{name!r} was modified (its storage, version, dtype or device changed)"))
        if any(not torch.equal(now, self._contents[dtype])
               for dtype, now in self._derived_contents().items()):
            changed = next(name for name, t in self._derived
                           if not self._same_content(name, t))
            raise StaleModelError(self._message(f"{changed!r} was modified in place"))

    def _same_content(self, name: str, t: torch.Tensor) -> bool:
        offset = 0
        for other, u in self._derived:
            if u.dtype != t.dtype:
                continue
            if other == name:
                return torch.equal(t.reshape(-1),
                                   self._contents[t.dtype][offset:offset + t.numel()])
            offset += u.numel()
        return True

    @staticmethod
    def _tree_change(owner: str, d: dict, items: tuple) -> str:
        before = dict(items)
        for key in {*d, *before}:
            if d.get(key) is not before.get(key):
                now = d.get(key)
                what = "removed" if key not in d else (
                    "set to None" if now is None else
                    f"replaced by a new {type(now).__name__}")
                return f"{f'{owner}.{key}' if owner else key!r} was {what}"
        return "the module tree changed"

    @staticmethod
    def _message(what: str) -> str:
        return (f"the model changed since this Explainer was built: {what}; build a new "
                "Explainer (it captures the model as it is then)")
