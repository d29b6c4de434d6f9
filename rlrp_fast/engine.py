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
from .plan import (Activation, Add, Affine, Attention, Broadcast, Cat, Constant, Gate, MaxPool,
                   Meta, Normalization, Opaque, Pad, Plan, Pool, Product, Reshape, Scale, Select,
                   Step, WindowAttention, resolve, scale_rows, step_reads)
from .numerics import (Rel, l1_per_sample, per_channel, per_sample, scale_the_weight,
                       share_mass)
from .rules import Propagator, attention_bias, attention_forward, normalization_forward
from .window_attention import window_attention_forward


@dataclass
class Tape:
    """What one forward pass leaves for the relevance pass (per step index)."""

    inputs: dict[int, list[torch.Tensor]]
    outputs: dict[int, torch.Tensor]
    pool_indices: dict[int, torch.Tensor]
    shapes: dict[int, list[torch.Size]]
    selections: dict[int, tuple] = field(default_factory=dict)  # Select, Pad: resolved arguments
    # steps whose tensors do not all lead with the batch (MultiheadAttention with
    # batch_first=False and the ops around it): (batch dim of the output, of each input)
    layouts: dict[int, tuple[int | None, list[int | None]]] = field(default_factory=dict)
    # per step, the positions in ``inputs`` of constants (a layer scale): no batch dim
    unbatched: dict[int, tuple[int, ...]] = field(default_factory=dict)




class StepError(ValueError):
    """A step failed in the forward pass; the message names the step."""


def _forward_step(step: Step, args: list, weights: dict[int, tuple], index: int, fn=None):
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
        return fn(args[0])
    if isinstance(step, Add):  # (constants: appended to args by the caller)
        terms = step.signed(args[:len(step.inputs)]) + args[len(step.inputs):]
        out = terms[0]
        for other in terms[1:]:
            out = out + other
        return out
    if isinstance(step, Attention):
        return attention_forward(step, *args)
    if isinstance(step, WindowAttention):
        return window_attention_forward(step, args[0])
    if isinstance(step, Cat):
        return torch.cat(args, dim=step.dim)
    if isinstance(step, Gate):
        signal, gate = args
        if step.kind == "matmul":
            _check_matmul(signal, gate)
        return step.apply(signal, gate)
    if isinstance(step, Normalization):
        return normalization_forward(step, args[0])
    if isinstance(step, Product):
        u, v = args
        if step.kind == "mul":
            return u * v
        _check_matmul(u, v)
        return torch.matmul(u, v)
    raise AssertionError(type(step))  # MaxPool/Reshape/Meta/Constant: handled by the caller


def _check_matmul(u: torch.Tensor, v: torch.Tensor) -> None:
    if min(u.dim(), v.dim()) < 3:  # the batch would be a matrix dim: samples mix
        raise ValueError("a matmul of two signals needs both at least 3-D (the batch "
                         "and a matrix): with a 2-D operand it mixes samples")


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


LOST = -1  # a batch dim that no single dim of a tensor holds any more (x.view(N·L, E))


def _batch_dim_after(step: Step, fn, args: list, ins: list[int | None], out: torch.Tensor,
                     n: int, values: list) -> int | None:
    """The dim of ``out`` that holds the batch, from its inputs' (``ins``); ``fn`` is the
    step's function as :attr:`Plan.fns` holds it."""
    known = [b for b in ins if b is not None]
    if not known:
        return None  # computed from constants only
    if any(b != known[0] for b in known):
        return LOST
    b = known[0]
    if b == LOST:
        return LOST
    if isinstance(step, Attention) and step.v_weight is not None:
        return b  # (as its query and value; checked where relevance needs it)
    if isinstance(step, Opaque):  # an unknown op: only where it keeps the batch where it was
        if out is None:  # (timm's resolve_self_attn_mask without a mask): nothing batched
            return None
        return b if isinstance(out, torch.Tensor) and out.dim() > b and out.shape[b] == n \
            else LOST
    if isinstance(step, Cat):
        return LOST if step.dim % out.dim() == b else b
    if isinstance(step, Reshape) and step.undo is None:
        # row-major: the batch stays a dim of its own where the sizes before it multiply
        # to the same number
        before = args[0].shape[:b].numel()
        for k in range(out.dim()):
            if out.shape[:k].numel() == before and out.shape[k] == n:
                return k
        return LOST
    if isinstance(step, Broadcast):
        # expand/broadcast_to/repeat align dims on the right and only add leading ones; the
        # batch keeps a dim of its own unless it was tiled (repeat) or a batch of 1 expanded.
        # From shapes alone, not by replaying the copy: a value test would be a
        # data-dependent branch that torch.export cannot trace.
        k = b + out.dim() - args[0].dim()
        return k if out.shape[k] == n else LOST
    if isinstance(step, (Reshape, Select)):  # views: follow a marker along the batch dim
        a = args[0]
        marker = _marker(a, b, n)
        if isinstance(step, Select):
            moved = step.apply(marker, *(_resolve_selection(step, values)))
        else:
            moved = fn(marker, *resolve(step.args, values), **resolve(step.kwargs, values))
        if isinstance(moved, torch.Tensor):
            # the marker's batch dim is its only one with a stride: test that first, so that
            # no other dim's size is compared with n (under torch.export a static dim equal
            # to the example's batch size would pin the batch size)
            for k in range(moved.dim()):
                if (moved.stride(k) != 0 or n == 1) and moved.shape[k] == n:
                    return k
        return LOST
    return b


