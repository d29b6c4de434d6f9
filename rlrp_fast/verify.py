"""Trace verification: the plan is a second implementation of the model's forward, so the
first call for each new (input shape, dtype, device) also runs the model itself and compares
logits. A mismatch is an error that names the first step whose output differs, found by
running the fx trace of the model node by node beside the plan.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import trace
from .plan import Plan

# relative to each sample's largest |logit| (deep nets in half precision round a lot)
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 2e-2,
              torch.bfloat16: 1e-1}


class TraceMismatchError(ValueError):
    """The plan computes something other than the model: no map is returned."""


def _worst(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype
           ) -> tuple[float, float] | None:
    """``(difference, tolerance)`` of the worst element if any exceeds the tolerance."""
    got, want = got.double(), want.double()
    if got.shape != want.shape or (want.dim() > 0 and want.shape[0] == 0):
        return (float("inf"), 0.0) if got.shape != want.shape else None
    if got.numel() == 0:
        return None
    if want.dim() == 0:
        got, want = got.view(1), want.view(1)
    finite = torch.where(torch.isfinite(want), want, torch.zeros_like(want))
    scale = finite.abs().reshape(want.shape[0], -1).amax(1).clamp_min(1e-30)
    tol = _TOLERANCE.get(dtype, 1e-3) * scale.view(-1, *([1] * (want.dim() - 1)))
    diff = (got - want).abs()
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))  # inf == inf too
    diff = torch.where(same, torch.zeros_like(diff), diff)
    excess = (diff - tol).reshape(-1)
    worst = int(excess.nan_to_num(nan=float("inf")).argmax())
    if excess[worst] > 0 or torch.isnan(excess[worst]):
        return float(diff.reshape(-1)[worst]), float(tol.expand_as(diff).reshape(-1)[worst])
    return None


def verify_logits(model: nn.Module, model_dtype: torch.dtype, plan: Plan, x: torch.Tensor,
                  logits: torch.Tensor, run_plan: Callable[[torch.Tensor, dict], torch.Tensor]
                  ) -> None:
    """Run ``model`` on ``x`` (in ``model_dtype``, the dtype it computes in) and compare with
    the plan's ``logits``; on a mismatch, raise :class:`TraceMismatchError` naming the first
    differing step. ``run_plan(x, record)`` runs the plan's forward, recording every slot's
    value into ``record``."""
    # the coarser of the two precisions sets the tolerance
    precision = max(x.dtype, model_dtype, key=lambda d: _TOLERANCE.get(d, 1e-3))
    x_model = x.to(model_dtype)
    with torch.no_grad():
        want = model(x_model.clone())  # a model may modify its input in place
    if not isinstance(want, torch.Tensor):
        raise TraceMismatchError(f"the model returned {type(want).__name__}, not a tensor of "
                                 "logits, when called on this input")
    mismatch = _worst(logits, want, precision)
    if mismatch is None:
        return
    diff, tol = mismatch
    where = _localise(model, plan, x, x_model, want, precision, run_plan)
    raise TraceMismatchError(
        f"the explainer's plan computes different logits than the model on input of shape "
        f"{tuple(x.shape)} ({x.dtype}): largest difference {diff:.3g} (tolerance {tol:.3g}). "
        f"{where} No map is returned: it would explain a function the model does not "
        "compute. Rewrite the offending code out of place / without data-dependent Python, "
        "or report it; verify=False skips this check.")


def _localise(model: nn.Module, plan: Plan, x: torch.Tensor, x_model: torch.Tensor,
              want: torch.Tensor, precision: torch.dtype,
              run_plan: Callable[[torch.Tensor, dict], torch.Tensor]) -> str:
    """A sentence naming the first plan step whose output differs from the traced graph's."""
    try:
        graph_values = _graph_values(model, x_model)
    except Exception as exc:  # noqa: BLE001 (any failure only weakens the message)
        return f"(Could not re-run the model's trace to find the step: {exc}.)"
    plan_values: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        run_plan(x, plan_values)
    for step in plan.steps:
        node = plan.slot_nodes[step.output] if step.output < len(plan.slot_nodes) else None
        got, expected = plan_values.get(step.output), graph_values.get(node)
        if not (isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor)):
            continue
        mismatch = _worst(got, expected, precision)
        if mismatch is not None:
            return (f"The first step that differs is {step.target!r} (node {step.name!r}; "
                    f"largest difference {mismatch[0]:.3g}).")
    out = graph_values.get(plan.slot_nodes[plan.output_slot])
    if isinstance(out, torch.Tensor) and _worst(out, want, precision) is not None:
        return ("torch.fx's trace of the model itself computes something else than the "
                "model (Python control flow, globals or state read at trace time).")
    return "No single step differs beyond rounding; the difference accumulates over steps."


def _graph_values(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's output of the model's fx trace on ``x``, copied when produced (later
    in-place ops would change it)."""
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n.name] = out.clone() if isinstance(out, torch.Tensor) else out
            return out

    with torch.no_grad():
        Recorder(trace(model)).run(x.clone())
    return values
