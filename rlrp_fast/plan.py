"""The Plan: a traced model as an ordered list of small, immutable steps.

A step reads tensors from numbered *slots* and writes one slot. Slot values live only during
one call; the plan itself holds no per-call state, so one plan serves many threads at once.

Step kinds (one class each):

- ``Affine``   Linear / ConvNd, with a following BatchNorm folded in (as a channel scale).
- ``Pool``     parameter-free linear maps: AvgPool*, AdaptiveAvgPool*, mean over dims.
- ``Scale``    a BatchNorm with nothing to fold into: ``z = s·a + t`` per channel.
- ``Activation`` elementwise nonlinearity; relevance passes through unchanged.
- ``MaxPool``  MaxPool* / AdaptiveMaxPool*; relevance goes to the winning element.
- ``Reshape``  view/reshape/flatten/squeeze/unsqueeze/permute/transpose/swapaxes, roll;
  relevance follows the element.
- ``Broadcast`` expand/expand_as/broadcast_to/repeat: copies of each element; relevance of
  the copies is summed back.
- ``Gate``     a product with a gate (squeeze-excitation) or a constant (layer scale):
  relevance to the signal only.
- ``Product``  a product of two signals (``x * y``, ``x @ y``): both operands share the
  relevance.
- ``Constant`` a parameter or number used directly in ``forward``.
- ``Normalization`` LayerNorm, GroupNorm, RMSNorm (and a LayerNorm written out): linear in
  its input with ``σ`` held constant.
- ``Add``      residual sum of two or more tensors (constants added take nothing).
- ``Cat``      concatenation; each input receives its slice (a constant's is dropped).
- ``Attention`` ``nn.MultiheadAttention`` / ``F.scaled_dot_product_attention`` as one step:
  relevance reaches the tokens through the values only.
- ``Select``   a part of a tensor (chunk, split, unbind, slicing); the rest gets nothing.
- ``Pad``      constant padding (``F.pad``); the padded elements are constants.
- ``WindowAttention`` attention inside windows with a relative position bias (torchvision's
  Swin V1/V2 shifted windows, MaxViT's partitions) as one step: relevance reaches the tokens
  through the values only, the window layout routes it by element.
- ``Meta``     non-tensor values (``x.size(0)``) that shape arguments of other steps need.
- ``Opaque``   an op no rule covers, computed as the model computes it, allowed only where no
  relevance has to pass through it (the query/key side of attention, inside a gate).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class SlotRef:
    """A reference to a slot inside a step's argument structure."""

    slot: int


@dataclass(frozen=True, eq=False)
class Step:
    """Base of all steps: ``name`` is the traced node's name (used in messages),
    ``target`` what the user wrote (module path or function name), ``inputs`` the tensor
    slots relevance flows back to, ``output`` the slot written. ``module`` is the qualified
    name of the module the step calls (a folded conv+BatchNorm: the conv's), None for a
    function or method call; composites match layers to rules through it."""

    name: str
    target: str
    inputs: tuple[int, ...]
    output: int
    module: str | None = field(default=None, kw_only=True)