def _marker(like: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """The sample index of every element of ``like`` (batch in dim ``b``), as a broadcast
    view (no memory)."""
    return torch.arange(n, device=like.device).view(
        [n if d == b else 1 for d in range(like.dim())]).expand(like.shape)


def _resolve_selection(step: Select, values: list) -> tuple:
    return resolve(step.args, values), resolve(step.kwargs, values)


def _moved_batch_dim(step: Step, layout: tuple[int | None, list[int | None]]) -> int:
    """The batch dim a propagator's step works across, when it is not 0; refuses the steps
    whose rule cannot see their tensors batch first (convolutions, pools, BatchNorm,
    GroupNorm, max-pool), naming the step."""
    out_dim, ins = layout
    b = out_dim
    what = f"{step.target!r} (node {step.name!r})"
    if b is None or b == LOST or any(i not in (b, None) for i in ins):
        raise NotImplementedError(
            f"rlrp_fast explains each sample on its own, so it needs the batch as the first "
            f"dimension of every tensor (or as a dim of its own, batch_first=False); the "
            f"tensors of {what} mix samples or hold them in different dims")
    if isinstance(step, Attention):
        if step.v_weight is None or step.batch_first != (b == 0):
            raise NotImplementedError(f"{what} reads tensors whose batch is dim {b}, not "
                                      "where the attention takes it")
    elif isinstance(step, (Pool, Scale, MaxPool)) or (isinstance(step, Affine) and step.is_conv) \
            or (isinstance(step, Normalization) and step.kind == "group") \
            or (isinstance(step, (Product, Gate)) and step.kind == "matmul"):
        raise NotImplementedError(f"{what} reads a tensor whose batch is dim {b}, not dim 0 "
                                  "(supported there: Linear, layer/RMS norms, activations, "
                                  "gates, sums, attention, reshapes)")
    return b


def _to_batch_first(t: torch.Tensor, b: int, rank: int) -> torch.Tensor:
    """``t`` (broadcastable against a ``rank``-dim tensor whose batch is dim ``b``) as a view
    whose batch is dim 0; dims missing on the left count as broadcast."""
    if t.dim() < rank:
        t = t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))
    return t.movedim(b, 0)


def _batch_first(step: Step, args: list, b: int, rank: int) -> list:
    """A step's tape entries with the batch first (attention's bias already is)."""
    if isinstance(step, Normalization) and any(d % rank <= b for d in step.dims):
        raise NotImplementedError(f"{step.target!r} (node {step.name!r}) normalises over "
                                  "the batch dim")
    if isinstance(step, Affine) and b == rank - 1:
        raise NotImplementedError(f"{step.target!r} (node {step.name!r}) is a Linear over "
                                  "the batch dim")
    moved = args[:3] if isinstance(step, Attention) else args
    return [_to_batch_first(t, b, rank) for t in moved] + args[len(moved):]


