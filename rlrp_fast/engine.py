"""The engine: the plan's own forward (keeping a tape) and the backward relevance walk.

The forward keeps only what the relevance pass reads: the inputs of linear steps and adds
(their outputs too when a rule divides by them), max-pool indices, and shapes. Every other
intermediate is released as soon as its last reader has run.

Routing steps are handled here, identically for every rule: activations pass relevance
through, max-pool routes it to the winner, reshapes and cats route it by element.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .backends import Backend
from .backends.torch_backend import affine_forward, pool_forward
from .plan import (Activation, Add, Affine, Attention, Cat, Constant, Gate, LayerNorm, MaxPool, Meta, Plan,
                   Pool, Reshape, Scale, Select, Step, resolve, scale_rows, step_reads)
from .numerics import (Rel, l1_per_sample, per_channel, per_sample, scale_the_weight,
                       share_mass)
from .rules import Propagator, attention_forward


@dataclass
class Tape:
    """What one forward pass leaves for the relevance pass (per step index)."""

    inputs: dict[int, list[torch.Tensor]]
    outputs: dict[int, torch.Tensor]
    pool_indices: dict[int, torch.Tensor]
    shapes: dict[int, list[torch.Size]]
    selections: dict[int, tuple] = field(default_factory=dict)  # Select: resolved arguments




class StepError(ValueError):
    """A step failed in the forward pass; the message names the step."""


def _forward_step(step: Step, args: list, weights: dict[int, tuple], index: int):
    if isinstance(step, Affine):
        w, b, s = weights[index]
        x = args[0]
        if s is None:
            return affine_forward(step, w, b, x)
        if not step.is_conv and x.dim() != 2:
            raise ValueError("a Linear followed by BatchNorm1d needs (N, features) input")
        # the folded BatchNorm: on the weight or on the output
        if scale_the_weight(w.numel(), step.output_numel(x.shape)):
            return affine_forward(step, scale_rows(w, s).to(w.dtype), b, x)
        return affine_forward(step, w, None, x).mul_(per_channel(s, x)).add_(per_channel(b, x))
    if isinstance(step, Pool):
        return pool_forward(step, args[0])
    if isinstance(step, Scale):
        x = args[0]
        return (x * per_channel(step.scale.to(x.dtype), x)
                + per_channel(step.shift.to(x.dtype), x))
    if isinstance(step, Activation):
        return step.fn(args[0])
    if isinstance(step, Add):  # (constants: appended to args by the caller)
        out = args[0]
        for other in args[1:]:
            out = out + other
        return out
    if isinstance(step, Attention):
        return attention_forward(step, *args)
    if isinstance(step, Cat):
        return torch.cat(args, dim=step.dim)
    if isinstance(step, Gate):
        signal, gate = args
        return signal * gate
    if isinstance(step, LayerNorm):
        x = args[0]
        w, b = (None if t is None else t.to(x.dtype) for t in (step.weight, step.bias))
        return F.layer_norm(x, step.normalized_shape, w, b, step.eps)
    raise AssertionError(type(step))  # MaxPool/Reshape/Meta/Constant: handled by the caller


def _last_reads(plan: Plan) -> list[list[int]]:
    """For each step, the slots whose last forward reader it is (to release them)."""
    last: dict[int, int] = {}
    for i, step in enumerate(plan.steps):
        for slot in step_reads(step):
            last[slot] = i
    per_step: list[list[int]] = [[] for _ in plan.steps]
    for slot, i in last.items():
        if slot != plan.output_slot:
            per_step[i].append(slot)
    return per_step


def run_forward(plan: Plan, x: torch.Tensor, weights: dict[int, tuple],
                propagators: list[Propagator | None], record: dict | None = None
                ) -> tuple[torch.Tensor, Tape]:
    """Run the plan on ``x``; return the output and the tape the relevance pass needs.
    ``record``, if given, receives every slot's value (trace verification reads them)."""
    values: list = [None] * plan.num_slots
    values[plan.input_slot] = x
    tape = Tape({}, {}, {}, {})
    release = _last_reads(plan)
    for i, step in enumerate(plan.steps):
        args = [values[s] for s in step.inputs]
        if isinstance(step, Gate):  # the rules read the gate too
            args.append(values[step.gate])
        elif isinstance(step, Attention):  # and attention its query and key
            args += [values[step.query], values[step.key]]
        try:
            if isinstance(step, MaxPool):
                out, indices = step.fn(args[0])
                tape.pool_indices[i] = indices
                tape.shapes[i] = [args[0].shape]
            elif isinstance(step, Reshape):
                out = step.fn(args[0], *resolve(step.args, values), **resolve(step.kwargs, values))
                tape.shapes[i] = [args[0].shape]
            elif isinstance(step, Select):
                chosen = (resolve(step.args, values), resolve(step.kwargs, values))
                out = step.apply(args[0], *chosen)
                tape.shapes[i], tape.selections[i] = [args[0].shape], chosen
            elif isinstance(step, Meta):
                out = step.fn(*resolve(step.args, values), **resolve(step.kwargs, values))
            elif isinstance(step, Constant):  # in the forward's dtype, as weights are
                out = step.value.to(x.dtype)
            elif isinstance(step, Cat) and step.operands:  # with constants (no relevance)
                every = [values[s] for s in step.operands]
                out = torch.cat(every, dim=step.dim)
                tape.shapes[i] = [a.shape for a in every]
            elif isinstance(step, Add) and step.constants:  # constants take no relevance
                out = _forward_step(step, args + [values[s] for s in step.constants],
                                    weights, i)
            else:
                out = _forward_step(step, args, weights, i)
                if isinstance(step, Cat):
                    tape.shapes[i] = [a.shape for a in args]
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            raise StepError(f"{step.target!r} (node {step.name!r}) failed on input shape(s) "
                            f"{shapes}: {exc}") from exc
        prop = propagators[i]
        if prop is not None:
            tape.inputs[i] = args
            if prop.needs_output:
                tape.outputs[i] = out
        values[step.output] = out
        if record is not None:
            record[step.output] = out
        for slot in release[i]:
            values[slot] = None
    return values[plan.output_slot], tape