@dataclass(frozen=True, eq=False)
class Affine(Step):
    """``z = s ⊙ (W a) + b``. ``conv_dims`` is 0 for Linear, 1/2/3 for ConvNd.

    ``weight`` is the layer's own weight, read in place (never copied, never modified).
    ``channel_scale`` is the per-output-channel ``s`` of a BatchNorm folded into the layer
    (float64; None without one) and ``bias`` the folded bias ``s·(b − μ) + β``, in the
    model's dtype. The fold is applied on the fly, per layer and call to whichever is
    smaller, the weight or the activation, so that no scaled copy of the weights stays
    resident; rules that need the folded weight itself build it once with
    :meth:`effective_weight`. A Linear with a BatchNorm1d folded in is only right for
    ``(N, features)`` inputs."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    conv_dims: int = 0
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    channel_scale: torch.Tensor | None = None

    @property
    def is_conv(self) -> bool:
        return self.conv_dims > 0

    @property
    def geometry(self) -> dict:
        """The layer's geometry as the fused primitives take it (keyword arguments of
        ``rlrp_fast.ops`` and ``rlrp_fast.kernels.affine_relevance``)."""
        return {"stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups,
                "conv_dims": self.conv_dims}

    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``s·W`` in ``dtype`` (a new tensor) with a folded BatchNorm, else ``W`` in ``dtype``."""
        weight = self.weight.to(dtype)
        if self.channel_scale is None:
            return weight
        return scale_rows(weight, self.channel_scale.to(dtype))

    def output_numel(self, input_shape: torch.Size) -> int:
        """Number of elements of ``z`` for an input of ``input_shape``."""
        if not self.is_conv:
            return input_shape.numel() // self.weight.shape[1] * self.weight.shape[0]
        size = input_shape[0] * self.weight.shape[0]
        for i, length in enumerate(input_shape[2:]):
            span = self.dilation[i] * (self.weight.shape[2 + i] - 1) + 1
            size *= (length + 2 * self.padding[i] - span) // self.stride[i] + 1
        return size


def scale_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``s·W``: output channel ``o`` of ``weight`` times ``scale[o]`` (a new tensor)."""
    return weight * scale.view(-1, *([1] * (weight.dim() - 1)))


@dataclass(frozen=True, eq=False)
class Pool(Step):
    """A parameter-free linear map. ``kind`` is ``"avg"``, ``"adaptive_avg"`` or ``"mean"``.

    ``params`` holds the pooling arguments: for ``avg`` kernel_size, stride, padding,
    ceil_mode, count_include_pad, divisor_override; for ``adaptive_avg`` output_size; for
    ``mean`` dims and keepdim. ``dims`` is the number of spatial dims (1/2/3) of pools."""

    kind: str
    dims: int
    params: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Scale(Step):
    """``z = scale·a + shift`` with per-channel (dim 1) ``scale``/``shift`` vectors."""

    scale: torch.Tensor
    shift: torch.Tensor


@dataclass(frozen=True, eq=False)
class Activation(Step):
    """Elementwise ``z = fn(a)``; ``fn`` never works in place."""

    fn: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class MaxPool(Step):
    """Max pooling. ``fn(a)`` returns ``(z, indices)`` with indices flat over the spatial
    dims of each (sample, channel) plane, as PyTorch's pooling returns them."""

    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, eq=False)
class Reshape(Step):
    """Element-preserving rearrangement ``z = fn(a, *args, **kwargs)``.

    ``undo`` maps relevance back for permute/transpose; when it is None, relevance is
    reshaped back to the input's shape."""

    fn: Callable[..., torch.Tensor]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    undo: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True, eq=False)
class Broadcast(Step):
    """Copies of each element: ``z = fn(a, *args, **kwargs)`` (``expand``, ``expand_as``,
    ``broadcast_to``, ``repeat``). Each element receives the sum of its copies' relevance
    (rescaled to the arriving L1 mass under R-LRP, as at a fork: copies of opposite sign
    cancel). ``tiled``: ``repeat`` (whole copies side by side), not a broadcast; a flag, not
    a test of ``fn``: torch 2.11's dynamo cannot compare a method read through a frozen
    step (see :attr:`Plan.fns`)."""

    fn: Callable[..., torch.Tensor]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    tiled: bool = False


