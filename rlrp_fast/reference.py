"""The float64 reference: ``docs/RLRP_SPEC.md`` written out term by term, for tests.

This is not a backend. It exists so that a reader can hold it next to the spec, line by line,
and so that the fast paths have something independent to be compared with. It shares nothing
with them but the :class:`~rlrp_fast.plan.Plan` (its structure and each step's raw fields):
it does not import ``rules.py``, ``engine.py`` or the backends, and it calls no convolution,
transposed convolution or pooling routine of PyTorch (except a max-pool step's own ``fn``,
asked only which element won each window).

How it works. Every linear op of the plan — ``Affine`` (Linear/ConvNd), ``Pool`` (average
pools, adaptive average pools, means), ``Scale`` (a lone BatchNorm) and ``Add`` (a residual
sum, the linear map with unit weights) — is written as an explicit dense matrix acting on one
sample's flattened input::

    z[n, j] = Σ_i M[j, i] · a[n, i] + b[j]          (j: output element, i: input element)

For a convolution ``M`` is built from the patches: for each output position and each kernel
offset, the input index it reads (zero padding, stride, dilation and groups by index
arithmetic). For an ``Add`` the input is the concatenation of the operands and
``M = [I I …]``. Every rule is then written in *contribution form*: a function returning the
tensor ``c[n, j, i]`` (the relevance output ``j`` sends to input ``i``), and the relevance of
the input is ``R̃_a[i] = Σ_j c[n, j, i]``. Routing ops (activations, max-pool, reshapes, cat)
move relevance element by element. Everything is float64. Loops and dense matrices make it
slow: it is meant for the tiny models of the tests.

Rules (same names and meaning as ``rules.py``):

- ``"rlrp"`` (options ``norm="layer" | "neuron"``, ``skip="linear" | "ratio"``):
  ``c_ij = a_i w_ji R_j`` (``norm="layer"``) or ``c_ij = a_i w_ji R_j / s_j`` with
  ``s_j = Σ_i |a_i w_ji|`` (``norm="neuron"``, 0 where ``s_j = 0``; not at adds), then
  ``R_a = R̃_a · ‖R_z‖₁ / ‖R̃_a‖₁`` per sample (0 when ``‖R̃_a‖₁ = 0``). With
  ``skip="ratio"`` an ``Add`` uses ``c = (u / y) R_y`` (0 where ``y == 0``), not renormalised.
  A tensor read by several steps gets the sum of their relevance rescaled to the sum of their
  L1 norms; so does a max-pool's input (overlapping windows).
- The classic rules as zennit 0.5.1 defines them, on every ``Affine``: ``"lrp0"``,
  ``"epsilon"``, ``"zplus"``, ``"gamma"``, ``"alphabeta"``, ``"zbox"``, ``"flat"``,
  ``"wsquare"``; ``Norm`` (``c_ij = a_i m_ji R_j / stab(z_j)``) on ``Pool``, ``Scale`` and
  ``Add``; activations pass relevance through; max-pool gives it to the winner.
- The composites ``"EpsilonPlus"`` (conv: z⁺, linear: ε), ``"EpsilonGammaBox"`` (first conv:
  zB, other convs: γ, linear: ε) and ``"EpsilonPlusFlat"`` (first Affine of either kind: flat,
  convs: z⁺, linear: ε). "First" is the first in the plan's (forward) order.
- Any other assignment (a composite: rules chosen layer by layer) is given as a mapping
  ``{step index: (formula, params)}`` covering every linear step, the formulas being
  ``"rlrp"``, ``"rlrp_neuron"``, ``"ratio"`` (R-LRP's), ``"norm"``/``"lrp0"``/``"epsilon"``
  (param ``eps``), ``"zplus"``, ``"alphabeta"``, ``"gamma"``, ``"zbox"``, ``"flat"``,
  ``"wsquare"`` (params as in :func:`contributions`), and ``"pass"`` (``R_a = R_z``, for a
  lone BatchNorm). R-LRP steps renormalise against the L1 norm of the relevance arriving
  at them; forks and max-pools keep the arriving L1 mass only when every step is R-LRP's
  (or ``"pass"``), as for ``"rlrp"``; otherwise relevance is summed plainly.

Attention (``nn.MultiheadAttention``, ``scaled_dot_product_attention``) is written out as three
explicit per-sample matrices over (tokens × features) — output projection, value mixing with
``P`` held constant, value projection — R-LRP renormalising after each, the classic rules
dividing each by its own ``stab(z)`` (formulas ``"attention"``, ``"attention_eps"``, param
``eps``). Constants take nothing: an ``Add`` with constant operands is a bias (linear in its
tensors under every ``skip``), a ``Cat``'s constant slice is dropped and, for R-LRP, the other
slices are rescaled jointly to ``‖R_y‖₁``. A constant ``Pad``'s padded elements are constants
too: relevance arriving there is dropped and, for R-LRP, the input's part rescaled to
``‖R_y‖₁``.

Swin's shifted-window attention (``WindowAttention``) is written with explicit index
arithmetic: for every window and token, the input position it holds (after zero padding to
whole windows and the cyclic shift) or none (padding), and the region of the shifted map it
lies in (the shift mask); then the same three per-sample matrices as attention, over all
windows at once.

zennit's stabiliser is ``stab(z) = z + ε·(sign(z) + (z == 0))``; ``ε = 0`` leaves ``z``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from .plan import (Activation, Add, Affine, Attention, Broadcast, Cat, Constant, Gate, MaxPool,
                   Meta, Normalization, Opaque, Pad, Plan, Pool, Product, Reshape, Scale, Select,
                   SlotRef, WindowAttention)

DTYPE = torch.float64

# Each rule's options with zennit 0.5.1's defaults (restated here, not imported: the
# reference shares no code with the fast path).
RULE_OPTIONS: dict[str, dict[str, object]] = {
    "rlrp": {"skip": "linear", "norm": "layer"},
    "lrp0": {},
    "epsilon": {"epsilon": 1e-6},
    "zplus": {"stabilizer": 1e-6},
    "gamma": {"gamma": 0.25, "stabilizer": 1e-6},
    "alphabeta": {"alpha": 2.0, "beta": 1.0, "stabilizer": 1e-6},
    "zbox": {"low": None, "high": None, "stabilizer": 1e-6},
    "flat": {"stabilizer": 1e-6},
    "wsquare": {"stabilizer": 1e-6},
    "EpsilonPlus": {"epsilon": 1e-6, "stabilizer": 1e-6},
    "EpsilonGammaBox": {"low": None, "high": None, "epsilon": 1e-6, "gamma": 0.25,
                        "stabilizer": 1e-6},
    "EpsilonPlusFlat": {"epsilon": 1e-6, "stabilizer": 1e-6},
}
_NORM_STABILIZER = 1e-6  # Norm's ε for rules without a "stabilizer" option (lrp0, epsilon)


# =============================================================================================
# Records a test can inspect (reference_explain(..., trace=True))
# =============================================================================================
@dataclass
class LinearRecord:
    """One linear op of the backward pass, every tensor flattened per sample (float64).

    ``a`` (N, I) the op's input (an ``Add``'s operands concatenated), ``z`` (N, J) its output,
    ``bias`` (J,) (zeros where the op has none), ``matrix`` (J, I) the ``M`` of
    ``z = M a + b``, ``r_z`` (N, J) the relevance at the output, ``c`` (N, J, I) the
    contributions, ``r_tilde`` (N, I) ``Σ_j c_ij``, ``r_a`` (N, I) the relevance passed on
    (``r_tilde`` renormalised for R-LRP). ``formula`` names the rule applied
    (``"rlrp"``, ``"ratio"``, ``"norm"``, ``"epsilon"``, ``"zplus"``, …)."""

    step_index: int
    name: str
    kind: str
    formula: str
    a: torch.Tensor
    z: torch.Tensor
    bias: torch.Tensor
    matrix: torch.Tensor
    r_z: torch.Tensor
    c: torch.Tensor
    r_tilde: torch.Tensor
    r_a: torch.Tensor


@dataclass
class RoutingRecord:
    """One routing op (activation, max-pool, reshape, cat): ``r_z`` at its output and the
    relevance ``r_a`` it passed to each of its inputs, in their shapes."""

    step_index: int
    name: str
    kind: str
    r_z: torch.Tensor
    r_a: list[torch.Tensor]


# =============================================================================================
# Linear ops as explicit matrices
# =============================================================================================
@dataclass
class _LinearOp:
    """``z = M a + b`` for one sample, flattened. For an ``Affine``, ``index[j, i]`` is the
    flat position in ``weight`` of the weight connecting input ``i`` to output ``j`` (−1: not
    connected) and ``bias_index[j]`` the position in ``bias`` of output ``j``'s bias, so that
    the matrix of any modified weight (w⁺, w², ones, …) is ``matrix_of(modified)``."""

    matrix: torch.Tensor                 # (J, I)
    bias: torch.Tensor                   # (J,)
    out_shape: tuple[int, ...]           # non-batch shape of z
    in_shapes: list[tuple[int, ...]]     # non-batch shape of each input
    weight: torch.Tensor | None = None   # Affine: its raw weight (float64)
    raw_bias: torch.Tensor | None = None  # Affine: its raw bias (float64) or None
    index: torch.Tensor | None = None
    bias_index: torch.Tensor | None = None

    def matrix_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The matrix of the same connections carrying ``weight`` (shape of the raw weight)."""
        values = weight.reshape(-1)[self.index.clamp(min=0)]
        return torch.where(self.index >= 0, values, torch.zeros((), dtype=DTYPE))

    def bias_of(self, bias: torch.Tensor | None) -> torch.Tensor:
        """``bias`` (one entry per output channel/feature) expanded to every output element."""
        if bias is None:
            return torch.zeros(self.matrix.shape[0], dtype=DTYPE)
        return bias[self.bias_index]