@dataclass
class RelevancePass:
    """The relevance at the input, and (R-LRP) whether every step's value stayed in the
    range where float arithmetic is exact enough: ``healthy`` ``(N,)`` bool, None for the
    classic rules (which do not renormalise, so have no range to keep)."""

    relevance: torch.Tensor
    healthy: torch.Tensor | None


def value_range(dtype: torch.dtype) -> tuple[float, float]:
    """The per-sample L1 norms a relevance value may have without losing precision in the
    next contraction (subnormals) or overflowing in it: ``tiny^⅔ … max^⅔`` (float32:
    1e-25 … 5e25)."""
    info = torch.finfo(dtype)
    return info.tiny ** (2 / 3), info.max ** (2 / 3)


def run_relevance(plan: Plan, tape: Tape, r_out: torch.Tensor, backend: Backend,
                  propagators: list[Propagator | None], keep_mass: bool = False,
                  safe: bool = False, repeat: int = 1) -> RelevancePass:
    """Walk the plan backwards from ``r_out`` (relevance at the output) to the input.

    ``keep_mass`` (R-LRP): relevance carries its L1 mass (``Rel.mass``) and forks keep the
    mass that arrives. ``safe``: before each step, scale its inputs and relevance to a
    maximum of 1 per sample (R-LRP is invariant to it), so that inputs from 1e-44 to 1e38
    neither underflow nor overflow; slower, used when the plain pass was not ``healthy``.
    ``repeat``: ``r_out`` has K = ``repeat`` rows per sample of the forward (row
    ``n·K + k``); each step's tape entries are repeated to match when it is reached, so only
    one step's activations exist K times at once."""
    if repeat > 1:
        tape = _repeated(tape, repeat)
    rel: list[Rel | None] = [None] * plan.num_slots
    mass = l1_per_sample(r_out) if keep_mass else None
    rel[plan.output_slot] = Rel(r_out, mass, mass)
    norms: list[torch.Tensor] = []  # every R-LRP step's output L1, for the range check
    for i in range(len(plan.steps) - 1, -1, -1):
        step = plan.steps[i]
        r = rel[step.output]
        if r is None or isinstance(step, Meta):
            continue
        rel[step.output] = None
        if r.value.dim() == 0 or r.value.shape[0] != r_out.shape[0]:
            raise NotImplementedError(
                f"rlrp_fast explains each sample on its own, so it needs the batch as the "
                f"first dimension of every tensor; {step.target!r} (node {step.name!r}) "
                f"outputs shape {tuple(r.value.shape)[:1]}+... for a batch of "
                f"{r_out.shape[0] // repeat}")
        prop = propagators[i]
        if prop is not None:
            inputs = tape.inputs.pop(i)
            if safe:
                r, inputs = _unit_max(r), _safe_inputs(step, inputs, r.value.dtype)
            parts = prop(backend, step, r, inputs, tape.outputs.pop(i, None))
            if keep_mass:
                norms.append(sum(p.value_l1() for p in parts))
        else:
            parts = _route(step, r, tape, i)
        for slot, part in zip(step.inputs, parts):
            rel[slot] = part if rel[slot] is None else rel[slot] + part  # fork: sum
    result = rel[plan.input_slot]
    if result is None:  # the output does not depend on the input
        raise ValueError("the model's output does not depend on its input")
    healthy = None
    if keep_mass:
        low, high = value_range(r_out.dtype)
        checked = torch.stack([*norms, result.value_l1()])
        healthy = ((checked >= low) & (checked <= high)).all(0) | (mass == 0)
    return RelevancePass(result.materialize(), healthy)