def run_forward(plan: Plan, x: torch.Tensor, weights: dict[int, tuple],
                propagators: list[Propagator | None], record: dict | None = None
                ) -> tuple[torch.Tensor, Tape]:
    """Run the plan on ``x``; return the output and the tape the relevance pass needs.
    ``record``, if given, receives every slot's value (trace verification reads them)."""
    values: list = [None] * plan.num_slots
    values[plan.input_slot] = x
    # per slot, the dim holding the batch (None: a constant; LOST: no single dim holds it)
    batch_dims: list[int | None] = [None] * plan.num_slots
    batch_dims[plan.input_slot] = 0
    n = x.shape[0]
    tape = Tape({}, {}, {}, {})
    release = _last_reads(plan)
    for i, step in enumerate(plan.steps):
        args = [values[s] for s in step.inputs]
        if isinstance(step, Gate):  # the rules read the gate too
            args.append(values[step.gate])
        elif isinstance(step, Attention):  # and attention its query, key and masks
            args += [values[step.query], values[step.key]]
        try:
            if isinstance(step, Attention):
                bias = attention_bias(step, args[1], args[2],
                                      [values[s] for s in step.mask_slots])
                args += [] if bias is None else [bias]
            fn = plan.fns[i]  # not step.fn: see Plan.fns
            if isinstance(step, MaxPool):
                out, indices = fn(args[0])
                tape.pool_indices[i] = indices
                tape.shapes[i] = [args[0].shape]
            elif isinstance(step, Reshape):
                out = fn(args[0], *resolve(step.args, values), **resolve(step.kwargs, values))
                tape.shapes[i] = [args[0].shape]
            elif isinstance(step, Broadcast):
                chosen = (resolve(step.args, values), resolve(step.kwargs, values))
                out = fn(args[0], *chosen[0], **chosen[1])
                tape.shapes[i], tape.selections[i] = [args[0].shape], chosen
            elif isinstance(step, Select):
                chosen = (resolve(step.args, values), resolve(step.kwargs, values))
                out = step.apply(args[0], *chosen)
                tape.shapes[i], tape.selections[i] = [args[0].shape], chosen
            elif isinstance(step, Pad):
                pad = tuple(resolve(step.pad, values))
                out = F.pad(args[0], pad, value=step.value)
                tape.selections[i] = pad
            elif isinstance(step, (Meta, Opaque)):
                out = fn(*resolve(step.args, values), **resolve(step.kwargs, values))
            elif isinstance(step, Constant):  # in the forward's dtype, as weights are
                value = step.value  # (a bool mask stays bool)
                out = value.to(x.dtype) if value.is_floating_point() else value
            elif isinstance(step, Cat) and step.operands:  # with constants (no relevance)
                every = [values[s] for s in step.operands]
                out = torch.cat(every, dim=step.dim)
                tape.shapes[i] = [a.shape for a in every]
            elif isinstance(step, Add) and step.bias_slots:  # constants take no relevance
                out = _forward_step(step, args + step.bias(values), weights, i)
            else:
                out = _forward_step(step, args, weights, i, fn)
                if isinstance(step, Cat):
                    tape.shapes[i] = [a.shape for a in args]
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            raise StepError(f"{step.target!r} (node {step.name!r}) failed on input shape(s) "
                            f"{shapes}: {exc}") from exc
        if not isinstance(step, (Meta, Constant)):
            ins = [batch_dims[s] for s in step.inputs]
            batch_dims[step.output] = _batch_dim_after(step, fn, args, ins, out, n, values)
            seq_first = isinstance(step, Attention) and not step.batch_first
            if any(b != 0 for b in ins) or batch_dims[step.output] != 0 or seq_first:
                tape.layouts[i] = (batch_dims[step.output], ins)
        prop = propagators[i]
        if prop is not None:
            if i in tape.layouts:  # the rules see every sample's tensors batch first
                b = _moved_batch_dim(step, tape.layouts[i])
                args, out_kept = _batch_first(step, args, b, out.dim()), _to_batch_first(
                    out, b, out.dim())
            else:
                out_kept = out
            tape.inputs[i] = args
            if isinstance(step, Gate) and batch_dims[step.gate] is None:
                tape.unbatched[i] = (1,)
            if prop.needs_output:
                tape.outputs[i] = out_kept
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
        elif i in tape.layouts:  # route in the forward's layout, hand on batch first
            parts = _route_in_layout(step, r, tape, i)
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
    """A tape dict whose tensors come out with every batch row repeated K times (except
    the constants ``unbatched`` lists: they have no batch rows)."""

    def __init__(self, inner: dict, repeat: int, unbatched: dict | None = None):
        super().__init__(inner)
        self.repeat, self.unbatched = repeat, unbatched or {}

    def pop(self, key, *default):
        value = super().pop(key, *default)
        if isinstance(value, torch.Tensor):
            return value.repeat_interleave(self.repeat, 0)
        if isinstance(value, list):
            keep = self.unbatched.get(key, ())
            return [v if j in keep else v.repeat_interleave(self.repeat, 0)
                    for j, v in enumerate(value)]
        return value