def _ravel(coords: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """Row-major flat index of the multi-index ``coords`` in an array of ``shape``."""
    flat = torch.zeros_like(coords[0])
    for c, size in zip(coords, shape):
        flat = flat * size + c
    return flat


@lru_cache(maxsize=512)
def _conv_connections(weight_shape: tuple[int, ...], stride: tuple[int, ...],
                      padding: tuple[int, ...], dilation: tuple[int, ...], groups: int,
                      in_shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The patches of a ConvNd, as a connection table.

    Returns ``(index, out_shape)``: ``index`` (J, I) long holds, for output element ``j``
    (channel, position) and input element ``i`` (channel, position), the flat position in
    the weight tensor of the weight joining them, or −1 when ``j`` does not read ``i``."""
    c_out, c_in_group, *kernel = weight_shape
    c_in, *size = in_shape
    d = len(kernel)
    out_size = [(size[k] + 2 * padding[k] - dilation[k] * (kernel[k] - 1) - 1) // stride[k] + 1
                for k in range(d)]
    out_per_group = c_out // groups
    # One entry per (output channel, output position, input channel in its group, kernel offset).
    grid = torch.meshgrid(torch.arange(c_out), *[torch.arange(o) for o in out_size],
                          torch.arange(c_in_group), *[torch.arange(k) for k in kernel],
                          indexing="ij")
    co, o_pos, ci, k_off = grid[0], grid[1:1 + d], grid[1 + d], grid[2 + d:]
    # The input position this kernel offset reads: o·stride − padding + k·dilation.
    in_pos = [o_pos[k] * stride[k] - padding[k] + k_off[k] * dilation[k] for k in range(d)]
    # Reads that land in the zero padding contribute nothing: no connection.
    inside = torch.ones_like(co, dtype=torch.bool)
    for k in range(d):
        inside &= (in_pos[k] >= 0) & (in_pos[k] < size[k])
    # Output channel co belongs to group co // out_per_group, which reads that group's inputs.
    cin = (co // out_per_group) * c_in_group + ci
    j = _ravel([co, *o_pos], [c_out, *out_size])[inside]
    i = _ravel([cin, *in_pos], [c_in, *size])[inside]
    w = _ravel([co, ci, *k_off], weight_shape)[inside]
    index = torch.full((c_out * math.prod(out_size), c_in * math.prod(size)), -1,
                       dtype=torch.long)
    index[j, i] = w  # each (j, i) pair is met at most once: the offset is fixed by j and i
    return index, (c_out, *out_size)


@lru_cache(maxsize=512)
def _dense_connections(weight_shape: tuple[int, int], in_shape: tuple[int, ...]
                       ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``F.linear`` on an input of shape ``(*lead, in)``: output ``(t, o)`` reads inputs
    ``(t, q)`` through ``weight[o, q]``. Same table format as :func:`_conv_connections`."""
    out_f, in_f = weight_shape
    lead = math.prod(in_shape[:-1])
    t, o, q = torch.meshgrid(torch.arange(lead), torch.arange(out_f), torch.arange(in_f),
                             indexing="ij")
    index = torch.full((lead * out_f, lead * in_f), -1, dtype=torch.long)
    index[(t * out_f + o).reshape(-1), (t * in_f + q).reshape(-1)] = (o * in_f + q).reshape(-1)
    return index, (*in_shape[:-1], out_f)


def _affine_op(step: Affine, in_shape: tuple[int, ...]) -> _LinearOp:
    weight = step.effective_weight(DTYPE)
    bias = None if step.bias is None else step.bias.to(DTYPE)
    if step.conv_dims:
        index, out_shape = _conv_connections(tuple(weight.shape), tuple(step.stride),
                                             tuple(step.padding), tuple(step.dilation),
                                             step.groups, in_shape)
        bias_index = torch.arange(out_shape[0]).repeat_interleave(math.prod(out_shape[1:]))
    else:
        index, out_shape = _dense_connections(tuple(weight.shape), in_shape)
        bias_index = torch.arange(weight.shape[0]).repeat(math.prod(in_shape[:-1]))
    op = _LinearOp(matrix=torch.empty(0), bias=torch.empty(0), out_shape=out_shape,
                   in_shapes=[in_shape], weight=weight, raw_bias=bias, index=index,
                   bias_index=bias_index)
    op.matrix = op.matrix_of(weight)
    op.bias = op.bias_of(bias)
    return op


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _avg_pool_axis(length: int, k: int, s: int, p: int, ceil_mode: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis of an average pool: ``member`` (O, L) 1 where output ``o``'s window covers
    input ``l``; ``with_pad`` (O,) the window's length counting the zero padding (clipped
    to ``length + p`` as PyTorch does); ``inside`` (O,) its length without padding."""
    out = (length + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= length + p:
        out -= 1  # PyTorch: the last window must start inside the input or left padding
    member = torch.zeros(out, length, dtype=DTYPE)
    with_pad = torch.zeros(out, dtype=DTYPE)
    inside = torch.zeros(out, dtype=DTYPE)
    for o in range(out):
        start = o * s - p
        end = min(start + k, length + p)
        with_pad[o] = end - start
        start, end = max(start, 0), min(end, length)
        member[o, start:end] = 1.0
        inside[o] = end - start
    return member, with_pad, inside


def _adaptive_axis(length: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of an adaptive average pool: window ``o`` is
    ``[floor(o·L/O), ceil((o+1)·L/O))``. Returns ``member`` (O, L) and its lengths (O,)."""
    member = torch.zeros(out, length, dtype=DTYPE)
    for o in range(out):
        start = (o * length) // out
        end = -((-(o + 1) * length) // out)
        member[o, start:end] = 1.0
    return member, member.sum(1)


def _kron_all(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def _outer_all(vecs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row-major product of per-axis vectors: ``out[(o1, o2, …)] = v1[o1]·v2[o2]·…``."""
    out = vecs[0]
    for v in vecs[1:]:
        out = (out[:, None] * v[None, :]).reshape(-1)
    return out


def _pool_op(step: Pool, in_shape: tuple[int, ...]) -> _LinearOp:
    """Average pools and means as the explicit averaging matrix (no bias)."""
    p = step.params
    if step.kind == "mean":
        return _mean_op(p["dims"], p["keepdim"], in_shape)
    channels, *size = in_shape
    n = step.dims
    if step.kind == "adaptive_avg":
        out_size = _tuple(p["output_size"], n)
        axes = [_adaptive_axis(size[k], size[k] if out_size[k] is None else out_size[k])
                for k in range(n)]
        member = _kron_all([m for m, _ in axes])
        divisor = _outer_all([count for _, count in axes])
    else:
        kernel = _tuple(p["kernel_size"], n)
        stride = _tuple(p["stride"], n) if p["stride"] not in (None, (), []) else kernel
        padding = _tuple(p["padding"], n)
        axes = [_avg_pool_axis(size[k], kernel[k], stride[k], padding[k], p["ceil_mode"])
                for k in range(n)]
        member = _kron_all([m for m, _, _ in axes])
        if p.get("divisor_override"):
            divisor = torch.full((member.shape[0],), float(p["divisor_override"]), dtype=DTYPE)
        elif p["count_include_pad"]:
            divisor = _outer_all([w for _, w, _ in axes])
        else:
            divisor = _outer_all([i for _, _, i in axes])
    spatial = member / divisor[:, None]
    matrix = torch.kron(torch.eye(channels, dtype=DTYPE), spatial)  # channels never mix
    out_shape = (channels, *[m.shape[0] for m, *_ in axes])
    return _LinearOp(matrix=matrix, bias=torch.zeros(matrix.shape[0], dtype=DTYPE),
                     out_shape=out_shape, in_shapes=[in_shape])


def _mean_op(dims: Sequence[int], keepdim: bool, in_shape: tuple[int, ...]) -> _LinearOp:
    full = len(in_shape) + 1  # dims count the batch dim
    reduced = sorted(d % full - 1 for d in dims)  # as non-batch dims
    if any(d < 0 for d in reduced):
        raise ValueError("a mean over the batch dimension mixes samples")
    kept_shape = tuple(1 if k in reduced else s for k, s in enumerate(in_shape))
    count = math.prod(in_shape[k] for k in reduced)
    # Each input element goes to the output element with its reduced coordinates dropped.
    target = torch.arange(math.prod(kept_shape)).view(kept_shape).expand(in_shape).reshape(-1)
    matrix = torch.zeros(math.prod(kept_shape), math.prod(in_shape), dtype=DTYPE)
    matrix[target, torch.arange(matrix.shape[1])] = 1.0 / count
    out_shape = kept_shape if keepdim else tuple(
        s for k, s in enumerate(in_shape) if k not in reduced)
    return _LinearOp(matrix=matrix, bias=torch.zeros(matrix.shape[0], dtype=DTYPE),
                     out_shape=out_shape, in_shapes=[in_shape])


def _scale_op(step: Scale, in_shape: tuple[int, ...]) -> _LinearOp:
    """A lone BatchNorm: the diagonal map ``z = s·a + t`` with per-channel ``s``, ``t``."""
    per_channel = math.prod(in_shape[1:])
    s = step.scale.to(DTYPE).repeat_interleave(per_channel)
    t = step.shift.to(DTYPE).repeat_interleave(per_channel)
    return _LinearOp(matrix=torch.diag(s), bias=t, out_shape=in_shape, in_shapes=[in_shape])


def _add_op(shapes: list[tuple[int, ...]], negated: tuple[int, ...] = ()) -> _LinearOp:
    """``y = u + v + …`` (per-sample shapes that broadcast) as the linear map with unit
    weights on the concatenated operands (−1 for the operands at ``negated``: ``u − v``):
    output element ``k`` reads, of each operand, the element it broadcasts to ``k``."""
    out_shape = tuple(torch.broadcast_shapes(*shapes))
    size = math.prod(out_shape)
    blocks = []
    for i, shape in enumerate(shapes):
        aligned = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
        source = torch.arange(math.prod(shape)).view(aligned).expand(out_shape).reshape(-1)
        block = torch.zeros(size, math.prod(shape), dtype=DTYPE)
        block[torch.arange(size), source] = -1.0 if i in negated else 1.0
        blocks.append(block)
    return _LinearOp(matrix=torch.cat(blocks, dim=1), bias=torch.zeros(size, dtype=DTYPE),
                     out_shape=out_shape, in_shapes=list(shapes))


# =============================================================================================
# Forward pass
# =============================================================================================
def _resolve(obj, values: list):
    """Replace slot references in a step's arguments by the slots' values."""
    if isinstance(obj, SlotRef):
        return values[obj.slot]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_resolve(o, values) for o in obj)
    if isinstance(obj, dict):
        return {k: _resolve(v, values) for k, v in obj.items()}
    return obj


def _apply(op: _LinearOp, a_flat: torch.Tensor) -> torch.Tensor:
    """``z[n, j] = Σ_i M[j, i]·a[n, i] + b[j]`` by an explicit broadcast and sum."""
    return (op.matrix[None, :, :] * a_flat[:, None, :]).sum(dim=2) + op.bias[None, :]


@dataclass
class _Forward:
    values: list                          # slot → value
    ops: dict[int, _LinearOp]             # step index → linear op
    linear_inputs: dict[int, torch.Tensor]  # step index → a (N, I)
    linear_outputs: dict[int, torch.Tensor]  # step index → z (N, J)
    pool_indices: dict[int, torch.Tensor]  # step index → max-pool winners
    # slot → the dim holding the batch (None: a constant or no single dim)
    batch_dims: list = None


# Steps whose formula is per sample over a batch-first tensor: where the batch is another dim
# (a MultiheadAttention with batch_first=False and the ops around it), their tensors are read
# with the batch moved first, and relevance always travels batch first.
_PER_SAMPLE = (Affine, Pool, Scale, Add, Gate, Normalization, Attention, WindowAttention,
               Product)


def _per_sample_reads(step) -> list[int]:
    """The slots a per-sample step reads that carry the batch (masks keep their own layout)."""
    slots = list(step.inputs)
    if isinstance(step, Gate):
        slots.append(step.gate)
    if isinstance(step, Attention):
        slots += [step.query, step.key]
    if isinstance(step, Add):
        slots += step.bias_slots
    return slots


def _batch_first(t: torch.Tensor, b: int, rank: int) -> torch.Tensor:
    """``t`` with dim ``b`` of a ``rank``-dim layout moved first (missing leading dims are
    broadcast ones)."""
    t = t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))
    return t.movedim(b, 0)


def _sample_ids(shape, b: int | None, n: int) -> torch.Tensor:
    """Each element's sample (−1 for a constant's elements)."""
    if b is None:
        return torch.full(shape, -1, dtype=torch.long)
    view = [n if d == b else 1 for d in range(len(shape))]
    return torch.arange(n).view(view).expand(shape).contiguous()


def _batch_dim_of(ids: torch.Tensor, n: int) -> int | None:
    """The dim along which ``ids`` (routed :func:`_sample_ids`) is the sample index (a
    constant's elements, −1, belong to every sample)."""
    for d in range(ids.dim()):
        if ids.shape[d] == n and bool(((ids == _sample_ids(ids.shape, d, n)) | (ids < 0)).all()):
            return d
    return None


def _forward(plan: Plan, x: torch.Tensor) -> _Forward:
    values: list = [None] * plan.num_slots
    values[plan.input_slot] = x.to(DTYPE)
    fw = _Forward(values, {}, {}, {}, {}, [None] * plan.num_slots)
    fw.batch_dims[plan.input_slot] = 0
    n = x.shape[0]
    for k, step in enumerate(plan.steps):
        reads = _per_sample_reads(step)
        b = fw.batch_dims[step.inputs[0]] if step.inputs else None
        if isinstance(step, _PER_SAMPLE) and b not in (0, None):
            rank = max(values[s].dim() for s in reads)
            local = list(values)
            for slot in reads:
                local[slot] = _batch_first(values[slot], b, rank)
            out = _forward_step(k, step, local, fw).movedim(0, b)
        else:
            out = _forward_step(k, step, values, fw)
        values[step.output] = out
        if isinstance(step, (Reshape, Broadcast, Select, Cat)) and isinstance(out, torch.Tensor):
            read = step.operands if isinstance(step, Cat) and step.operands else step.inputs
            ids = [_sample_ids(tuple(values[s].shape), fw.batch_dims[s], n) for s in read]
            if isinstance(step, Cat):
                routed = torch.cat(ids, dim=step.dim)
            elif isinstance(step, Select):
                routed = step.apply(ids[0], _resolve(step.args, values),
                                    _resolve(step.kwargs, values))
            else:
                routed = step.fn(ids[0], *_resolve(step.args, values),
                                 **_resolve(step.kwargs, values))
            fw.batch_dims[step.output] = _batch_dim_of(routed, n)
        elif not isinstance(step, (Meta, Constant)):
            fw.batch_dims[step.output] = b
    return fw


def _forward_step(k, step, values, fw):
    """One step's output from the slot values ``values`` (its linear op recorded in ``fw``)."""
    args = [values[s] for s in step.inputs]
    if isinstance(step, (Affine, Pool, Scale, Add)):
        n = args[0].shape[0]
        shapes = [tuple(a.shape[1:]) for a in args]
        if isinstance(step, Affine):
            op = _affine_op(step, shapes[0])
        elif isinstance(step, Pool):
            op = _pool_op(step, shapes[0])
        elif isinstance(step, Scale):
            op = _scale_op(step, shapes[0])
        else:
            op = _add_op(shapes, step.negated)
        a_flat = torch.cat([a.reshape(n, -1) for a in args], dim=1)
        z_flat = _apply(op, a_flat)
        if isinstance(step, Add) and step.bias_slots:  # a bias, per sample (broadcast)
            added = sum(step.bias(values))
            z_flat = z_flat + torch.broadcast_to(added, (n, *op.out_shape)).reshape(n, -1)
        fw.ops[k], fw.linear_inputs[k], fw.linear_outputs[k] = op, a_flat, z_flat
        out = z_flat.view(n, *op.out_shape)
    elif isinstance(step, Activation):
        out = step.fn(args[0])
    elif isinstance(step, MaxPool):
        # step.fn only tells which element won each window; the value is read from a.
        _, winners = step.fn(args[0])
        a = args[0]
        out = a.flatten(2).gather(2, winners.flatten(2)).view(winners.shape)
        fw.pool_indices[k] = winners
    elif isinstance(step, (Reshape, Broadcast)):
        out = step.fn(args[0], *_resolve(step.args, values), **_resolve(step.kwargs, values))
    elif isinstance(step, Select):
        out = step.apply(args[0], _resolve(step.args, values), _resolve(step.kwargs, values))
    elif isinstance(step, Cat):
        out = torch.cat([values[s] for s in step.operands] or args, dim=step.dim)
    elif isinstance(step, Attention):
        out = _attention(step, args[0], values[step.query], values[step.key],
                         [values[m] for m in step.mask_slots])[-1]
    elif isinstance(step, WindowAttention):
        out = _window_attention(step, args[0])["y"]
    elif isinstance(step, Pad):
        out = torch.nn.functional.pad(args[0], tuple(_resolve(step.pad, values)),
                                      value=step.value)
    elif isinstance(step, Gate):
        out = args[0] * values[step.gate] if step.kind == "mul" else \
            _gate_terms(step, args[0], values[step.gate]).sum(-2)
    elif isinstance(step, Product):
        u, v = args
        out = u * v if step.kind == "mul" else _product_terms(u, v).sum(-2)
    elif isinstance(step, Constant):
        out = step.value.to(DTYPE) if step.value.is_floating_point() else step.value
    elif isinstance(step, Normalization):
        out = _normalization(step, args[0])
    elif isinstance(step, (Meta, Opaque)):
        out = step.fn(*_resolve(step.args, values), **_resolve(step.kwargs, values))
    else:
        raise NotImplementedError(f"the reference has no forward for {type(step).__name__}")
    return out


def reference_forward(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """The plan's output for ``x``, computed in float64 by the reference's own forward."""
    with torch.no_grad():
        return _forward(plan, x).values[plan.output_slot]


# =============================================================================================
# Rules in contribution form: each returns c (N, J, I)
# =============================================================================================
def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    """zennit's stabiliser ``z + ε·(sign(z) + (z == 0))``."""
    return z + eps * (z.sign() + (z == 0).to(DTYPE))


def _pos(t):
    return None if t is None else t.clamp(min=0)


def _neg(t):
    return None if t is None else t.clamp(max=0)


def _c_rlrp(op, a, z, r, **_):
    """``c_ij = a_i · w_ji · R_j`` (no division)."""
    return a[:, None, :] * op.matrix[None] * r[:, :, None]


def _c_rlrp_neuron(op, a, z, r, **_):
    """``c_ij = a_i · w_ji · R_j / s_j``, ``s_j = Σ_i |a_i · w_ji|`` (0 where ``s_j = 0``)."""
    c = a[:, None, :] * op.matrix[None]
    s = c.abs().sum(dim=2)
    share = torch.where(s > 0, r / torch.where(s > 0, s, torch.ones_like(s)),
                        torch.zeros_like(s))
    return c * share[:, :, None]


def _c_ratio(op, a, z, r, **_):
    """``skip="ratio"`` at an add: ``c_ij = a_i · m_ji · R_j / y_j``, 0 where ``y_j == 0``."""
    share = torch.where(z != 0, r / torch.where(z != 0, z, torch.ones_like(z)),
                        torch.zeros_like(z))
    return a[:, None, :] * op.matrix[None] * share[:, :, None]


def _c_epsilon(op, a, z, r, eps, **_):
    """LRP-ε (LRP-0 for ε = 0) and zennit's Norm: ``c_ij = a_i w_ji R_j / stab(z_j)``."""
    return a[:, None, :] * op.matrix[None] * (r / _stab(z, eps))[:, :, None]


def _two_sign_group(op, a, w_for_pos, b, w_for_neg):
    """``p_ij = a_i⁺ v_ji + a_i⁻ u_ji`` and ``z_j = Σ_i p_ij + b_j`` for one group of the
    z⁺/αβ/γ family (``v`` the weight applied to positive inputs, ``u`` to negative ones)."""
    p = (a.clamp(min=0)[:, None, :] * op.matrix_of(w_for_pos)[None]
         + a.clamp(max=0)[:, None, :] * op.matrix_of(w_for_neg)[None])
    return p, p.sum(dim=2) + op.bias_of(b)[None]


def _c_zplus(op, a, z, r, stabilizer, **_):
    """z⁺: ``c_ij = (a_i⁺ w_ji⁺ + a_i⁻ w_ji⁻) R_j / stab(Σ_i (…) + b_j⁺)``."""
    w, b = op.weight, op.raw_bias
    p, zp = _two_sign_group(op, a, _pos(w), _pos(b), _neg(w))
    return p * (r / _stab(zp, stabilizer))[:, :, None]


def _c_alphabeta(op, a, z, r, alpha, beta, stabilizer, **_):
    """αβ: ``c_ij = α p_ij R_j / stab(z⁺_j) − β q_ij R_j / stab(z⁻_j)`` with
    ``p = a⁺w⁺ + a⁻w⁻`` (bias b⁺) and ``q = a⁺w⁻ + a⁻w⁺`` (bias b⁻)."""
    w, b = op.weight, op.raw_bias
    p, zp = _two_sign_group(op, a, _pos(w), _pos(b), _neg(w))
    q, zq = _two_sign_group(op, a, _neg(w), _neg(b), _pos(w))
    return (alpha * p * (r / _stab(zp, stabilizer))[:, :, None]
            - beta * q * (r / _stab(zq, stabilizer))[:, :, None])


def _c_gamma(op, a, z, r, gamma, stabilizer, **_):
    """γ (zennit's generalised form), with ``w↑ = w + γw⁺``, ``w↓ = w + γw⁻`` (same for b):
    outputs with ``z_j > 0`` use ``p = a⁺w↑ + a⁻w↓`` (bias b↑), outputs with ``z_j < 0`` use
    ``q = a⁺w↓ + a⁻w↑`` (bias b↓); ``c_ij = p_ij R_j / stab(z↑_j)`` resp. with q."""
    w, b = op.weight, op.raw_bias
    w_up, w_down = w + gamma * _pos(w), w + gamma * _neg(w)
    b_up = None if b is None else b + gamma * _pos(b)
    b_down = None if b is None else b + gamma * _neg(b)
    p, zp = _two_sign_group(op, a, w_up, b_up, w_down)
    q, zq = _two_sign_group(op, a, w_down, b_down, w_up)
    up = (z > 0).to(DTYPE) * r / _stab(zp, stabilizer)
    down = (z < 0).to(DTYPE) * r / _stab(zq, stabilizer)
    return p * up[:, :, None] + q * down[:, :, None]


def _c_zbox(op, a, z, r, low, high, stabilizer, **_):
    """zB: ``c_ij = (a_i w_ji − l_i w_ji⁺ − h_i w_ji⁻) R_j / stab(zB_j)`` with
    ``zB_j = (Σ_i a_i w_ji + b_j) − (Σ_i l_i w_ji⁺ + b_j⁺) − (Σ_i h_i w_ji⁻ + b_j⁻)``."""
    w, b = op.weight, op.raw_bias
    m, m_pos, m_neg = op.matrix, op.matrix_of(_pos(w)), op.matrix_of(_neg(w))
    terms = (a[:, None, :] * m[None] - low[:, None, :] * m_pos[None]
             - high[:, None, :] * m_neg[None])
    zb = ((a[:, None, :] * m[None]).sum(2) + op.bias_of(b)
          - ((low[:, None, :] * m_pos[None]).sum(2) + op.bias_of(_pos(b)))
          - ((high[:, None, :] * m_neg[None]).sum(2) + op.bias_of(_neg(b))))
    return terms * (r / _stab(zb, stabilizer))[:, :, None]


def _c_flat(op, a, z, r, stabilizer, **_):
    """flat: every connection weighs 1, the input is 1, no bias:
    ``c_ij = 1[j reads i] R_j / stab(#inputs j reads)``."""
    ones = op.matrix_of(torch.ones_like(op.weight))
    return ones[None] * (r / _stab(ones.sum(1)[None], stabilizer))[:, :, None]


def _c_pass(op, a, z, r, **_):
    """``Pass``: ``c_ij = R_j`` for ``i = j`` (the output has the input's shape)."""
    if op.matrix.shape[0] != op.matrix.shape[1]:
        raise ValueError("pass needs an op whose output has its input's shape")
    return torch.diag_embed(r)


def _c_wsquare(op, a, z, r, stabilizer, **_):
    """w²: ``c_ij = w_ji² R_j / stab(Σ_i w_ji² + b_j²)`` (the input is replaced by 1)."""
    sq = op.matrix_of(op.weight ** 2)
    b_sq = None if op.raw_bias is None else op.raw_bias ** 2
    zw = sq.sum(1) + op.bias_of(b_sq)
    return sq[None] * (r / _stab(zw[None], stabilizer))[:, :, None]


_CONTRIBUTIONS = {"rlrp": _c_rlrp, "rlrp_neuron": _c_rlrp_neuron, "ratio": _c_ratio,
                  "norm": _c_epsilon, "lrp0": _c_epsilon, "epsilon": _c_epsilon,
                  "zplus": _c_zplus, "alphabeta": _c_alphabeta,
                  "gamma": _c_gamma, "zbox": _c_zbox, "flat": _c_flat, "wsquare": _c_wsquare,
                  "pass": _c_pass}
_MASS_KEEPING = ("rlrp", "rlrp_neuron", "ratio", "pass", "gate", "normalization", "pass_signal",
                 "attention", "product")
# formulas of steps that are not a linear map of all their inputs (written out on their own)
_ELEMENTWISE = ("gate", "normalization", "pass_signal", "attention", "attention_eps", "product",
                "product_uniform")


def contributions(formula: str, op: _LinearOp, a: torch.Tensor, z: torch.Tensor,
                  r: torch.Tensor, **params) -> torch.Tensor:
    """``c[n, j, i]`` of ``formula`` for the linear op ``op`` with input ``a`` (N, I), output
    ``z`` (N, J) and relevance ``r`` (N, J) at its output."""
    return _CONTRIBUTIONS[formula](op, a, z, r, **params)


# =============================================================================================
# Which formula each step gets
# =============================================================================================
def _formulas(plan: Plan, rule: str, options: dict) -> dict[int, tuple[str, dict]]:
    """Step index → (formula, its parameters) for every linear step (Affine/Pool/Scale/Add)."""
    out: dict[int, tuple[str, dict]] = {}
    stab = float(options.get("stabilizer", _NORM_STABILIZER))
    first_any = next((k for k, s in enumerate(plan.steps) if isinstance(s, Affine)), None)
    first_conv = next((k for k, s in enumerate(plan.steps)
                       if isinstance(s, Affine) and s.conv_dims), None)
    for k, step in enumerate(plan.steps):
        if not isinstance(step, (Affine, Pool, Scale, Add, Gate, Normalization, Attention,
                                 WindowAttention, Product)):
            continue
        if isinstance(step, Product):  # the layer form under both norms; LXT's uniform rule
            out[k] = ("product", {}) if rule == "rlrp" else (
                "product_uniform", {"eps": stab})
            continue
        if isinstance(step, (Attention, WindowAttention)):
            out[k] = ("attention", {"norm": options["norm"]}) if rule == "rlrp" else (
                "attention_eps", {"eps": _attention_epsilon(step, rule, options, stab)})
            continue
        if isinstance(step, Gate) and step.kind == "matmul" and rule != "rlrp":
            out[k] = ("gate_eps", {"eps": stab})  # no signal passes a matmul unchanged
            continue
        if isinstance(step, (Gate, Normalization)):  # the classic rules: the signal takes R
            kind = "gate" if isinstance(step, Gate) else "normalization"
            out[k] = ((kind, {"norm": options["norm"]}) if rule == "rlrp"
                      else ("pass_signal", {}))
            continue
        if rule == "rlrp":
            if isinstance(step, Add):  # adds never take the neuron form
                # an add with a constant (a bias) is linear in its tensors under every skip
                ratio = options["skip"] == "ratio" and not step.bias_slots
                out[k] = ("ratio", {}) if ratio else ("rlrp", {})
            else:
                out[k] = ("rlrp_neuron" if options["norm"] == "neuron" else "rlrp", {})
            continue
        if not isinstance(step, Affine):
            out[k] = ("norm", {"eps": stab})
            continue
        name = rule
        if rule == "EpsilonPlus":
            name = "zplus" if step.conv_dims else "epsilon"
        elif rule == "EpsilonGammaBox":
            name = "zbox" if k == first_conv else ("gamma" if step.conv_dims else "epsilon")
        elif rule == "EpsilonPlusFlat":
            name = "flat" if k == first_any else ("zplus" if step.conv_dims else "epsilon")
        params = {
            "lrp0": {"eps": 0.0},
            "epsilon": {"eps": float(options.get("epsilon", 1e-6))},
            "zplus": {"stabilizer": stab},
            "alphabeta": {"alpha": float(options.get("alpha", 2.0)),
                          "beta": float(options.get("beta", 1.0)), "stabilizer": stab},
            "gamma": {"gamma": float(options.get("gamma", 0.25)), "stabilizer": stab},
            "zbox": {"low": options.get("low"), "high": options.get("high"),
                     "stabilizer": stab},
            "flat": {"stabilizer": stab},
            "wsquare": {"stabilizer": stab},
        }[name]
        out[k] = (name, params)
    return out


def _attention_epsilon(step, rule: str, options: dict, stab: float) -> float:
    """The classic rules' ε at attention: a MultiheadAttention or Swin's window attention gets
    the dense layers' ε (``lrp0``: 0; ``epsilon`` and the composites: their ``epsilon``);
    otherwise (rules that do not apply to attention, scaled_dot_product_attention) the base
    ``Norm``'s stabiliser."""
    if isinstance(step, Attention) and step.out_weight is None:
        return stab
    if rule == "lrp0":
        return 0.0
    if rule in ("epsilon", "EpsilonPlus", "EpsilonGammaBox", "EpsilonPlusFlat"):
        return float(options.get("epsilon", 1e-6))
    return stab


def _bound(value, a: torch.Tensor) -> torch.Tensor:
    """zB's ``low``/``high`` as a full (N, I) tensor: a scalar, or a tensor broadcastable to
    the input's shape *with* its batch dimension (zennit's convention, e.g. ``(1, C, 1, 1)``)."""
    t = torch.as_tensor(value, dtype=DTYPE)
    if t.dim() not in (0, a.dim()):
        raise ValueError(f"low/high of shape {tuple(t.shape)} do not broadcast to the input "
                         f"{tuple(a.shape)}: pass a scalar or a tensor like (1, C, 1, ...)")
    return t.expand(a.shape).reshape(a.shape[0], -1)


# =============================================================================================
# The relevance pass
# =============================================================================================
def _l1(t: torch.Tensor) -> torch.Tensor:
    """``‖t‖₁`` per sample, shape (N,)."""
    return t.abs().reshape(t.shape[0], -1).sum(dim=1)


def _renormalise(r_tilde: torch.Tensor, r_z: torch.Tensor) -> torch.Tensor:
    """``R_a = R̃_a · ‖R_z‖₁ / ‖R̃_a‖₁`` per sample; 0 where ``‖R̃_a‖₁ = 0``."""
    return _rescale(r_tilde, _l1(r_z))


def _rescale(t: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """``t`` scaled per sample to L1 norm ``mass``; 0 where ``t`` is all 0."""
    den = _l1(t)
    factor = torch.where(den > 0, mass / torch.where(den > 0, den, torch.ones_like(den)),
                         torch.zeros_like(den))
    return t * factor.view(-1, *([1] * (t.dim() - 1)))


def _route_by_index(fn, shapes: list[tuple[int, ...]], r_z: torch.Tensor) -> list[torch.Tensor]:
    """Relevance through an element-preserving op: run the op on the *positions* of the
    input elements (an integer tensor), which says where each input element went, and
    send each output element's relevance back to the input element it came from."""
    sizes = [math.prod(s) for s in shapes]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    positions = fn([torch.arange(o, o + n).view(s) for o, n, s in zip(offsets, sizes, shapes)])
    r_all = torch.zeros(sum(sizes), dtype=DTYPE)
    r_all.index_add_(0, positions.reshape(-1), r_z.reshape(-1).to(DTYPE))
    return [r_all[o:o + n].view(s) for o, n, s in zip(offsets, sizes, shapes)]


def reference_explain(plan: Plan, x: torch.Tensor, rule: str | dict = "rlrp",
                      target: int | torch.Tensor | None = None,
                      output_relevance: torch.Tensor | None = None, trace: bool = False,
                      **options):
    """Explain ``x`` with the plan's model, in float64, term by term.

    Args:
        plan: from :func:`rlrp_fast.capture.capture`.
        x: input batch ``(N, ...)``; converted to float64.
        rule: see the module docstring (``"rlrp"``, a classic rule or a composite), or a
            per-step assignment ``{step index: (formula, params)}`` (no ``options`` then).
        target: class per sample (None: arg-max of the logits; int; or (N,) tensor).
        output_relevance: instead of ``target``, the relevance at the logits ``(N, classes)``.
        trace: also return the records of every linear and routing op (backward order).
        **options: the rule's options (``skip``, ``epsilon``, ``gamma``, ``alpha``, ``beta``,
            ``stabilizer``, ``low``, ``high``), zennit's defaults otherwise.

    Returns:
        ``(relevance, logits)``: relevance float64 of ``x``'s shape, logits float64
        ``(N, classes)``; ``(relevance, logits, records)`` when ``trace``.
    """
    if isinstance(rule, dict):
        if options:
            raise TypeError("a per-step assignment carries its own parameters; got options "
                            f"{sorted(options)}")
        with torch.no_grad():
            return _explain(plan, x, _check_assignment(plan, rule), target, output_relevance,
                            trace)
    if rule not in RULE_OPTIONS:
        raise ValueError(f"unknown rule {rule!r}; choose one of {sorted(RULE_OPTIONS)}")
    unknown = set(options) - set(RULE_OPTIONS[rule])
    if unknown:
        raise TypeError(f"rule {rule!r} takes no option(s) {sorted(unknown)}")
    options = {**RULE_OPTIONS[rule], **options}
    if "low" in options and (options["low"] is None or options["high"] is None):
        raise ValueError(f"rule {rule!r} needs low=... and high=... (the input's bounds)")
    if rule == "rlrp" and options["skip"] not in ("linear", "ratio"):
        raise ValueError(f"skip must be 'linear' or 'ratio', got {options['skip']!r}")
    if rule == "rlrp" and options["norm"] not in ("layer", "neuron"):
        raise ValueError(f"norm must be 'layer' or 'neuron', got {options['norm']!r}")
    with torch.no_grad():
        return _explain(plan, x, _formulas(plan, rule, options), target, output_relevance,
                        trace)


def _check_assignment(plan: Plan, assignment: dict) -> dict[int, tuple[str, dict]]:
    """A per-step assignment, checked: exactly the linear steps, known formulas."""
    linear = {k for k, s in enumerate(plan.steps)
              if isinstance(s, (Affine, Pool, Scale, Add, Gate, Normalization, Attention,
                                WindowAttention, Product))}
    if set(assignment) != linear:
        raise ValueError(f"the assignment must cover exactly the linear steps {sorted(linear)}; "
                         f"got {sorted(assignment)}")
    out = {}
    for k, (formula, params) in assignment.items():
        if formula not in _CONTRIBUTIONS and formula not in _ELEMENTWISE:
            raise ValueError(f"step {k}: unknown formula {formula!r}")
        out[k] = (formula, dict(params))
    return out


def _explain(plan, x, formulas, target, output_relevance, trace):
    fw = _forward(plan, x)
    logits = fw.values[plan.output_slot]
    n = logits.shape[0]

    # Output relevance: the target's logit, 0 for every other class (or the caller's).
    if output_relevance is not None:
        r_out = output_relevance.to(DTYPE).clone()
    else:
        if target is None:
            target = logits.argmax(dim=1)
        target = torch.as_tensor(target).long().expand(n)
        r_out = torch.zeros_like(logits)
        for s in range(n):
            r_out[s, target[s]] = logits[s, target[s]]

    # relevance keeps its L1 mass at forks and max-pools when every step is R-LRP's
    keeps_mass = all(f in _MASS_KEEPING for f, _ in formulas.values())
    records: list = []
    # per slot, the relevance arriving from each consumer (summed when the slot is read)
    arrived: list[list[torch.Tensor]] = [[] for _ in range(plan.num_slots)]
    arrived[plan.output_slot].append(r_out)
    for k in range(len(plan.steps) - 1, -1, -1):
        step = plan.steps[k]
        if not arrived[step.output] or isinstance(step, Meta):
            continue
        r_z = _fork(arrived[step.output], keeps_mass)  # batch first, as all relevance
        values = fw.values
        b = fw.batch_dims[step.inputs[0]] if step.inputs else None
        if isinstance(step, _PER_SAMPLE) and b is None:
            raise NotImplementedError(f"{step.name}: no single dim of its input holds the "
                                      "batch (a view merged it with another): samples mix")
        if isinstance(step, _PER_SAMPLE) and b != 0:  # read batch first
            reads = _per_sample_reads(step)
            rank = max(values[s].dim() for s in reads)
            values = list(values)
            for slot in reads:
                values[slot] = _batch_first(fw.values[slot], b, rank)
        inputs = [values[s] for s in step.inputs]
        if isinstance(step, Gate):
            parts = [_gate_backward(step, r_z, inputs[0], values[step.gate], *formulas[k])]
            records.append(RoutingRecord(k, step.name, type(step).__name__, r_z, parts))
        elif isinstance(step, Normalization):
            parts = [_normalization_backward(step, r_z, inputs[0], *formulas[k])]
            records.append(RoutingRecord(k, step.name, type(step).__name__, r_z, parts))
        elif isinstance(step, Product):
            parts = _product_backward(step, r_z, *inputs, *formulas[k])
            records.append(RoutingRecord(k, step.name, type(step).__name__, r_z, parts))
        elif isinstance(step, Attention):
            parts = [_attention_backward(step, r_z, inputs[0], values[step.query],
                                         values[step.key], [values[m] for m in step.mask_slots],
                                         *formulas[k])]
            records.append(RoutingRecord(k, step.name, type(step).__name__, r_z, parts))
        elif isinstance(step, WindowAttention):
            parts = [_window_attention_backward(step, r_z, inputs[0], *formulas[k])]
            records.append(RoutingRecord(k, step.name, type(step).__name__, r_z, parts))
        elif isinstance(step, Cat) and step.operands:
            parts = _cat_with_constants(step, r_z, fw, keeps_mass)
            records.append(RoutingRecord(k, step.name, type(step).__name__, r_z, parts))
        elif k in formulas:
            parts = _linear_backward(k, step, fw, r_z, formulas[k], records, inputs)
        else:  # routing: in the forward's layout
            r_here = _in_layout(r_z, fw.batch_dims[step.output], step)
            parts = _route_backward(step, r_here, inputs, fw.pool_indices.get(k), fw.values)
            parts = [_in_layout(p, fw.batch_dims[s], step, back=True)
                     for p, s in zip(parts, step.inputs)]
            if keeps_mass and isinstance(step, (MaxPool, Broadcast, Pad)):
                # overlapping windows, copies, may sum opposite signs; a pad's constants take
                # nothing: keep the arriving L1 mass
                parts = [_renormalise(parts[0], r_z)]
            records.append(RoutingRecord(k, step.name, type(step).__name__, r_z, parts))
        for slot, part in zip(step.inputs, parts):
            arrived[slot].append(part)
    if not arrived[plan.input_slot]:
        raise ValueError("the model's output does not depend on its input")
    relevance = _fork(arrived[plan.input_slot], keeps_mass)
    return (relevance, logits, records) if trace else (relevance, logits)


def _fork(parts: list[torch.Tensor], keeps_mass: bool) -> torch.Tensor:
    """Relevance of a tensor read by several consumers: the sum of what each sends back; for
    R-LRP rescaled to the sum of their L1 norms (the spec's fork rule)."""
    total = sum(parts)
    if not keeps_mass or len(parts) == 1:
        return total
    return _rescale(total, sum(_l1(p) for p in parts))


def _linear_backward(k, step, fw, r_z, formula_params, records, inputs):
    formula, params = formula_params
    op, a, z = fw.ops[k], fw.linear_inputs[k], fw.linear_outputs[k]
    n = a.shape[0]
    r = r_z.reshape(n, -1)
    if formula == "zbox":
        params = {**params, "low": _bound(params["low"], inputs[0]),
                  "high": _bound(params["high"], inputs[0])}
    c = contributions(formula, op, a, z, r, **params)
    r_tilde = c.sum(dim=1)                       # R̃_a[i] = Σ_j c_ij
    r_a = _renormalise(r_tilde, r) if formula in ("rlrp", "rlrp_neuron") else r_tilde
    records.append(LinearRecord(k, step.name, type(step).__name__, formula, a, z, op.bias,
                                op.matrix, r, c, r_tilde, r_a))
    sizes = [math.prod(s) for s in op.in_shapes]
    return [part.view(n, *s) for part, s in zip(r_a.split(sizes, dim=1), op.in_shapes)]


def _normalization_parts(step: Normalization, x: torch.Tensor):
    """One sample's elements (flattened) with the group each belongs to: ``x`` (N, I), the
    group matrix ``same`` (I, I) (1 where elements ``i`` and ``j`` are normalised together),
    the group size ``n``, ``μ`` and ``σ`` of each element's group (N, I), and ``γ``, ``β``
    per element (I,). LayerNorm/RMSNorm group the elements that differ only in ``dims``;
    GroupNorm those whose channel (dim 1) is in the same block of ``C / num_groups``."""
    shape = tuple(x.shape[1:])
    coords = torch.meshgrid(*[torch.arange(k) for k in shape], indexing="ij")
    if step.kind == "group":
        group = coords[0] // (shape[0] // step.num_groups)
    else:  # the coordinates outside ``dims`` name the group
        normalised = {d % (len(shape) + 1) - 1 for d in step.dims}
        kept = [k for k in range(len(shape)) if k not in normalised]
        group = _ravel([coords[k] for k in kept], [shape[k] for k in kept]) if kept \
            else torch.zeros(shape, dtype=torch.long)
    group = group.reshape(-1)
    same = (group[:, None] == group[None, :]).to(DTYPE)
    n = same.sum(1)                                                   # (I,) its group's size
    flat = x.to(DTYPE).reshape(x.shape[0], -1)
    eps = torch.finfo(DTYPE).eps if step.eps is None else step.eps
    if step.kind == "rms":
        mean = torch.zeros_like(flat)
        sigma = torch.sqrt(flat ** 2 @ same / n + eps)
    else:
        mean = flat @ same / n
        sigma = torch.sqrt((flat - mean) ** 2 @ same / n + eps)
    def per_element(t):
        if t is None:
            return None
        t = t.to(DTYPE)
        if step.kind == "group":
            t = t.view(-1, *([1] * (len(shape) - 1)))
        return torch.broadcast_to(t, shape).reshape(-1)
    ones = torch.ones(flat.shape[1], dtype=DTYPE)
    gamma = per_element(step.weight)
    return flat, same, n, mean, sigma, ones if gamma is None else gamma, per_element(step.bias)


def _normalization(step: Normalization, x: torch.Tensor) -> torch.Tensor:
    flat, _, _, mean, sigma, gamma, beta = _normalization_parts(step, x)
    out = (flat - mean) / sigma * gamma
    return (out if beta is None else out + beta).view(x.shape)


def _normalization_backward(step, r_z, x, formula, options) -> torch.Tensor:
    """σ held constant, a normalisation is the linear map
    ``J_ji = γ_j/σ_j (δ_ji − [i, j in one group]/n)`` (RMSNorm: ``γ_j/σ_j δ_ji``) on the
    whole sample: R-LRP's contributions ``c_ij = x_i J_ji R_j`` (``norm="neuron"``: divided
    by ``s_j = Σ_i |x_i J_ji|``), written out as the full matrix, then renormalised per
    sample. Classic rules: identity (LXT)."""
    if formula == "pass_signal":
        return r_z.to(DTYPE)
    flat, same, n, _, sigma, gamma, _ = _normalization_parts(step, x)
    eye = torch.eye(flat.shape[1], dtype=DTYPE)
    centring = eye if step.kind == "rms" else eye - same / n[:, None]  # [j, i]
    jac = (gamma / sigma)[:, :, None] * centring                      # (N, J, I)
    r = r_z.to(DTYPE).reshape(flat.shape)
    c = flat[:, None, :] * jac * r[:, :, None]                        # c[n, j, i]
    if options["norm"] == "neuron":
        s = (flat[:, None, :] * jac).abs().sum(2, keepdim=True)
        c = torch.where(s > 0, c / torch.where(s > 0, s, torch.ones_like(s)),
                        torch.zeros_like(c))
    return _renormalise(c.sum(1), r).view(x.shape)


def _in_layout(r: torch.Tensor, b: int | None, step, back: bool = False) -> torch.Tensor:
    """Batch-first relevance in a tensor's forward layout (batch dim ``b``), or ``back``."""
    if b is None:
        raise NotImplementedError(f"{step.name}: no single dim of its tensor holds the batch")
    return r.movedim(b, 0) if back else r.movedim(0, b)


def _cat_with_constants(step, r_z, fw, keeps_mass) -> list[torch.Tensor]:
    """``cat`` with constant operands (a class token): each operand's slice as for any cat,
    the constants' slices dropped; for R-LRP the others jointly rescaled to ``‖R_y‖₁`` (the
    constant's share goes back to the inputs, as a bias's does). Batch first in and out."""
    shapes = [tuple(fw.values[s].shape) for s in step.operands]
    r_here = _in_layout(r_z, fw.batch_dims[step.output], step)
    every = _route_by_index(lambda pos: torch.cat(pos, dim=step.dim), shapes, r_here)
    kept = [_in_layout(p, fw.batch_dims[s], step, back=True)
            for p, s in zip(every, step.operands) if s in step.inputs]
    if not keeps_mass:
        return kept
    n = r_z.shape[0]
    joint = _rescale(torch.cat([p.reshape(n, -1) for p in kept], 1), _l1(r_z))
    sizes = [p[0].numel() for p in kept]
    return [j.view(p.shape) for j, p in zip(joint.split(sizes, 1), kept)]


def _blocked(step: Attention, masks, scores: torch.Tensor):
    """The scores with the masks applied, each by its own convention: a MultiheadAttention's
    bool ``attn_mask`` and ``key_padding_mask`` (N, S) block where True, SDPA's bool mask
    allows where True; float masks are added; ``attn_mask`` of a MultiheadAttention may be
    (N·H, L, S); a causal mask blocks key ``s > l``. Blocked scores become −∞."""
    mha = step.v_weight is not None
    n, length, source = scores.shape[0], scores.shape[-2], scores.shape[-1]
    masks = list(masks)
    if step.mask is not None:
        mask = masks.pop(0)
        if mha and mask.dim() == 3:
            mask = mask.reshape(n, -1, length, source)
        if mask.dtype == torch.bool:
            blocked = mask if mha else ~mask
            scores = scores.masked_fill(blocked, float("-inf"))
        else:
            scores = scores + mask.to(DTYPE)
    if step.padding_mask is not None:
        pad = masks.pop(0)[:, None, None, :]
        scores = (scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool
                  else scores + pad.to(DTYPE))
    if step.causal:
        later = torch.arange(source)[None, :] > torch.arange(length)[:, None]
        scores = scores.masked_fill(later, float("-inf"))
    return scores


def _attention(step: Attention, xv, xq, xk, masks=()):
    """The attention step written out in float64, batch first: ``q, k, v`` per head
    ``(N, H, L, d)`` (as given for scaled_dot_product_attention),
    ``P = softmax(q kᵀ·scale + masks)``, ``o = P v`` (heads merged: ``(N, L, H·d)``) and the
    output ``o W_oᵀ + b_o``. Returns ``(v, P, o, out)``."""
    xv, xq, xk = (t.to(DTYPE) for t in (xv, xq, xk))

    def project(x, w, b):
        y = torch.einsum("nle,fe->nlf", x, w.to(DTYPE))
        if b is not None:
            y = y + b.to(DTYPE)
        return y.reshape(*y.shape[:2], step.num_heads, -1).permute(0, 2, 1, 3)

    if step.v_weight is None:
        q, k, v = xq, xk, xv
    else:
        q, k, v = (project(xq, step.q_weight, step.q_bias), project(xk, step.k_weight, step.k_bias),
                   project(xv, step.v_weight, step.v_bias))
    scale = step.scale if step.scale is not None else 1 / math.sqrt(q.shape[-1])
    scores = _blocked(step, masks, torch.einsum("...ld,...sd->...ls", q, k) * scale)
    peak = scores.amax(-1, keepdim=True)
    blocked = peak == float("-inf")  # every key masked: the row attends to nothing (torch's)
    e = torch.exp(scores - torch.where(blocked, 0.0, peak))
    total = e.sum(-1, keepdim=True)
    p = e / torch.where(blocked, 1.0, total)
    o = torch.einsum("...ls,...sd->...ld", p, v)
    if step.v_weight is None:
        return v, p, o, o
    o = o.permute(0, 2, 1, 3).reshape(o.shape[0], o.shape[2], -1)
    out = torch.einsum("nle,fe->nlf", o, step.out_weight.to(DTYPE))
    if step.out_bias is not None:
        out = out + step.out_bias.to(DTYPE)
    return v, p, o, out


def _dense_rule(a, matrix, bias, r, formula, options) -> torch.Tensor:
    """One linear sub-step of attention for flattened samples: ``a`` (N, I), ``matrix``
    (J, I) or per sample (N, J, I), ``bias`` (J,) or None, ``r`` (N, J). Contributions
    ``c_ij = a_i M_ji R_j`` (R-LRP; ``norm="neuron"``: over ``s_j = Σ_i |a_i M_ji|``; then
    renormalised to ``‖R‖₁``) or ``a_i M_ji R_j / stab(z_j)`` (ε), summed over ``j``."""
    m = matrix if matrix.dim() == 3 else matrix[None]
    terms = a[:, None, :] * m                                          # a_i M_ji
    if formula == "attention_eps":
        z = terms.sum(2) + (0 if bias is None else bias)
        return (terms * (r / _stab(z, options["eps"]))[:, :, None]).sum(1)
    c = terms * r[:, :, None]
    if options["norm"] == "neuron":
        s = terms.abs().sum(2, keepdim=True)
        c = torch.where(s > 0, c / torch.where(s > 0, s, torch.ones_like(s)),
                        torch.zeros_like(c))
    return _renormalise(c.sum(1), r)


def _attention_backward(step, r_z, xv, xq, xk, masks, formula, options) -> torch.Tensor:
    """Attention as three linear sub-steps, each an explicit per-sample matrix over
    (tokens × features): the output projection ``kron(I_L, W_o)`` with input ``o``, the
    value mixing ``P`` (per head, the identity over features) with input ``V`` (``P`` held
    constant), the value projection ``kron(I_S, W_v)`` with input ``x``; R-LRP renormalises
    after each, ε divides by each sub-step's own ``z``. Query and key get nothing."""
    v, p, o, _ = _attention(step, xv, xq, xk, masks)
    n = r_z.shape[0]
    r = r_z.to(DTYPE).reshape(n, -1)
    if step.out_weight is not None:
        tokens = o.shape[1]
        w_o = torch.kron(torch.eye(tokens, dtype=DTYPE), step.out_weight.to(DTYPE))
        b_o = None if step.out_bias is None else step.out_bias.to(DTYPE).repeat(tokens)
        r = _dense_rule(o.reshape(n, -1), w_o, b_o, r, formula, options)
        # merged (N, L, H·d) → per head (N, H, L, d), as V is laid out
        r = r.view(n, tokens, step.num_heads, -1).permute(0, 2, 1, 3).reshape(n, -1)
    lead, (length, width), source = v.shape[1:-2], p.shape[-2:], v.shape[-2]
    d = v.shape[-1]
    heads = math.prod(lead)
    # M[(h, l, e), (g, s, f)] = P[h, l, s] · δ_hg · δ_ef
    mix = torch.einsum("nhls,hg,ef->nhlegsf", p.reshape(n, heads, length, width),
                       torch.eye(heads, dtype=DTYPE), torch.eye(d, dtype=DTYPE))
    mix = mix.reshape(n, heads * length * d, heads * source * d)
    r = _dense_rule(v.reshape(n, -1), mix, None, r, formula, options)
    if step.v_weight is None:
        return r.view(xv.shape)
    # per head (N, H, S, d) → merged (N, S, H·d), as the value projection outputs it
    r = r.view(n, step.num_heads, source, d).permute(0, 2, 1, 3).reshape(n, -1)
    w_v = torch.kron(torch.eye(source, dtype=DTYPE), step.v_weight.to(DTYPE))
    b_v = None if step.v_bias is None else step.v_bias.to(DTYPE).repeat(source)
    return _dense_rule(xv.to(DTYPE).reshape(n, -1), w_v, b_v, r, formula, options
                       ).view(xv.shape)


def _window_layout(step: WindowAttention, height: int, width: int
                   ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Swin's windows by index arithmetic. The map is zero-padded to whole windows
    ``(PH, PW)`` and, when shifted, rolled by ``−shift`` (position ``(r, c)`` of the shifted
    map holds ``((r + s_h) mod PH, (c + s_w) mod PW)``), then cut into windows row-major.
    Returns ``source`` (windows, tokens): the flat ``h·W + w`` input position each token
    holds, −1 in the padding; ``region`` (windows, tokens): the region of the shifted map the
    token lies in (torchvision's nine slice assignments replayed in order; tokens of
    different regions are masked); and whether the map is shifted. Input already in windows
    (MaxViT: ``window_size`` None, ``(N, G, P, C)``): window ``g`` holds positions
    ``g·P … g·P + P − 1``, unshifted."""
    if step.window_size is None:
        return (torch.arange(height * width).view(height, width),
                torch.zeros(height, width, dtype=torch.long), False)
    wh, ww = step.window_size
    ph, pw = -(-height // wh) * wh, -(-width // ww) * ww
    sh = 0 if wh >= ph else step.shift_size[0]  # a window covering the map is not shifted
    sw = 0 if ww >= pw else step.shift_size[1]
    shifted = sh + sw > 0
    if not shifted:
        sh = sw = 0
    rows, cols = list(range(ph)), list(range(pw))
    region: dict[tuple[int, int], int] = {}
    count = 0
    for h0, h1 in ((0, -wh), (-wh, -sh), (-sh, None)):
        for w0, w1 in ((0, -ww), (-ww, -sw), (-sw, None)):
            for r in rows[h0:h1]:
                for c in cols[w0:w1]:
                    region[r, c] = count
            count += 1
    source, regions = [], []
    for a in range(ph // wh):
        for b in range(pw // ww):
            for i in range(wh):
                for j in range(ww):
                    r, c = a * wh + i, b * ww + j
                    r0, c0 = (r + sh) % ph, (c + sw) % pw
                    source.append(r0 * width + c0 if r0 < height and c0 < width else -1)
                    regions.append(region.get((r, c), 0))
    windows = (ph // wh) * (pw // ww)
    return (torch.tensor(source).view(windows, wh * ww),
            torch.tensor(regions).view(windows, wh * ww), shifted)


def _window_attention(step: WindowAttention, x: torch.Tensor) -> dict:
    """Swin's window attention in float64 from its definition: tokens gathered into windows
    ``xw`` (N, K, L, C) (0 in the padding), ``q, k, v`` per head (N, K, H, L, d) from the packed
    projection (V2: no key bias), scores ``q·kᵀ·scale`` (default ``1/√d``; V2: cosines times
    ``exp(min(logit_scale, log 100))``) plus the relative position bias (V2: ``16·sigmoid``
    of the position MLP) plus −100 between tokens of different regions, ``P`` their softmax,
    ``o = P v`` (heads merged, (N, K, L, C)), ``out = o W_pᵀ + b_p`` and ``y`` the output
    scattered back to the map."""
    x = x.to(DTYPE)
    n, height, width, c = x.shape
    source, region, shifted = _window_layout(step, height, width)
    windows, tokens = source.shape
    valid = source >= 0
    xw = torch.zeros(n, windows, tokens, c, dtype=DTYPE)
    xw[:, valid] = x.reshape(n, height * width, c)[:, source[valid]]
    heads = step.num_heads
    d = c // heads
    b = None if step.qkv_bias is None else step.qkv_bias.to(DTYPE).clone()
    if b is not None and step.logit_scale is not None:
        b[c:2 * c] = 0
    qkv = torch.einsum("nkle,fe->nklf", xw, step.qkv_weight.to(DTYPE))
    if b is not None:
        qkv = qkv + b
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(n, windows, tokens, heads, d)
               .permute(0, 1, 3, 2, 4) for i in range(3))
    if step.logit_scale is not None:
        unit_q = q / q.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        unit_k = k / k.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        scale = torch.exp(step.logit_scale.to(DTYPE).clamp(max=math.log(100.0)))  # (H, 1, 1)
        scores = torch.einsum("nkhld,nkhsd->nkhls", unit_q, unit_k) * scale
        w1, b1, w2, b2 = (None if t is None else t.to(DTYPE) for t in step.cpb_weights)
        hidden = torch.einsum("...i,oi->...o", step.coords_table.to(DTYPE), w1)
        hidden = (hidden + (0 if b1 is None else b1)).clamp(min=0)
        table = torch.einsum("...i,oi->...o", hidden, w2) + (0 if b2 is None else b2)
        table = table.reshape(-1, heads)
    else:
        scale = step.scale if step.scale is not None else d ** -0.5
        scores = torch.einsum("nkhld,nkhsd->nkhls", q, k) * scale
        table = step.bias_table.to(DTYPE)
    bias = table[step.bias_index.reshape(-1)].view(tokens, tokens, heads).permute(2, 0, 1)
    if step.logit_scale is not None:
        bias = 16 / (1 + torch.exp(-bias))
    scores = scores + bias
    if shifted:
        different = region[:, :, None] != region[:, None, :]          # (K, L, L)
        scores = scores + torch.where(different, -100.0, 0.0).to(DTYPE)[None, :, None]
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    p = e / e.sum(-1, keepdim=True)
    o = torch.einsum("nkhls,nkhsd->nkhld", p, v).permute(0, 1, 3, 2, 4).reshape(
        n, windows, tokens, c)
    out = torch.einsum("nkle,fe->nklf", o, step.proj_weight.to(DTYPE))
    if step.proj_bias is not None:
        out = out + step.proj_bias.to(DTYPE)
    y = torch.zeros(n, height * width, c, dtype=DTYPE)
    y[:, source[valid]] = out[:, valid]
    return {"xw": xw, "v": v, "p": p, "o": o, "y": y.view(x.shape), "source": source}


def _window_attention_backward(step, r_z, x, formula, options) -> torch.Tensor:
    """Window attention as the three linear sub-steps of :func:`_attention_backward`, each
    an explicit per-sample matrix over all windows and tokens at once; the relevance at the
    map is gathered into the windows (0 for padded tokens) and the tokens' relevance is
    scattered back to the map (padded tokens dropped: their input is 0)."""
    f = _window_attention(step, x)
    n, height, width, c = x.shape
    source, p, v = f["source"], f["p"], f["v"]
    windows, tokens = source.shape
    heads, d = step.num_heads, c // step.num_heads
    valid = source >= 0
    r = torch.zeros(n, windows, tokens, c, dtype=DTYPE)
    r[:, valid] = r_z.to(DTYPE).reshape(n, height * width, c)[:, source[valid]]
    r = r.reshape(n, -1)
    size = windows * tokens
    w_o = torch.kron(torch.eye(size, dtype=DTYPE), step.proj_weight.to(DTYPE))
    b_o = None if step.proj_bias is None else step.proj_bias.to(DTYPE).repeat(size)
    r = _dense_rule(f["o"].reshape(n, -1), w_o, b_o, r, formula, options)
    # merged (N, K, L, H·d) → per head (N, K, H, L, d), as V is laid out
    r = r.view(n, windows, tokens, heads, d).permute(0, 1, 3, 2, 4).reshape(n, -1)
    # M[(k, h, l, e), (k', h', s, f)] = P[k, h, l, s] · δ_kk' · δ_hh' · δ_ef
    mix = torch.einsum("nkhls,kK,hH,ef->nkhleKHsf", p, torch.eye(windows, dtype=DTYPE),
                       torch.eye(heads, dtype=DTYPE), torch.eye(d, dtype=DTYPE))
    mix = mix.reshape(n, size * c, size * c)
    r = _dense_rule(v.reshape(n, -1), mix, None, r, formula, options)
    r = r.view(n, windows, heads, tokens, d).permute(0, 1, 3, 2, 4).reshape(n, -1)
    w_v = torch.kron(torch.eye(size, dtype=DTYPE), step.qkv_weight[2 * c:].to(DTYPE))
    b_v = None if step.qkv_bias is None else step.qkv_bias[2 * c:].to(DTYPE).repeat(size)
    r = _dense_rule(f["xw"].reshape(n, -1), w_v, b_v, r, formula, options)
    r_x = torch.zeros(n, height * width, c, dtype=DTYPE)
    r_x.index_add_(1, source[valid], r.view(n, windows, tokens, c)[:, valid])
    return r_x.view(x.shape)
def _product_terms(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``t[..., i, k, j] = u[..., i, k] · v[..., k, j]``: a matmul's terms (``Σ_k`` is
    ``u @ v``), batch dims broadcast."""
    return u[..., :, :, None] * v[..., None, :, :]


def _product_backward(step, r_z, u, v, formula, options) -> list[torch.Tensor]:
    """A product of two signals. R-LRP: both operands receive the same contributions
    ``c = u v R`` (a matmul: ``c_ikj = u_ik v_kj R_ij``, summed over ``j`` for ``u`` and over
    ``i`` for ``v``; broadcast dims summed), jointly renormalised to ``‖R‖₁``. Classic rules
    (LXT's uniform rule): ``x * y`` gives each ``R / 2``; ``u @ v`` divides by
    ``stab(2 z)``."""
    u, v, r = u.to(DTYPE), v.to(DTYPE), r_z.to(DTYPE)
    n = r.shape[0]
    if step.kind == "mul":
        if formula == "product_uniform":
            return [(r / 2).sum_to_size(u.shape), (r / 2).sum_to_size(v.shape)]
        c = u * v * r
        parts = [c.sum_to_size(u.shape), c.sum_to_size(v.shape)]
    else:
        terms = _product_terms(u, v)                                    # (…, i, k, j)
        if formula == "product_uniform":
            r = r / _stab(2 * terms.sum(-2), options["eps"])
        c = terms * r[..., :, None, :]
        parts = [c.sum(-1).sum_to_size(u.shape), c.sum(-3).sum_to_size(v.shape)]
        if formula == "product_uniform":
            return parts
    joint = _rescale(torch.cat([p.reshape(n, -1) for p in parts], 1), _l1(r))
    sizes = [p[0].numel() for p in parts]
    return [j.view(p.shape) for j, p in zip(joint.split(sizes, 1), parts)]


def _gate_backward(step, r_z, signal, gate, formula, options) -> torch.Tensor:
    """``z = s ⊙ g`` with ``g`` a gate: the signal takes all. R-LRP: each output element's
    contribution ``c_j = s_j g_j R_j`` (``norm="neuron"``: divided by its absolute value
    ``|s_j g_j|``, 0 where it is 0), summed over the elements a broadcast signal fed, then
    renormalised. Classic rules: the gate is a constant and the signal its only contributor,
    so the signal receives ``R`` itself (zennit/LXT's convention)."""
    s, g = signal.to(DTYPE), gate.to(DTYPE)
    if step.kind == "matmul":
        return _gate_matmul_backward(step, r_z.to(DTYPE), s, g, formula, options)
    if formula == "pass_signal":
        return r_z.sum_to_size(s.shape)
    c = s * g * r_z
    if options["norm"] == "neuron":
        size = (s * g).abs()
        c = torch.where(size > 0, c / torch.where(size > 0, size, torch.ones_like(size)),
                        torch.zeros_like(c))
    return _renormalise(c.sum_to_size(s.shape).reshape(s.shape[0], -1),
                        r_z.reshape(r_z.shape[0], -1)).view(s.shape)


def _gate_terms(step, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A matmul gate's terms ``t[..., i, k, j]`` (``Σ_k`` is ``z``): ``g_ik s_kj`` for
    ``z = g @ s``, ``s_ik g_kj`` for ``z = s @ g``."""
    return _product_terms(g, s) if step.gate_left else _product_terms(s, g)


def _gate_matmul_backward(step, r, s, g, formula, options) -> torch.Tensor:
    """``z = G s`` (or ``s G``) with ``G`` a gate held constant. R-LRP: the signal's terms
    ``c_ikj = t_ikj R_ij`` (``norm="neuron"``: over ``Σ_k |t_ikj|``, 0 where that is 0),
    summed over the outputs each signal element feeds, then renormalised. Classic rules:
    ε, ``c_ikj = t_ikj R_ij / stab(z_ij)``."""
    terms = _gate_terms(step, s, g)                                     # (…, i, k, j)
    per_term = r
    if formula == "gate_eps":
        per_term = r / _stab(terms.sum(-2), options["eps"])
    elif options["norm"] == "neuron":
        size = terms.abs().sum(-2)
        per_term = torch.where(size > 0, r / torch.where(size > 0, size, torch.ones_like(size)),
                               torch.zeros_like(r))
    c = terms * per_term[..., :, None, :]
    # the signal is the right factor (k, j) of G s and the left (i, k) of s G
    r_s = (c.sum(-3) if step.gate_left else c.sum(-1)).sum_to_size(s.shape)
    if formula == "gate_eps":
        return r_s
    return _renormalise(r_s.reshape(s.shape[0], -1), r.reshape(r.shape[0], -1)).view(s.shape)


def _route_backward(step, r_z, inputs, winners, values) -> list[torch.Tensor]:
    """Activations pass relevance; max-pool gives each window's relevance to its winner;
    reshapes and cat send each element's relevance back to where the element came from."""
    if isinstance(step, Activation):
        return [r_z]
    if isinstance(step, MaxPool):
        a = inputs[0]
        n, ch = a.shape[:2]
        r_a = torch.zeros(n, ch, math.prod(a.shape[2:]), dtype=DTYPE)
        flat_winners, flat_r = winners.reshape(n, ch, -1), r_z.reshape(n, ch, -1)
        for s in range(n):
            for c in range(ch):
                r_a[s, c].index_add_(0, flat_winners[s, c], flat_r[s, c])
        return [r_a.view(a.shape)]
    if isinstance(step, (Reshape, Broadcast)):
        # Apply the same rearrangement (or copying) to the element positions (shape arguments such as
        # x.size(0) are read from the forward's slot values).
        args, kwargs = _resolve(step.args, values), _resolve(step.kwargs, values)
        return _route_by_index(lambda pos: step.fn(pos[0], *args, **kwargs),
                               [tuple(inputs[0].shape)], r_z)
    if isinstance(step, Select):
        args, kwargs = _resolve(step.args, values), _resolve(step.kwargs, values)
        return _route_by_index(lambda pos: step.apply(pos[0], args, kwargs),
                               [tuple(inputs[0].shape)], r_z)
    if isinstance(step, Cat):
        return _route_by_index(lambda pos: torch.cat(pos, dim=step.dim),
                               [tuple(a.shape) for a in inputs], r_z)
    if isinstance(step, Pad):  # positions padded with −1: the constants, dropped
        a = inputs[0]
        positions = torch.arange(a.numel()).view(a.shape)
        padded = torch.nn.functional.pad(positions, tuple(_resolve(step.pad, values)),
                                         value=-1).reshape(-1)
        kept = padded >= 0
        r_a = torch.zeros(a.numel(), dtype=DTYPE)
        r_a.index_add_(0, padded[kept], r_z.reshape(-1).to(DTYPE)[kept])
        return [r_a.view(a.shape)]
    raise NotImplementedError(f"the reference has no relevance for {type(step).__name__}")