class _RepeatedRows(dict):
    """A tape dict whose tensors come out with every batch row repeated K times."""

    def __init__(self, inner: dict, repeat: int):
        super().__init__(inner)
        self.repeat = repeat

    def pop(self, key, *default):
        value = super().pop(key, *default)
        if isinstance(value, torch.Tensor):
            return value.repeat_interleave(self.repeat, 0)
        if isinstance(value, list):
            return [v.repeat_interleave(self.repeat, 0) for v in value]
        return value


def _repeated(tape: Tape, repeat: int) -> Tape:
    shapes = {i: [torch.Size((s[0] * repeat, *s[1:])) if len(s) else s for s in ss]
              for i, ss in tape.shapes.items()}
    return Tape(_RepeatedRows(tape.inputs, repeat), _RepeatedRows(tape.outputs, repeat),
                _RepeatedRows(tape.pool_indices, repeat), shapes, tape.selections)


def _unit_max(r: Rel) -> Rel:
    """The relevance with its value scaled to a maximum of 1 per sample (mass unchanged)."""
    return Rel(_divide_by_max(r.value, _max_abs(r.value)), r.mass)


def _joint_unit_max(inputs: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """A step's inputs in ``dtype``, all divided by one per-sample factor: their joint
    maximum (one factor for all, so that an add's operands keep their ratio)."""
    inputs = [t.to(dtype) for t in inputs]
    peak = torch.stack([_max_abs(t) for t in inputs]).amax(0)
    return [_divide_by_max(t, peak) for t in inputs]


def _safe_inputs(step: Step, inputs: list[torch.Tensor], dtype: torch.dtype
                 ) -> list[torch.Tensor]:
    """:func:`_joint_unit_max` of a step's inputs, except attention's query and key (the
    softmax is not invariant to their scale; only the value's scale cancels), a gate (bounded,
    and a constant gate has no batch dimension) and a layer norm's input (``σ = √(var + eps)``
    does not scale with it; ``x/σ`` is bounded anyway)."""
    if isinstance(step, (Attention, Gate)):  # a gate (or constant) is bounded: signal only
        return _joint_unit_max(inputs[:1], dtype) + [t.to(dtype) for t in inputs[1:]]
    if isinstance(step, LayerNorm):
        return [t.to(dtype) for t in inputs]
    return _joint_unit_max(inputs, dtype)


def _max_abs(t: torch.Tensor) -> torch.Tensor:
    return t.abs().reshape(t.shape[0], -1).amax(1)


def _divide_by_max(t: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    return t / per_sample(torch.where(peak > 0, peak, torch.ones_like(peak)), t)


def _route(step: Step, r: Rel, tape: Tape, i: int) -> list[Rel]:
    """Relevance through steps that move it without changing it (the mass rides along)."""
    if isinstance(step, Activation):
        return [r]
    if isinstance(step, MaxPool):
        (shape,) = tape.shapes[i]
        indices = tape.pool_indices.pop(i)
        out = r.value.new_zeros(shape[0], shape[1], shape[2:].numel())
        out.scatter_add_(2, indices.flatten(2), r.value.flatten(2))
        # overlapping windows may sum opposite signs: the mass stays, as at a fork
        return [Rel(out.view(shape), r.mass)]
    if isinstance(step, Reshape):
        value = step.undo(r.value) if step.undo is not None else r.value.reshape(tape.shapes[i][0])
        return [Rel(value, r.mass, r.l1)]
    if isinstance(step, Select):  # the same selection on zeros is a view to fill
        (shape,) = tape.shapes[i]
        out = r.value.new_zeros(shape)
        part = step.apply(out, *tape.selections.pop(i))
        if _copied(part, out):
            raise NotImplementedError(f"{step.target!r} (node {step.name!r}) selects by a "
                                      "tensor index (a copy, not a view): not supported")
        part.copy_(r.value)
        return [Rel(out, r.mass, r.l1)]
    if isinstance(step, Cat):
        sizes = [s[step.dim] for s in tape.shapes[i]]
        parts = list(torch.split(r.value, sizes, dim=step.dim))
        if step.operands:  # a constant's slice is dropped; the others share the whole mass
            parts = [p for p, s in zip(parts, step.operands) if s in step.inputs]
        return share_mass(parts, r.mass)
    raise AssertionError(type(step))


def _copied(part: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether a selection of ``out`` is a copy (a tensor index), not a view to fill."""
    if torch.compiler.is_dynamo_compiling():
        return False  # dynamo can trace no test of it; the eager calls before it test it
    if torch.compiler.is_compiling():  # export: traced tensors have no data pointer
        return part._base is not out
    return part.untyped_storage().data_ptr() != out.untyped_storage().data_ptr()
