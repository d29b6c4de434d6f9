"""The correctness gate: before a method is timed, its output is compared with something
independent ("correct enough to time").

- each peer against our engine's same-named rule, on the BatchNorm-folded model (exact parity
  needs BN folded the way ``tests/tv_models.fold_batchnorm`` does it): zennit EpsilonPlus /
  EpsilonGammaBox (same ``low``/``high``) against ours, Captum's LRP against our ``epsilon``
  with Captum's default ε = 1e-9;
- our composites as timed (on the unfolded model, our own BN folding) against zennit;
- our R-LRP backends (and the compiled path) against the ``torch`` backend.

A status is ``ok`` (per-image relative L1 ≤ the tolerance), ``MISMATCH (err=…)``,
``broken (…)`` (non-finite, absurd magnitudes, or an exception) or ``skipped: why``.
Only ``ok`` methods are timed.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

import rlrp_fast

from .methods import (CAPTUM_EPSILON, METHODS, _target_logit, zennit_canonizers,
                      zennit_composite)
from .models import ModelSpec, fold_batchnorm

TOLERANCE = 1e-3          # per image, relative L1
TOLERANCE_LOW_PRECISION = 5e-2  # our methods run in bfloat16/float16 against float32
BROKEN_ERROR = 1e3        # a relative error this large is not a near miss, it is broken


def rel_l1(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max over images of ``‖ours − theirs‖₁ / ‖theirs‖₁``; inf when anything is non-finite."""
    a = ours.detach().double().flatten(1)
    b = theirs.detach().double().flatten(1)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return float(((a - b).abs().sum(1) / b.abs().sum(1).clamp_min(1e-300)).max())


def status_of(err: float, tolerance: float) -> str:
    if not math.isfinite(err):
        return "broken (non-finite relevance)"
    if err > BROKEN_ERROR:
        return f"broken (err={err:.1e})"
    if err > tolerance:
        return f"MISMATCH (err={err:.1e})"
    return "ok"


def _ours(model, rule, x, backend="torch", **options):
    return rlrp_fast.Explainer(model, rule=rule, backend=backend, **options).explain(x)


def _zennit(model, spec, rule, x):
    from zennit.attribution import Gradient
    composite = zennit_composite(rule, spec, zennit_canonizers(model, spec))
    with Gradient(model=copy.deepcopy(model), composite=composite) as attributor:
        _, relevance = attributor(x, _target_logit)
    return relevance


def _captum(model, x, targets):
    """Captum's LRP on a copy of the folded model, whose Identity modules (where BatchNorm
    was) become ``Dropout(0)``: Captum refuses Identity but passes relevance through Dropout."""
    from captum.attr import LRP
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Identity:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, nn.Dropout(0.0).eval())
    return LRP(model).attribute(x, target=targets)


def check(model: nn.Module, spec: ModelSpec, keys: list[str], x: torch.Tensor,
          dtype: torch.dtype) -> dict[str, tuple[str, float | None]]:
    """``{method key: (status, error)}`` for the methods ``keys`` on the check batch ``x``."""
    folded = fold_batchnorm(model.cpu()).to(x.device)
    model = model.to(x.device)
    low = dtype in (torch.bfloat16, torch.float16)
    tol_ours = TOLERANCE_LOW_PRECISION if low else TOLERANCE
    out: dict[str, tuple[str, float | None]] = {}
    cache: dict[str, torch.Tensor] = {}

    def guarded(key, compute):
        try:
            out[key] = compute()
        except Exception as exc:  # a peer that throws is reported, not fatal
            out[key] = (f"broken ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                        None)

    def zennit_rel(rule):
        if rule not in cache:
            cache[rule] = _zennit(folded, spec, rule, x)
        return cache[rule]

    refs = {norm: _ours(model, "rlrp", x, norm=norm).relevance for norm in ("layer", "neuron")}
    for key in keys:
        method = METHODS[key]
        family, _, backend = key.partition("-")
        ref = refs["neuron" if family == "neuron" else "layer"]
        if key in ("forward", "gxi"):
            out[key] = ("ok", None)  # the floor: plain PyTorch, nothing to compare with
        elif family in ("rlrp", "neuron") and backend == "torch":
            nonzero = torch.isfinite(ref).all() and ref.abs().sum() > 0
            out[key] = ("ok", None) if nonzero else ("broken (zero or non-finite)", None)
        elif family in ("rlrp", "neuron"):  # as timed: the method's own set-up
            guarded(key, lambda: _vs(method.setup(model, spec, x.device, dtype)(x),
                                     ref, tol_ours))
        elif method.family == "ours":  # our composite as timed, against zennit
            opts = {"low": spec.low, "high": spec.high} if key == "EpsilonGammaBox" else {}
            guarded(key, lambda: _vs(_ours(model, key, x.to(dtype), backend="auto",
                                           **opts).relevance, zennit_rel(key), tol_ours))
        elif method.family == "zennit":
            rule = key.split("-", 1)[1]
            opts = {"low": spec.low, "high": spec.high} if rule == "EpsilonGammaBox" else {}
            guarded(key, lambda: _vs(zennit_rel(rule),
                                     _ours(folded, rule, x, **opts).relevance, TOLERANCE))
        elif method.family == "captum":
            ours = _ours(folded, "epsilon", x, epsilon=CAPTUM_EPSILON)
            guarded(key, lambda: _vs(_captum(folded, x, ours.targets.clone()), ours.relevance,
                                     TOLERANCE))
    return out


def _vs(theirs: torch.Tensor, reference: torch.Tensor, tolerance: float):
    err = rel_l1(theirs.float(), reference.float())
    return status_of(err, tolerance), err