@dataclass(frozen=True, eq=False)
class Gate(Step):
    """``z = signal ⊙ gate`` (broadcasting either way), ``gate`` the slot of a Sigmoid,
    Hardsigmoid or Softmax output (through reshapes) or of a :class:`Constant` (a layer
    scale): a product whose relevance goes to the signal (``inputs``) only; the gate is read,
    never given relevance (docs/RLRP_SPEC.md, "Gates: the signal takes all"). ``kind``
    ``"matmul"``: ``z = gate @ signal`` (``gate_left``, attention written out:
    ``softmax(q kᵀ) @ v``) or ``signal @ gate``, both at least 3-D (batch first)."""

    gate: int
    kind: str = "mul"
    gate_left: bool = True

    def apply(self, signal: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The forward: ``z`` from the signal and the gate."""
        if self.kind == "mul":
            return signal * gate
        return gate @ signal if self.gate_left else signal @ gate

    def adjoint(self, gate: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``Gᵀ r`` for the linear map ``signal ↦ z`` (a matmul gate only)."""
        gate_t = gate.transpose(-2, -1)
        return gate_t @ r if self.gate_left else r @ gate_t


@dataclass(frozen=True, eq=False)
class Product(Step):
    """``z = u ⊙ v`` (``kind`` ``"mul"``, broadcasting) or ``z = u @ v`` (``"matmul"``) of two
    signals, neither a gate nor a constant: ``inputs`` is ``(u, v)`` (the same slot twice for
    ``x * x``) and both share the relevance (docs/RLRP_SPEC.md, "Products of two signals")."""

    kind: str


@dataclass(frozen=True, eq=False)
class Constant(Step):
    """A parameter, buffer or number used directly in ``forward`` (a layer scale): no inputs,
    takes no relevance. ``value`` is the model's own tensor, read in place."""

    value: torch.Tensor


@dataclass(frozen=True, eq=False)
class Normalization(Step):
    """A normalisation layer, ``z = γ ⊙ (x − μ) / σ + β`` per normalised group, linear in
    ``x`` for relevance with ``σ`` held constant: ``J = diag(γ/σ)(I − 11ᵀ/n)`` per group
    (docs/RLRP_SPEC.md, "Modern blocks").

    ``kind`` says which: ``"layer"`` (LayerNorm, or one written out in ``forward``: groups
    over ``dims``), ``"rms"`` (RMSNorm over ``dims``: no centring, ``σ = √(mean x² + eps)``,
    no ``β``), ``"group"`` (GroupNorm: the channels (dim 1) split into ``num_groups``
    groups, each with all its positions). ``σ`` is the biased standard deviation (RMS for
    ``"rms"``) with ``eps``; ``eps`` None (RMSNorm's default) is ``torch.finfo(x.dtype).eps``.
    ``weight``/``bias`` broadcast against ``x`` as stored, except for ``"group"``, where
    they hold one value per channel (see :meth:`per_element`)."""

    kind: str
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float | None
    dims: tuple[int, ...] = ()
    num_groups: int | None = None

    @property
    def centred(self) -> bool:
        return self.kind != "rms"

    def trailing(self, ndim: int) -> bool:
        """Whether ``dims`` are the last ones of an ``ndim``-dim input (LayerNorm's layout)."""
        dims = sorted(d % ndim for d in self.dims)
        return dims == list(range(ndim - len(dims), ndim))

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the input's shape) as ``(N, G, n)``: one row per normalised group."""
        if self.kind == "group":
            return t.reshape(t.shape[0], self.num_groups, -1)
        moved = t.movedim(self.dims, tuple(range(-len(self.dims), 0)))
        return moved.reshape(t.shape[0], -1, moved.shape[-len(self.dims):].numel())

    def ungrouped(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`grouped`: ``(N, G, n)`` back to ``like``'s shape."""
        if self.kind == "group":
            return g.reshape(like.shape)
        moved_shape = like.movedim(self.dims, tuple(range(-len(self.dims), 0))).shape
        return g.reshape(moved_shape).movedim(tuple(range(-len(self.dims), 0)), self.dims)

    def per_element(self, t: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
        """``weight`` or ``bias`` shaped to broadcast against an ``ndim``-dim input."""
        if t is None or self.kind != "group":
            return t
        return t.view(-1, *([1] * (ndim - 2)))

    def epsilon(self, dtype: torch.dtype) -> float:
        return torch.finfo(dtype).eps if self.eps is None else self.eps


@dataclass(frozen=True, eq=False)
class Select(Step):
    """A part of a tensor, as a view: ``z = fn(a, *args, **kwargs)``, then ``[pick]`` when
    ``fn`` returns several parts (``chunk``, ``split``, ``unbind``), or basic indexing
    (``x[:, 0]``, slices). Relevance goes back to the selected elements, 0 elsewhere."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    pick: int | None = None

    def apply(self, a: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        out = self.fn(a, *args, **kwargs)
        return out if self.pick is None else out[self.pick]


@dataclass(frozen=True, eq=False)
class Add(Step):
    """``z = Σ inputs + Σ constants``, with torch's broadcasting: an input of a smaller shape
    (a per-channel ``(N, C, 1, 1)`` term, a spatial mean kept as ``(N, C, 1, 1)``) is read
    by every output element it broadcasts to, so its relevance is the sum over those
    (the sum is a linear map with unit weights; ``negated`` lists the inputs it subtracts,
    by position, whose weights are −1: ``x − y``, ``c − x``). ``constants`` are the slots of
    :class:`Constant` values (a position embedding, broadcast; a number) added in the forward
    but given no relevance: they act as a bias (docs/RLRP_SPEC.md, "Constants take nothing");
    ``subtracted`` the constants subtracted (``x − mean``), a bias too."""

    constants: tuple[int, ...] = ()
    subtracted: tuple[int, ...] = ()
    negated: tuple[int, ...] = ()

    def signed(self, inputs: list) -> list:
        """The inputs as the sum's terms (the negated ones negated): each input's
        contribution to ``z``. ``x + (−y)`` is ``x − y`` exactly in floating point."""
        return [-u if i in self.negated else u for i, u in enumerate(inputs)]

    @property
    def bias_slots(self) -> tuple[int, ...]:
        return self.constants + self.subtracted

    def bias(self, values: list) -> list:
        """The constants as terms to add (the subtracted ones negated: ``x + (−m)`` is
        ``x − m`` exactly in floating point)."""
        return [values[s] for s in self.constants] + [-values[s] for s in self.subtracted]


@dataclass(frozen=True, eq=False)
class Cat(Step):
    """``z = torch.cat(operands or inputs, dim)``. With constant operands (a class token),
    ``operands`` lists every slot in order and ``inputs`` only the non-constant ones: a
    constant's slice gets no relevance."""

    dim: int
    operands: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class Attention(Step):
    """Scaled dot-product attention as one step: ``nn.MultiheadAttention`` (the
    ``q/k/v`` projections, split into ``num_heads`` heads, attention, heads merged, output
    projection) or ``F.scaled_dot_product_attention`` (no projections: ``v_weight`` is None,
    heads already a dimension). ``inputs`` is the value input only; ``query`` and ``key`` are
    read, never given relevance (docs/RLRP_SPEC.md, "Gates: the signal takes all": ``P`` is held
    constant). ``scale`` None is ``1/√d``. Weights are the module's own tensors (views)."""

    query: int
    key: int
    num_heads: int = 1
    q_weight: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    v_weight: torch.Tensor | None = None
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    out_weight: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None
    scale: float | None = None
    # masks: slots of the ``attn_mask`` and (MultiheadAttention) ``key_padding_mask`` tensors,
    # read with the module's or function's own convention (bool: MultiheadAttention masks
    # where True, SDPA attends where True; float: added to the scores), and a causal mask
    mask: int | None = None
    padding_mask: int | None = None
    causal: bool = False
    batch_first: bool = True  # MultiheadAttention(batch_first=False): (L, N, E) tensors

    @property
    def mask_slots(self) -> tuple[int, ...]:
        return tuple(s for s in (self.mask, self.padding_mask) if s is not None)


@dataclass(frozen=True, eq=False)
class Pad(Step):
    """``z = F.pad(a, pad, value=value)`` (constant mode; ``pad`` may hold slot references
    to sizes computed at run time; negative entries crop). The padded elements are constants:
    relevance arriving there is dropped and the rest carries the whole mass (docs/RLRP_SPEC.md,
    "Constants take nothing"); cropped elements get nothing."""

    pad: tuple
    value: float = 0.0


@dataclass(frozen=True, eq=False)
class WindowAttention(Step):
    """Multi-head self-attention inside windows, with a relative position bias, as one step:
    torchvision's ``ShiftedWindowAttention`` (Swin V1) / ``ShiftedWindowAttentionV2`` on
    ``(N, H, W, C)``: zero padding to whole windows, a cyclic shift, attention inside each
    window, the shift undone, the padding cropped; or MaxViT's
    ``RelativePositionalMultiHeadAttention`` on windows already laid out ``(N, G, P, C)``
    (``window_size`` None, no shift). In each window: a packed ``qkv`` projection,
    ``num_heads`` heads, scores ``q·kᵀ·scale`` (``scale`` None: ``1/√(C/heads)``; V2: cosine
    attention scaled by ``exp(min(logit_scale, log 100))``) plus the position bias (plus the
    shift mask), softmax, the values mixed, the output projection (``out_proj``: its
    attribute name in the module, for composites). Weights are the module's own tensors.

    The position bias is computed from parameters alone (a constant): ``bias_table`` gathered
    by ``bias_index``; V2 runs the continuous-position MLP ``cpb_weights``
    ``(w1, b1, w2, b2)`` on ``coords_table`` for the table and takes ``16·sigmoid``. For
    relevance ``P`` is held constant: the tokens are reached through the values only
    (docs/RLRP_SPEC.md, attention)."""

    window_size: tuple[int, int] | None
    shift_size: tuple[int, int]
    num_heads: int
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor | None
    bias_index: torch.Tensor
    bias_table: torch.Tensor | None = None
    scale: float | None = None
    logit_scale: torch.Tensor | None = None
    cpb_weights: tuple[torch.Tensor | None, ...] | None = None
    coords_table: torch.Tensor | None = None
    out_proj: str = "proj"


@dataclass(frozen=True, eq=False)
class Meta(Step):
    """A non-tensor value (shape arithmetic). ``inputs`` is empty: no relevance flows."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Opaque(Step):
    """``z = fn(*args, **kwargs)`` for an op no rule covers (a rotary embedding's ``neg`` on
    the queries): ``inputs`` are the tensors it reads (slot references in ``args``), for the
    batch dims only. The plan refuses it wherever relevance would reach ``z``
    (docs/RLRP_SPEC.md, "Ops without a rule"), so it is computed, never explained through."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)




@dataclass(frozen=True, eq=False)
class Plan:
    """An ordered, immutable program. ``steps`` are in forward (topological) order."""

    steps: tuple[Step, ...]
    input_slot: int
    output_slot: int
    num_slots: int
    # per slot, the traced node whose value it holds (trace verification compares them)
    slot_nodes: tuple[str | None, ...] = ()
    # per step, its ``fn`` field (None without one), read from here by the forward: torch
    # 2.11's dynamo cannot trace a call through a frozen dataclass's field that holds a
    # method descriptor (``Tensor.flatten``), but can through a tuple the plan holds
    fns: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fns", tuple(getattr(s, "fn", None) for s in self.steps))


def step_reads(step: Step) -> list[int]:
    """Every slot a step reads in the forward pass: its tensor inputs and slot arguments."""
    slots = list(step.inputs)
    if isinstance(step, Gate):
        slots.append(step.gate)
    if isinstance(step, Add):
        slots += step.bias_slots
    if isinstance(step, Cat):
        slots += step.operands
    if isinstance(step, Attention):
        slots += [step.query, step.key, *step.mask_slots]
    if isinstance(step, (Reshape, Meta, Select, Broadcast, Opaque)):
        slots += [r.slot for r in _iter_refs((step.args, step.kwargs))]
    if isinstance(step, Pad):
        slots += [r.slot for r in _iter_refs(step.pad)]
    return slots


def _iter_refs(obj):
    if isinstance(obj, SlotRef):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _iter_refs(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _iter_refs(item)


def resolve(obj, values: list):
    """Replace every ``SlotRef`` inside ``obj`` by its slot's current value."""
    if isinstance(obj, SlotRef):
        return values[obj.slot]
    if isinstance(obj, tuple):
        return tuple(resolve(o, values) for o in obj)
    if isinstance(obj, list):
        return [resolve(o, values) for o in obj]
    if isinstance(obj, dict):
        return {k: resolve(v, values) for k, v in obj.items()}
    return obj