def _repeated(tape: Tape, repeat: int) -> Tape:
    def grown(s: torch.Size, b: int | None) -> torch.Size:
        if not len(s) or b is None or b == LOST:
            return s
        return torch.Size((*s[:b], s[b] * repeat, *s[b + 1:]))

    shapes = {}
    for i, ss in tape.shapes.items():
        ins = tape.layouts[i][1] if i in tape.layouts else [0] * len(ss)
        ins = ins if len(ins) == len(ss) else [0] * len(ss)  # (a cat's constants: no relevance)
        shapes[i] = [grown(s, b) for s, b in zip(ss, ins)]
    return Tape(_RepeatedRows(tape.inputs, repeat, tape.unbatched),
                _RepeatedRows(tape.outputs, repeat), _RepeatedRows(tape.pool_indices, repeat),
                shapes, tape.selections, tape.layouts, tape.unbatched)


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
    and a constant gate has no batch dimension), a normalisation's input (``σ = √(var + eps)``
    does not scale with it; ``x/σ`` is bounded anyway) and window attention's input (it is
    the query and key too)."""
    if isinstance(step, (Attention, Gate)):  # a gate (or constant) is bounded: signal only
        return _joint_unit_max(inputs[:1], dtype) + [t.to(dtype) for t in inputs[1:]]
    if isinstance(step, (Normalization, WindowAttention)):
        return [t.to(dtype) for t in inputs]
    return _joint_unit_max(inputs, dtype)


def _max_abs(t: torch.Tensor) -> torch.Tensor:
    return t.abs().reshape(t.shape[0], -1).amax(1)


def _divide_by_max(t: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    return t / per_sample(torch.where(peak > 0, peak, torch.ones_like(peak)), t)


def _route_in_layout(step: Step, r: Rel, tape: Tape, i: int) -> list[Rel]:
    """:func:`_route` for a step whose tensors do not all lead with the batch: relevance
    travels batch first (every per-sample sum reads dim 0), so it is moved to the forward's
    layout for the routing and back after."""
    out_dim, ins = tape.layouts[i]
    if out_dim is None or out_dim == LOST or isinstance(step, MaxPool):
        raise NotImplementedError(
            f"rlrp_fast explains each sample on its own, so it needs the batch as the first "
            f"dimension of every tensor (or as a dim of its own, batch_first=False); {step.target!r} (node {step.name!r}) outputs a "
            "tensor in which no single dim does")
    parts = _route(step, Rel(r.value.movedim(0, out_dim), r.mass, r.l1), tape, i)
    moved = []
    for part, b in zip(parts, ins):
        if b is None or b == LOST:
            raise NotImplementedError(f"{step.target!r} (node {step.name!r}) reads a tensor "
                                      "in which no single dim holds the batch")
        moved.append(Rel(part.value.movedim(b, 0), part.mass, part.l1))
    return moved


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
    if isinstance(step, Broadcast):  # each element: the sum of its copies
        (shape,) = tape.shapes[i]
        args, _ = tape.selections.pop(i)
        if step.tiled:
            sizes = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) \
                else tuple(args)
            full = (1,) * (len(sizes) - len(shape)) + tuple(shape)
            tiles = [d for pair in zip(sizes, full) for d in pair]  # (copies, size) per dim
            value = r.value.reshape(tiles).sum(tuple(range(0, len(tiles), 2))).reshape(shape)
        else:
            value = r.value.sum_to_size(shape)
        # copies of opposite sign cancel: the mass stays, as at a fork
        return [Rel(value, r.mass)]
    if isinstance(step, Select):  # the same selection on zeros is a view to fill
        (shape,) = tape.shapes[i]
        out = r.value.new_zeros(shape)
        part = step.apply(out, *tape.selections.pop(i))
        if _copied(part, out):
            raise NotImplementedError(f"{step.target!r} (node {step.name!r}) selects by a "
                                      "tensor index (a copy, not a view): not supported")
        part.copy_(r.value)
        return [Rel(out, r.mass, r.l1)]
    if isinstance(step, Pad):  # the padded constants' share goes back to the input:
        # the cropped value carries the whole mass (R-LRP), as a cat's constant slice does
        cropped = F.pad(r.value, tuple(-p for p in tape.selections.pop(i)))
        return [Rel(cropped, r.mass)]
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
