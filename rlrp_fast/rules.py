"""Rules: how each linear op (and residual add) redistributes relevance.

Two layers. *Rule objects* (``RLRP``, ``Epsilon``, ``ZPlus``, ``Gamma``, ``AlphaBeta``,
``ZBox``, ``Flat``, ``WSquare``, ``Norm``, ``Pass``) are what a user names, with their
parameters, validated when built; a :class:`Composite` says which layer gets which (zennit's
vocabulary). Each rule builds, for every plan step it is assigned to (``Affine``, ``Pool``,
``Scale``, ``Add``), a *propagator*: the code that maps relevance through the step with the
backends' contraction primitives, its modified weights (z⁺, γ, flat, w², ...) prepared once.
Routing steps (activations, max-pool, reshapes, cat) route relevance the same way under
every rule and live in ``engine.py``. The presets (``Explainer(rule="EpsilonPlus")``, ...)
are defined once, in :func:`make_rule`.

``RLRP`` is the formulation of ``docs/RLRP_SPEC.md``. The classic rules and composites mean what
zennit 0.5.1 means by them: its stabiliser ``z + ε·(sign(z) + (z == 0))``, ``Pass`` on
activations and its ``Norm`` rule on average pools and residual sums. A BatchNorm with nothing
to fold into is a fixed diagonal linear map and gets ``Norm`` too (zennit has no rule for it).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.nn as nn

from .backends import Backend
from .numerics import (Rel, divide_into, l1_per_sample, per_channel, per_sample, safe_ratio,
                       scale_the_weight, share_mass, stabilize)
import torch.nn.functional as F

from .plan import (Add, Affine, Attention, Gate, Normalization, Plan, Pool, Product, Scale, Step,
                   WindowAttention, scale_rows)
from . import window_attention as windows

SINGLE_RULES = ("lrp0", "epsilon", "zplus", "gamma", "alphabeta", "zbox", "flat", "wsquare")
COMPOSITES = ("EpsilonPlus", "EpsilonGammaBox", "EpsilonPlusFlat")
RULES = ("rlrp", *SINGLE_RULES, *COMPOSITES)

# R-LRP's reading of the paper by default: "layer" (divide by nothing, renormalise each layer)
# or "neuron" (each neuron's contributions relative to their absolute sum); docs/EVALUATION.md
# holds the measurement that decides it.
DEFAULT_NORM = "layer"


class Propagator(Protocol):
    """Maps relevance ``r`` at a step's output to relevance at each of its inputs.

    ``inputs`` are the tensors that entered the step in the forward pass, ``z`` its output
    (only kept when ``needs_output``). Relevance travels as :class:`Rel`; R-LRP's carries its
    L1 mass apart from its value, the classic rules' is the value itself."""

    needs_output: bool

    def __call__(self, backend: Backend, step: Step, r: Rel,
                 inputs: Sequence[torch.Tensor], z: torch.Tensor | None) -> list[Rel]:
        ...


def _fixed_linear_back(backend: Backend, step: Step, g: torch.Tensor, a: torch.Tensor
                       ) -> torch.Tensor:
    """``a ⊙ (Pᵀ g)`` for a parameter-free linear step (Pool) or a diagonal one (Scale)."""
    if isinstance(step, Pool):
        return backend.pool_adjoint(step, g, a.shape).mul_(a)
    return (g * per_channel(step.scale.to(g.dtype), g)).mul_(a)


# -- R-LRP ---------------------------------------------------------------------------------
# Relevance arrives with its L1 mass apart (``Rel.mass``): each step contracts the unit-L1
# direction of the incoming value and hands the same mass on, which is the renormalisation
# ``R_a = R̃_a · ‖R_z‖₁ / ‖R̃_a‖₁`` without a pass over memory. In a composite that mixes
# R-LRP with classic rules, relevance travels as a plain value (no mass): the R-LRP steps then
# take the incoming value's L1 norm as the mass and hand on the renormalised value itself.
def _carry(r: Rel) -> tuple[Rel, bool]:
    """``r`` with a mass (its own L1 norm when it arrives as a plain value), and whether it
    arrived plain (then the step's results are materialised: see :func:`_settle`)."""
    if r.mass is not None:
        return r, False
    l1 = r.value_l1()
    return Rel(r.value, l1, l1), True


def _settle(parts: list[Rel], plain: bool) -> list[Rel]:
    """The step's results as plain values when its relevance arrived plain."""
    return [Rel(p.materialize()) for p in parts] if plain else parts


@dataclass(frozen=True)
class RlrpAffine:
    """``R̃_a = a ⊙ (Wᵀ R_z)`` (``norm="layer"``) or ``R̃_a = a ⊙ (Wᵀ (R_z / s))`` with
    ``s = |W| |a|`` (``norm="neuron"``: each neuron splits its relevance by its inputs'
    contributions relative to the sum of their absolute values; 0 where ``s = 0``),
    renormalised to ``‖R_z‖₁`` per sample.

    The unit-L1 factor of the incoming value is applied in the contraction's epilogue. A
    folded BatchNorm (``W' = s·W``) enters as ``W'ᵀ R = Wᵀ (s ⊙ R)``: no scaled weight copy
    is kept for it. ``norm="neuron"`` takes ``|s ⊙ W| |a|`` from the backend's
    ``affine_abs``: the Triton kernel takes ``abs`` on load, the ATen backends read
    :meth:`abs_weight`."""

    weight: torch.Tensor
    channel_scale: torch.Tensor | None
    neuron: bool = False
    _abs: list = field(default_factory=list, compare=False, repr=False)
    needs_output = False

    def abs_weight(self) -> torch.Tensor:
        """``|s ⊙ W|``, made on first use (only backends without ``abs`` on load ask) and
        kept: one copy of the weights, where a per-call ``abs`` would read them once more on
        every call; the folded scale inside it saves a pass over the layer's output."""
        if not self._abs:
            w = self.weight if self.channel_scale is None else scale_rows(
                self.weight, self.channel_scale)
            self._abs.append(w.abs())
        return self._abs[0]

    def __call__(self, backend, step, r, inputs, z):
        r, plain = _carry(r)
        weight, g, s = self.weight, r.value, self.channel_scale
        a = inputs[0]
        if self.neuron:
            g = divide_into(g, backend.affine_abs(step, a, weight, s, self.abs_weight))
        if s is not None:  # on the weight or on the relevance
            if scale_the_weight(weight.numel(), g.numel()):
                weight = scale_rows(weight, s)
            else:
                g = g * per_channel(s, g)
        # ``a`` stays in the forward's dtype: backends upcast it on load (no fp32 copy)
        r_tilde, l1 = backend.affine_relevance_l1(step, weight, g, a, r.unit_scale())
        return _settle([Rel(r_tilde, r.mass, l1)], plain)


@dataclass(frozen=True)
class RlrpFixedLinear:
    """The same rule for average pools, means and lone BatchNorms (``neuron``: ``s = P|a|``,
    for a lone BatchNorm ``|scale · a|``, so it passes ``sign(scale · a) ⊙ R``)."""

    neuron: bool = False
    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        r, plain = _carry(r)
        a = inputs[0]
        g = r.value * per_sample(r.unit_scale(), r.value)
        if self.neuron:
            if isinstance(step, Pool):
                den = backend.pool_forward(step, a.abs().to(g.dtype))
            else:
                den = (a.to(g.dtype) * per_channel(step.scale.to(g.dtype), g)).abs_()
            g = divide_into(g, den)
        r_tilde = _fixed_linear_back(backend, step, g, a)
        return _settle([Rel(r_tilde, r.mass, l1_per_sample(r_tilde))], plain)


@dataclass(frozen=True)
class RlrpAddLinear:
    """``skip="linear"``: the add as a unit-weight linear map, one joint scalar per sample."""

    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        r, plain = _carry(r)
        parts = [(u.to(r.value.dtype) * r.value).sum_to_size(u.shape)
                 for u in step.signed(inputs)]
        return _settle(share_mass(parts, r.mass), plain)


@dataclass(frozen=True)
class RlrpAddRatio:
    """``skip="ratio"``: the paper's rule ``R_u = (u / y) ⊙ R_y``, 0 where ``y == 0``; not
    renormalised, so the operands' masses are what the ratios give them."""

    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        ups = [u.to(r.value.dtype) for u in step.signed(inputs)]
        y = sum(ups)
        nonzero = y != 0
        share = torch.where(nonzero, r.value / torch.where(nonzero, y, torch.ones_like(y)),
                            torch.zeros_like(y))
        parts = [(u * share).sum_to_size(u.shape) for u in ups]
        if r.mass is None:  # a plain value (mixed composite): the parts are the relevance
            return [Rel(p) for p in parts]
        norms = [l1_per_sample(p) for p in parts]
        # the parts are in the incoming value's units: the incoming mass per unit of value
        per_unit = safe_ratio(r.mass, r.value_l1())
        return [Rel(p, n * per_unit, n) for p, n in zip(parts, norms)]


@dataclass(frozen=True)
class RlrpGate:
    """A product with a gate, ``z = s ⊙ g``: the signal takes all, as a linear step in ``s``
    with the gate as its (per-sample) weights: ``R̃_s = s ⊙ g ⊙ R`` (``norm="neuron"``: each
    output's single contribution relative to its absolute value, ``sign(s ⊙ g) ⊙ R``),
    renormalised to ``‖R‖₁``; the gate gets nothing. A matmul gate ``z = G s`` (attention
    written out, ``G = P``): ``R̃_s = s ⊙ Gᵀ R`` (neuron: ``s ⊙ Gᵀ(R / |G||s|)``), as the
    attention step's value mixing."""

    neuron: bool = False
    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        r, plain = _carry(r)
        signal, gate = (t.to(r.value.dtype) for t in inputs)
        if step.kind == "matmul":
            g = safe_ratio(r.value, step.apply(signal.abs(), gate.abs())) if self.neuron \
                else r.value
            r_tilde = signal * step.adjoint(gate, g)
        else:
            product = signal * gate
            if self.neuron:  # 0 where s ⊙ g = 0
                c = torch.sign(product).mul_(r.value)
            else:
                c = product.mul_(r.value)
            r_tilde = c.sum_to_size(signal.shape)
        return _settle([Rel(r_tilde, r.mass, l1_per_sample(r_tilde))], plain)


def normalization_sigma(step: Normalization, x: torch.Tensor) -> torch.Tensor:
    """``σ`` per normalised group, ``(N, G, 1)``: the forward's own ``√(biased var + eps)``
    (``√(mean x² + eps)`` for RMSNorm), never smaller than ``√eps``."""
    groups = step.grouped(x)
    spread = (groups.var(-1, correction=0, keepdim=True) if step.centred
              else groups.square().mean(-1, keepdim=True))
    return torch.sqrt(spread + step.epsilon(x.dtype))


def normalization_forward(step: Normalization, x: torch.Tensor) -> torch.Tensor:
    """The step's output, computed as torch computes it (written out for a LayerNorm over
    dims other than the last ones)."""
    w, b = (None if t is None else t.to(x.dtype) for t in (step.weight, step.bias))
    if step.kind == "group":
        return F.group_norm(x, step.num_groups, w, b, step.eps)
    shape = tuple(x.shape[d] for d in step.dims)
    if step.kind == "rms":
        return F.rms_norm(x, shape, w, step.eps)
    if step.trailing(x.dim()) and all(t is None or t.shape == shape for t in (w, b)):
        return F.layer_norm(x, shape, w, b, step.eps)
    mean = x.mean(step.dims, keepdim=True)
    out = (x - mean) / torch.sqrt(x.var(step.dims, correction=0, keepdim=True) + step.eps)
    out = out if w is None else out * w
    return out if b is None else out + b


@dataclass(frozen=True)
class RlrpNormalization:
    """A normalisation with ``σ`` held constant: the linear map ``J = diag(γ/σ)(I − 11ᵀ/n)``
    per normalised group (RMSNorm: ``diag(γ/σ)``), ``R̃_x = x ⊙ (Jᵀ R)`` (``norm="neuron"``:
    ``Jᵀ (R / s)`` with ``s = |J||x| = |γ/σ| ⊙ ((1 − 2/n)|x| + Σ|x|/n)``, RMSNorm
    ``|γ x/σ|``), renormalised per sample. ``σ`` is the forward's own, never small."""

    neuron: bool = False
    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        r, plain = _carry(r)
        g = r.value
        x = inputs[0].to(g.dtype)
        sigma = normalization_sigma(step, x)                         # (N, G, 1)
        gamma = step.per_element(step.weight, x.dim())
        if gamma is not None:
            gamma = gamma.to(g.dtype)
        if self.neuron:
            size = x.abs()
            if step.centred:
                rows = step.grouped(size)
                n = rows.shape[-1]
                size = step.ungrouped((1 - 2 / n) * rows + rows.sum(-1, keepdim=True) / n, x)
            s = step.ungrouped(step.grouped(size if gamma is None else size * gamma.abs())
                               / sigma, x)
            g = safe_ratio(g, s)
        u = step.grouped(g if gamma is None else g * gamma) / sigma     # diag(γ/σ) R
        if step.centred:
            u = u - u.mean(-1, keepdim=True)                            # (I − 11ᵀ/n)
        r_tilde = x * step.ungrouped(u, x)
        return _settle([Rel(r_tilde, r.mass, l1_per_sample(r_tilde))], plain)


@dataclass(frozen=True)
class RlrpProduct:
    """A product of two signals, ``z = u ⊙ v`` or ``z = u @ v``: both operands receive the
    same contributions ``c = u v R`` (``R̃_u = u ⊙ (R vᵀ)``, ``R̃_v = v ⊙ (uᵀ R)`` for a
    matmul), jointly renormalised to ``‖R‖₁`` with one scalar per sample (the uniform split
    of AttnLRP without its division). The layer form under both norms (RLRP_SPEC.md)."""

    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        r, plain = _carry(r)
        g = r.value
        u, v = (t.to(g.dtype) for t in inputs)
        if step.kind == "mul":
            c = u * v * g
            parts = [c.sum_to_size(u.shape), c.sum_to_size(v.shape)]
        else:
            parts = [(u * (g @ v.transpose(-2, -1))).sum_to_size(u.shape),
                     (v * (u.transpose(-2, -1) @ g)).sum_to_size(v.shape)]
        return _settle(share_mass(parts, r.mass), plain)


@dataclass(frozen=True)
class UniformProduct:
    """The classic rules at a product of two signals, LXT's uniform rule: ``x * y`` hands
    each operand half the relevance, ``R_u = R_v = R / 2``; ``u @ v`` the uniform ε-rule,
    ``R_u = u ⊙ ((R / stab(2z)) vᵀ)``, ``R_v = v ⊙ (uᵀ (R / stab(2z)))``."""

    epsilon: float
    needs_output = True

    def __call__(self, backend, step, r, inputs, z):
        g = r.value
        u, v = (t.to(g.dtype) for t in inputs)
        if step.kind == "mul":
            half = g / 2
            return [Rel(half.sum_to_size(u.shape)), Rel(half.sum_to_size(v.shape))]
        g = g / stabilize(2 * z.to(g.dtype), self.epsilon)
        return [Rel((u * (g @ v.transpose(-2, -1))).sum_to_size(u.shape)),
                Rel((v * (u.transpose(-2, -1) @ g)).sum_to_size(v.shape))]


# -- attention -------------------------------------------------------------------------------
def attention_qkv(step: Attention, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` as attention reads them: for ``nn.MultiheadAttention`` projected and split
    into heads, ``(N, H, L, d)``; for ``scaled_dot_product_attention`` the inputs as given."""
    if step.v_weight is None:
        return xq, xk, xv
    def heads(x, w, b):
        y = F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        return y.unflatten(-1, (step.num_heads, -1)).transpose(1, 2)
    return (heads(xq, step.q_weight, step.q_bias), heads(xk, step.k_weight, step.k_bias),
            heads(xv, step.v_weight, step.v_bias))


def merge_heads(step: Attention, o: torch.Tensor) -> torch.Tensor:
    """``(N, H, L, d)`` → ``(N, L, H·d)`` for a MultiheadAttention (SDPA: unchanged)."""
    return o if step.v_weight is None else o.transpose(1, 2).flatten(2)


def split_heads(step: Attention, o: torch.Tensor) -> torch.Tensor:
    return o if step.v_weight is None else o.unflatten(-1, (step.num_heads, -1)).transpose(1, 2)


def attention_bias(step: Attention, xq: torch.Tensor, xk: torch.Tensor,
                   masks: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The step's masks (``masks``: the tensors in ``step.mask_slots``' order) and causal
    mask as one additive float mask on the scores, broadcast (a view) to ``(N, H, L, S)``
    (SDPA: the query's leading dims, ``L``, ``S``); None without any. It leads with the batch
    dimension whatever the layout of ``xq``, so it is per sample like every tape entry."""
    if not masks and not step.causal:
        return None
    mha = step.v_weight is not None
    dtype = xq.dtype
    if mha:
        seq, batch = (1, 0) if step.batch_first else (0, 1)
        n, length, source = xq.shape[batch], xq.shape[seq], xk.shape[seq]
        lead = (n, step.num_heads)
    else:
        lead, length, source = xq.shape[:-2], xq.shape[-2], xk.shape[-2]

    def additive(mask: torch.Tensor, blocked: bool) -> torch.Tensor:
        """bool: -inf where ``mask == blocked``; float: added as it is."""
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                mask == blocked, float("-inf"))
        return mask.to(dtype)

    bias = torch.zeros((), dtype=dtype, device=xq.device)
    given = iter(masks)
    if step.mask is not None:
        mask = next(given)
        if mha and mask.dim() == 3:  # (N·H, L, S)
            mask = mask.view(*lead, length, source)
        bias = bias + additive(mask, blocked=mha)  # MultiheadAttention masks where True
    if step.padding_mask is not None:  # (N, S), True: ignore that key
        bias = bias + additive(next(given), blocked=True).view(lead[0], 1, 1, source)
    if step.causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=xq.device).tril()
        bias = bias + additive(allowed, blocked=False)
    return bias.expand(*lead, length, source)


def attention_forward(step: Attention, xv: torch.Tensor, xq: torch.Tensor, xk: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """The step's output, computed as torch computes it in eval (``bias`` from
    :func:`attention_bias`). A MultiheadAttention with ``batch_first=False`` reads and writes
    ``(L, N, E)``."""
    if step.v_weight is not None and not step.batch_first:
        xv, xq, xk = (t.transpose(0, 1) for t in (xv, xq, xk))
    q, k, v = attention_qkv(step, xq, xk, xv)
    o = merge_heads(step, F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                         scale=step.scale))
    if step.out_weight is None:
        return o
    b = None if step.out_bias is None else step.out_bias.to(o.dtype)
    out = F.linear(o, step.out_weight.to(o.dtype), b)
    return out if step.batch_first else out.transpose(0, 1)


def _unit(t: torch.Tensor, l1: torch.Tensor | None = None) -> torch.Tensor:
    """``t / ‖t‖₁`` per sample (0 for an all-zero sample): the next sub-step's relevance;
    ``l1``: the norms when a backend computed them already."""
    l1 = l1_per_sample(t) if l1 is None else l1
    return t * per_sample(safe_ratio(torch.ones_like(l1), l1), t)


def _attention_operands(step: Attention, inputs: Sequence[torch.Tensor], dtype: torch.dtype):
    """``(q, k, v, bias)`` in the relevance's dtype; the bias as recorded (a broadcast view:
    a cast would materialise it, and the scores' dtype wins the addition anyway)."""
    xv, xq, xk, *bias = inputs
    xv, xq, xk = (t.to(dtype) for t in (xv, xq, xk))
    return (xv, *attention_qkv(step, xq, xk, xv), bias[0] if bias else None)


@dataclass(frozen=True)
class RlrpAttention:
    """Attention as three successive linear steps (docs/RLRP_SPEC.md), each renormalised with one
    scalar per sample over the whole tensor: the output projection ``R̃_o = o ⊙ (W_oᵀ R)``,
    the value mixing with ``P`` held constant ``R̃_V = V ⊙ (Pᵀ R_o)`` (``V`` with its bias),
    the value projection ``R̃_x = x ⊙ (W_vᵀ R_V)``. ``norm="neuron"`` divides each by its own
    ``s = |W||a|`` (``s = P|V|`` for the mixing). ``scaled_dot_product_attention`` has the
    value mixing only. Query and key get nothing. Between the sub-steps the relevance is kept
    at unit L1 per sample; the mass rides along. ``P v``, ``P|v|`` and the mixing's relevance
    with its L1 norm are the backend's ``attention_mix``/``attention_relevance`` (the
    ``triton`` backend never materialises ``P``)."""

    neuron: bool = False
    needs_output = False

    def _linear(self, g, a, w):
        w = w.to(g.dtype)
        if self.neuron:
            g = safe_ratio(g, F.linear(a.abs(), w.abs()))
        return a * (g @ w)

    def __call__(self, backend, step, r, inputs, z):
        r, plain = _carry(r)
        xv, q, k, v, bias = _attention_operands(step, inputs, r.value.dtype)
        o, o_abs, state = backend.attention_mix(q, k, v, bias, step.scale, self.neuron)
        g = r.value * per_sample(r.unit_scale(), r.value)
        if step.out_weight is not None:
            g = split_heads(step, _unit(self._linear(g, merge_heads(step, o),
                                                     step.out_weight)))
        if self.neuron:
            g = safe_ratio(g, o_abs)
        r_tilde, l1 = backend.attention_relevance(q, k, v, g, bias, step.scale, state, True)
        if step.v_weight is not None:
            r_tilde = self._linear(_unit(merge_heads(step, r_tilde), l1), xv, step.v_weight)
            l1 = l1_per_sample(r_tilde)
        return _settle([Rel(r_tilde, r.mass, l1)], plain)


@dataclass(frozen=True)
class EpsilonAttention:
    """The classic rules at attention (LXT's convention; zennit has none): LRP-ε on the value
    path with ``P`` held constant: ``R_o = o ⊙ W_oᵀ(R / stab(z))`` (``z`` the output, its bias
    included), ``R_V = V ⊙ Pᵀ(R_o / stab(P V))``, ``R_x = x ⊙ W_vᵀ(R_V / stab(V))``; query
    and key get nothing. ``P V`` and ``V ⊙ Pᵀ(·)`` are the backend's (as in
    :class:`RlrpAttention`)."""

    epsilon: float
    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        g = r.value
        dtype = g.dtype
        xv, q, k, v, bias = _attention_operands(step, inputs, dtype)
        pv, _, state = backend.attention_mix(q, k, v, bias, step.scale, False)
        if step.out_weight is not None:
            o = merge_heads(step, pv)
            w = step.out_weight.to(dtype)
            out = F.linear(o, w, None if step.out_bias is None else step.out_bias.to(dtype))
            g = split_heads(step, o * ((g / stabilize(out, self.epsilon)) @ w))
        r_v, _ = backend.attention_relevance(q, k, v, g / stabilize(pv, self.epsilon), bias,
                                             step.scale, state, False)
        if step.v_weight is None:
            return [Rel(r_v)]
        r_v, v = merge_heads(step, r_v), merge_heads(step, v)
        return [Rel(xv * ((r_v / stabilize(v, self.epsilon)) @ step.v_weight.to(dtype)))]


@dataclass(frozen=True)
class RlrpWindowAttention(RlrpAttention):
    """Window attention (Swin, MaxViT): the relevance at the output reaches the windows
    through the adjoint of the window layout (Swin: crop → zero padding, shift undone,
    partition), then the three linear sub-steps of :class:`RlrpAttention` in every window at
    once — output projection, value mixing with ``P`` held constant (position bias, shift
    mask and V2's cosine scaling are all inside ``P``), value projection — each renormalised
    with one scalar per sample over all windows, heads and tokens; back to the map through
    the layout. Swin's padded tokens' values (their bias) take relevance at the mixing and
    pass none on (their input is 0). ``P`` stays materialised here on every backend: windows
    are short (49 tokens), so it is small."""

    def __call__(self, backend, step, r, inputs, z):
        r, plain = _carry(r)
        dtype = r.value.dtype
        terms = windows.attention_terms(step, inputs[0].to(dtype))
        g = windows.to_windows(step, r.value * per_sample(r.unit_scale(), r.value),
                               terms.geometry)
        o = windows.merge_heads(terms.p @ terms.v)
        g = windows.split_heads(_unit(self._linear(g, o, step.proj_weight)), step.num_heads)
        if self.neuron:
            g = safe_ratio(g, terms.p @ terms.v.abs())
        r_v = windows.merge_heads(terms.v * (terms.p.transpose(-2, -1) @ g))
        w_v, _ = windows.value_weight(step)
        r_x = self._linear(_unit(r_v), terms.xw, w_v)
        r_tilde = windows.from_windows(step, r_x, terms.geometry)
        return _settle([Rel(r_tilde, r.mass, l1_per_sample(r_tilde))], plain)


@dataclass(frozen=True)
class EpsilonWindowAttention:
    """The classic rules at window attention (Swin, MaxViT), as :class:`EpsilonAttention`
    (LRP-ε on the value path, ``P`` held constant) inside the windows."""

    epsilon: float
    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        dtype = r.value.dtype
        terms = windows.attention_terms(step, inputs[0].to(dtype))
        g = windows.to_windows(step, r.value, terms.geometry)
        pv = terms.p @ terms.v
        o = windows.merge_heads(pv)
        w_o = step.proj_weight.to(dtype)
        out = F.linear(o, w_o, None if step.proj_bias is None else step.proj_bias.to(dtype))
        g = windows.split_heads(o * ((g / stabilize(out, self.epsilon)) @ w_o), step.num_heads)
        r_v = terms.v * (terms.p.transpose(-2, -1) @ (g / stabilize(pv, self.epsilon)))
        v = windows.merge_heads(terms.v)
        w_v, _ = windows.value_weight(step)
        r_x = terms.xw * ((windows.merge_heads(r_v) / stabilize(v, self.epsilon))
                          @ w_v.to(dtype))
        return [Rel(windows.from_windows(step, r_x, terms.geometry))]


@dataclass(frozen=True)
class PassToSignal:
    """The classic rules at a gate or constant scale (zennit/LXT): the gate is a constant and
    the signal the only contributor to each output, so the signal receives the relevance
    itself; at a normalisation layer, LXT's identity through it."""

    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        return [Rel(r.value.sum_to_size(inputs[0].shape), r.mass)]


@dataclass(frozen=True)
class GateMatmulTerms:
    """The classic rules at a matmul gate ``z = G s`` (attention written out; no signal
    passes unchanged through a matmul): ε on the signal with the gate held constant,
    ``R_s = s ⊙ Gᵀ(R / stab(z))``, as :class:`EpsilonAttention`'s value mixing."""

    stabilizer: float
    needs_output = True

    def __call__(self, backend, step, r, inputs, z):
        g = r.value / stabilize(z.to(r.value.dtype), self.stabilizer)
        signal, gate = (t.to(g.dtype) for t in inputs)
        return [Rel(signal * step.adjoint(gate, g))]


def _pass_to_signal(step: Step, stabilizer: float):
    """The base rule's propagator at a gate or normalisation layer."""
    if isinstance(step, Gate) and step.kind == "matmul":
        return GateMatmulTerms(stabilizer)
    return PassToSignal()


# -- zennit's rules ------------------------------------------------------------------------
@dataclass(frozen=True)
class NormTerms:
    """zennit's ``Norm``: ``R_a = a ⊙ Pᵀ(R / stab(z))`` for fixed linear maps and sums."""

    stabilizer: float
    needs_output = True

    def __call__(self, backend, step, r, inputs, z):
        g = r.value / stabilize(z.to(r.value.dtype), self.stabilizer)
        if isinstance(step, Add):
            return [Rel((u.to(g.dtype) * g).sum_to_size(u.shape)) for u in step.signed(inputs)]
        return [Rel(_fixed_linear_back(backend, step, g, inputs[0]))]


@dataclass(frozen=True)
class EpsilonTerms:
    """LRP-ε (LRP-0 for ``epsilon = 0``): ``R_a = a ⊙ Wᵀ(R / stab(z))``."""

    weight: torch.Tensor
    epsilon: float
    needs_output = True

    def __call__(self, backend, step, r, inputs, z):
        a = inputs[0]
        return [Rel(backend.affine_relevance(step, self.weight, r.value, a.shape, a, z=z,
                                             eps=self.epsilon))]


def _pos(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(max=0)


@dataclass(frozen=True)
class TwoSignTerms:
    """The family of z⁺, γ and αβ: inputs split by sign, weights modified per sign.

    For each *output group* ``k`` (z⁺: one; αβ and γ: a positive and a negative one), the
    denominator is ``z_k = W_k⁺ a⁺ + b_k + W_k⁻ a⁻`` and
    ``R_a += c_k · (a⁺ ⊙ W_k⁺ᵀ g_k + a⁻ ⊙ W_k⁻ᵀ g_k)`` with ``g_k = m_k ⊙ R / stab(z_k)``,
    where ``m_k`` is a mask on the original output's sign (γ) or 1.
    """

    # per group: (weight applied to a⁺, bias, weight applied to a⁻, coefficient, mask sign)
    groups: tuple[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, float, int], ...]
    stabilizer: float
    needs_output: bool = False

    def __call__(self, backend, step, r, inputs, z):
        t = r.value
        a = inputs[0].to(t.dtype)
        # after a ReLU the a⁻ half is all zeros: skip its copies, forwards and contractions
        has_neg = bool((a < 0).any())
        a_pos = a.clamp(min=0) if has_neg else a
        a_neg = a.clamp(max=0) if has_neg else None
        out = None
        for w_for_pos, bias, w_for_neg, coef, mask_sign in self.groups:
            zk = backend.affine_forward(step, w_for_pos, bias, a_pos)
            if has_neg:
                zk = zk + backend.affine_forward(step, w_for_neg, None, a_neg)
            g = t * ((z.to(t.dtype) * mask_sign) > 0) if mask_sign else t
            # the backend divides by stab(z_k) inside the contraction (no g/z tensor)
            term = backend.affine_relevance(step, w_for_pos, g, a.shape, a_pos, z=zk,
                                            eps=self.stabilizer)
            if has_neg:
                term = term + backend.affine_relevance(step, w_for_neg, g, a.shape, a_neg,
                                                       z=zk, eps=self.stabilizer)
            term = term.mul_(coef) if coef != 1 else term
            out = term if out is None else out.add_(term)
        return [Rel(out)]


@dataclass(frozen=True)
class ZBoxTerms:
    """zB: ``z = W a + b − (W⁺ l + b⁺) − (W⁻ h + b⁻)``,
    ``R_a = a ⊙ Wᵀg − l ⊙ W⁺ᵀg − h ⊙ W⁻ᵀg`` with ``g = R / stab(z)``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    low: torch.Tensor
    high: torch.Tensor
    stabilizer: float
    needs_output = True

    def __call__(self, backend, step, r, inputs, z):
        t = r.value
        a = inputs[0].to(t.dtype)
        low, high = _bounds_like(self.low, self.high, a)
        w_pos, w_neg = self.weight.clamp(min=0), self.weight.clamp(max=0)
        zb = (z.to(t.dtype) - backend.affine_forward(step, w_pos, _pos(self.bias), low)
              - backend.affine_forward(step, w_neg, _neg(self.bias), high))
        g = t / stabilize(zb, self.stabilizer)
        return [Rel(backend.affine_relevance(step, self.weight, g, a.shape, a)
                    - backend.affine_relevance(step, w_pos, g, a.shape, low)
                    - backend.affine_relevance(step, w_neg, g, a.shape, high))]


@dataclass(frozen=True)
class InputFree:
    """Flat and w²: the input is replaced by ones, ``R_a = Vᵀ(R / stab(V·1 + c))``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stabilizer: float
    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        t = r.value
        shape = inputs[0].shape
        ones = torch.ones((), dtype=t.dtype, device=t.device).expand(shape)
        z_ones = backend.affine_forward(step, self.weight, self.bias, ones)
        return [Rel(backend.affine_relevance(step, self.weight, t, shape, z=z_ones,
                                             eps=self.stabilizer))]


@dataclass(frozen=True)
class PassTerms:
    """zennit's ``Pass``: the relevance goes on unchanged (a lone BatchNorm)."""

    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        return [r]


# -- rule objects --------------------------------------------------------------------------
# A rule object is what a user names (``Epsilon(0.25)``); it validates its parameters when
# built and, for each plan step it is assigned to, builds the propagator above that does the
# work (its modified weights prepared once, per dtype). Adding a rule is one subclass:
# ``applies_to`` (the step kinds it has a meaning for) and ``propagator``.
RULED_STEPS = (Affine, Pool, Scale, Add, Gate, Normalization, Attention, WindowAttention,
               Product)  # the steps a rule is assigned to


class Rule:
    """Base of the rule objects (``RLRP``, ``Epsilon``, ``ZPlus``, ``Gamma``, ``AlphaBeta``,
    ``ZBox``, ``Flat``, ``WSquare``, ``Norm``, ``Pass``).

    Subclasses set ``applies_to`` (the plan step kinds the rule has a meaning for: ``Affine``
    is a Linear/ConvNd, ``Pool`` an average pool or mean, ``Scale`` a BatchNorm with nothing
    to fold into, ``Add`` a residual sum, ``Gate`` a product with a gate or constant,
    ``Normalization`` a layer/group/RMS norm) and implement :meth:`propagator`."""

    applies_to: tuple[type, ...] = (Affine,)

    def propagator(self, step: Step, dtype: torch.dtype) -> Propagator:
        """The propagator that applies this rule to ``step``, its weights in ``dtype``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={_show(v)}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


def _stab_param(stabilizer) -> float:
    _check_number("stabilizer", stabilizer)
    return float(stabilizer)


class RLRP(Rule):
    """R-LRP (``docs/RLRP_SPEC.md``): ``R̃_a = a ⊙ (Wᵀ R_z)`` renormalised to ``‖R_z‖₁`` per
    sample on Linear/Conv, average pools, means and lone BatchNorms; at residual sums
    ``skip="linear"`` (the sum as a unit-weight linear map, one joint scale) or ``"ratio"``
    (the paper's ``R_u = (u / y) R_y``). ``norm="layer"`` divides by nothing;
    ``norm="neuron"`` splits each neuron's relevance by its inputs' contributions relative
    to their absolute sum (not at sums). Default ``norm``: :data:`DEFAULT_NORM`."""

    applies_to = RULED_STEPS

    def __init__(self, norm: str = DEFAULT_NORM, skip: str = "linear") -> None:
        if skip not in ("linear", "ratio"):
            raise ValueError(f"skip must be 'linear' or 'ratio', got {skip!r}")
        if norm not in ("layer", "neuron"):
            raise ValueError(f"norm must be 'layer' or 'neuron', got {norm!r}")
        self.norm, self.skip = norm, skip

    def propagator(self, step, dtype):
        neuron = self.norm == "neuron"
        if isinstance(step, Gate):
            return RlrpGate(neuron)
        if isinstance(step, Normalization):
            return RlrpNormalization(neuron)
        if isinstance(step, Product):  # the layer form under both norms (RLRP_SPEC.md)
            return RlrpProduct()
        if isinstance(step, Attention):
            return RlrpAttention(neuron)
        if isinstance(step, WindowAttention):
            return RlrpWindowAttention(neuron)
        if isinstance(step, Affine):
            scale = None if step.channel_scale is None else step.channel_scale.to(dtype)
            weight = step.weight.to(dtype)
            return RlrpAffine(weight, scale, neuron)
        if isinstance(step, Add):  # sums never take the neuron form (docs/RLRP_SPEC.md)
            # a constant added is a bias: the linear rule over the tensors, under every skip
            linear = self.skip == "linear" or bool(step.bias_slots)
            return RlrpAddLinear() if linear else RlrpAddRatio()
        return RlrpFixedLinear(neuron)


class Norm(Rule):
    """zennit's ``Norm``: ``R_a = a ⊙ Mᵀ(R / stab(z))`` — the base rule of average pools,
    means, residual sums and lone BatchNorms; on a Linear/Conv it is LRP-ε with
    ``ε = stabilizer`` (the bias in ``z``), as zennit's."""

    applies_to = RULED_STEPS

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = _stab_param(stabilizer)

    def propagator(self, step, dtype):
        if isinstance(step, Affine):
            return EpsilonTerms(step.effective_weight(dtype), self.stabilizer)
        if isinstance(step, (Gate, Normalization)):  # the base rules' convention (zennit/LXT)
            return _pass_to_signal(step, self.stabilizer)
        if isinstance(step, Attention):  # LXT's: ε on the value path, P held constant
            return EpsilonAttention(self.stabilizer)
        if isinstance(step, WindowAttention):
            return EpsilonWindowAttention(self.stabilizer)
        if isinstance(step, Product):  # LXT's uniform rule
            return UniformProduct(self.stabilizer)
        return NormTerms(self.stabilizer)


class Pass(Rule):
    """zennit's ``Pass``: relevance goes on unchanged. Activations get it by default; of
    the other steps a lone BatchNorm, a gate's signal and a normalisation layer can take it."""

    applies_to = (Scale, Gate, Normalization)

    def propagator(self, step, dtype):
        return PassTerms() if isinstance(step, Scale) else PassToSignal()


class Epsilon(Rule):
    """LRP-ε: ``R_a = a ⊙ Wᵀ(R / stab(z))``, ``stab(z) = z + ε·(sign(z) + (z == 0))``;
    ``Epsilon(0)`` is LRP-0. An ``nn.MultiheadAttention`` whose output projection (a Linear)
    the composite maps to this rule gets ε on its value path (:class:`EpsilonAttention`)."""

    applies_to = (Affine, Attention, WindowAttention)

    def __init__(self, epsilon: float = 1e-6) -> None:
        _check_number("epsilon", epsilon)
        self.epsilon = float(epsilon)

    def propagator(self, step, dtype):
        if isinstance(step, Attention):
            return EpsilonAttention(self.epsilon)
        if isinstance(step, WindowAttention):
            return EpsilonWindowAttention(self.epsilon)
        return EpsilonTerms(step.effective_weight(dtype), self.epsilon)


def _weight_bias(step: Affine, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    return step.effective_weight(dtype), None if step.bias is None else step.bias.to(dtype)


class ZPlus(Rule):
    """z⁺ (zennit's ``ZPlus``): positive contributions only, ``a⁺w⁺ + a⁻w⁻`` over
    ``stab(Σ … + b⁺)``."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = _stab_param(stabilizer)

    def propagator(self, step, dtype):
        w, b = _weight_bias(step, dtype)
        return TwoSignTerms(((w.clamp(min=0), _pos(b), w.clamp(max=0), 1.0, 0),),
                            self.stabilizer)


class Gamma(Rule):
    """γ (zennit's ``Gamma``): weights ``w + γw⁺`` for outputs with ``z > 0``,
    ``w + γw⁻`` for ``z < 0`` (inputs split by sign)."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        _check_number("gamma", gamma)
        self.gamma, self.stabilizer = float(gamma), _stab_param(stabilizer)

    def propagator(self, step, dtype):
        w, b = _weight_bias(step, dtype)
        gamma = self.gamma
        w_up, w_down = w + gamma * w.clamp(min=0), w + gamma * w.clamp(max=0)
        b_up = None if b is None else b + gamma * b.clamp(min=0)
        b_down = None if b is None else b + gamma * b.clamp(max=0)
        return TwoSignTerms(((w_up, b_up, w_down, 1.0, 1), (w_down, b_down, w_up, 1.0, -1)),
                            self.stabilizer, needs_output=True)


class AlphaBeta(Rule):
    """αβ (zennit's ``AlphaBeta``): ``α`` times the positive contributions' share minus
    ``β`` times the negative ones'; ``alpha − beta == 1``."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6
                 ) -> None:
        _check_number("alpha", alpha)
        _check_number("beta", beta)
        stabilizer = _stab_param(stabilizer)
        if abs(alpha - beta - 1) > 1e-12:
            raise ValueError("alphabeta needs alpha - beta == 1 (as zennit)")
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), stabilizer

    def propagator(self, step, dtype):
        w, b = _weight_bias(step, dtype)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        return TwoSignTerms(((wp, _pos(b), wn, self.alpha, 0),
                             (wn, _neg(b), wp, -self.beta, 0)), self.stabilizer)


class ZBox(Rule):
    """zᴮ (zennit's ``ZBox``) for inputs bounded by ``low`` and ``high``: scalars, ``(C,)``
    per channel, ``(C, 1, 1)`` or ``(1, C, 1, 1)`` (zennit's shape)."""

    def __init__(self, low, high, stabilizer: float = 1e-6) -> None:
        if low is None or high is None:
            raise ValueError("ZBox needs the input's bounds: pass low=... and high=... (the "
                             "lowest and highest possible input values, scalars or "
                             "per-channel tensors)")
        self.stabilizer = _stab_param(stabilizer)
        _check_bounds(low, high)
        self.low, self.high = low, high

    def propagator(self, step, dtype):
        w, b = _weight_bias(step, dtype)
        return ZBoxTerms(w, b, _bound(self.low, dtype, w.device),
                         _bound(self.high, dtype, w.device), self.stabilizer)


class Flat(Rule):
    """flat (zennit's ``Flat``): every connection weighs 1, the input is 1, no bias."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = _stab_param(stabilizer)

    def propagator(self, step, dtype):
        return InputFree(torch.ones_like(step.weight, dtype=dtype), None, self.stabilizer)


class WSquare(Rule):
    """w² (zennit's ``WSquare``): weights squared, the input is 1."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = _stab_param(stabilizer)

    def propagator(self, step, dtype):
        w, b = _weight_bias(step, dtype)
        return InputFree(w * w, None if b is None else b * b, self.stabilizer)


# -- composites ----------------------------------------------------------------------------
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what a plain rule or ``first`` maps
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
RuleFor = Callable[[str, nn.Module], "Rule | None"]


class Composite:
    """Which rule each layer gets: zennit's composites, on this engine.

    Args:
        layer_map: ``[(types, rule), ...]``: a layer gets the rule of the first entry whose
            type(s) it is an instance of (``types`` a class or a tuple of classes, e.g.
            ``nn.Conv2d``, ``(nn.Conv2d, nn.Linear)``, or zennit's ``zennit.types``).
        first: the rule for the first layer in forward order: a rule (the first Linear or
            Conv), or zennit's ``first_map`` ``[(types, rule), ...]`` (the first layer that
            matches any entry gets that entry's rule; ``EpsilonGammaBox`` uses the first
            conv).
        names: ``{qualified module name: rule}`` (``"features.0"``, ``"layer1.0.conv2"``).
            A BatchNorm folded into the conv before it belongs to that conv: name the conv.
        rule_for: ``(name, module) -> rule | None`` for anything else (per-layer ε, a rule
            chosen from a layer's statistics); called for each Linear/Conv, average pool and
            lone BatchNorm module that nothing above matched.
        base: the rule for the average pools, means, residual sums and lone BatchNorms that
            nothing above names (default ``Norm()``, zennit's, as its presets).

    Priority: ``names``, then ``first``, then ``layer_map``, then ``rule_for``, then
    ``base`` (which a Linear/Conv never falls to: one that nothing names is an error, not a
    silent choice). Activations pass relevance through, max-pools give it to the winner,
    reshapes and cats route it, under every composite.

    Steps with no module of their own — residual sums written ``a + b`` or ``torch.add``,
    functional ``F.avg_pool2d``/``torch.mean`` — get ``base``; functional activations and
    max-pools route like their modules. (A Linear/Conv is always a module: ``F.linear`` or
    ``F.conv2d`` on parameters is refused when the model is traced.)

    Mixing R-LRP with classic rules: R-LRP layers renormalise (``R_a`` gets the L1 norm of
    the relevance that arrives at the layer), classic layers do not. Only when every step
    is R-LRP does relevance carry its L1 mass apart and does each sample's map keep the
    output's L1 mass exactly (forks and max-pools then keep the mass that arrives, too);
    in a mixed composite forks sum plainly, as the classic rules do.
    """

    def __init__(self, layer_map: Sequence[tuple] = (), first=None,
                 names: Mapping[str, Rule] | None = None, rule_for: RuleFor | None = None,
                 base: Rule | None = None) -> None:
        self.layer_map = [(_check_types(types, "layer_map"), _check_rule(rule, "layer_map"))
                          for types, rule in _pairs(layer_map, "layer_map")]
        if first is None or isinstance(first, Rule):
            self.first = [] if first is None else [(LAYERS, first)]
        else:
            self.first = [(_check_types(types, "first"), _check_rule(rule, "first"))
                          for types, rule in _pairs(first, "first")]
        if names is not None and not isinstance(names, Mapping):
            raise TypeError(f"names must be a mapping {{module name: rule}}, got "
                            f"{type(names).__name__}")
        self.names = {str(k): _check_rule(v, "names") for k, v in (names or {}).items()}
        if rule_for is not None and not callable(rule_for):
            raise TypeError(f"rule_for must be a callable (name, module) -> rule | None, got "
                            f"{type(rule_for).__name__}")
        self.rule_for = rule_for
        self.base = Norm() if base is None else _check_rule(base, "base")
        missing = [k.__name__ for k in (Pool, Scale, Add) if k not in self.base.applies_to]
        if missing:
            raise ValueError(f"base must apply to average pools, sums and lone BatchNorms "
                             f"(Norm() or RLRP()); {self.base!r} does not")

    def __repr__(self) -> str:
        parts = [f"layer_map={self.layer_map!r}"]
        if self.first:
            parts.append(f"first={self.first!r}")
        if self.names:
            parts.append(f"names={self.names!r}")
        if self.rule_for is not None:
            parts.append(f"rule_for={self.rule_for!r}")
        parts.append(f"base={self.base!r}")
        return f"Composite({', '.join(parts)})"

    @classmethod
    def of(cls, rule: Rule) -> "Composite":
        """A rule on the whole network: on every Linear/Conv, and, for rules that have a
        meaning there (``RLRP``, ``Norm``), on pools, sums and lone BatchNorms too; else
        those get ``Norm`` with the rule's stabiliser (as zennit's presets)."""
        if isinstance(rule, Pass):
            raise ValueError("Pass() alone would leave every Linear/Conv without a rule; use "
                             "it in a Composite (names=..., layer_map=...)")
        if all(k in rule.applies_to for k in (Pool, Scale, Add)):
            base = rule
        else:
            base = Norm(getattr(rule, "stabilizer", 1e-6))
        return cls(layer_map=[(LAYERS, rule)], base=base)

    def assign(self, plan: Plan, model: nn.Module) -> "Assignment":
        """The rule of every step of ``plan`` (None for routing steps), ``model`` being the
        module the plan was traced from."""
        modules = dict(model.named_modules())
        unknown = sorted(set(self.names) - {s.module for s in plan.steps
                                            if isinstance(s, RULED_STEPS) and s.module})
        for name in unknown:
            if name not in modules:
                raise ValueError(f"names: the model has no module {name!r}")
            module = modules[name]
            if not isinstance(self.names[name], Pass):
                raise ValueError(
                    f"names: module {name!r} ({type(module).__name__}) has no linear step of "
                    "its own (an activation, max-pool, reshape, Identity or Dropout routes "
                    "relevance; a BatchNorm folded into the conv before it belongs to that "
                    "conv: name the conv)")
        first = self._first_step(plan, modules)
        rules: list[Rule | None] = []
        for step in plan.steps:
            if not isinstance(step, RULED_STEPS):
                rules.append(None)
                continue
            module = modules.get(step.module) if step.module else None
            rule = self._rule_of(step, module, first)
            if not isinstance(step, rule.applies_to):
                raise ValueError(f"rule {rule!r} does not apply to {_describe(step, module)}; "
                                 f"it applies to {_kinds(rule.applies_to)}")
            rules.append(rule)
        return Assignment(tuple(rules))

    def _first_step(self, plan: Plan, modules: dict) -> tuple[Step, Rule] | None:
        for step in plan.steps:
            module = modules.get(step.module) if step.module else None
            if module is None or not isinstance(step, RULED_STEPS):
                continue
            for types, rule in self.first:
                if isinstance(module, types):
                    return step, rule
        return None

    def _rule_of(self, step: Step, module: nn.Module | None, first) -> Rule:
        if isinstance(step, (Attention, WindowAttention)):
            return self._attention_rule(step, module)
        if module is not None:
            if step.module in self.names:
                return self.names[step.module]
            if first is not None and first[0] is step:
                return first[1]
            for types, rule in self.layer_map:
                if isinstance(module, types):
                    return rule
            if self.rule_for is not None:
                rule = self.rule_for(step.module, module)
                if rule is not None:
                    return _check_rule(rule, f"rule_for({step.module!r}, ...)")
        if isinstance(step, Affine):
            raise ValueError(f"the composite gives {_describe(step, module)} no rule; map "
                             "its type in layer_map, its name in names, or return a rule "
                             "for it from rule_for")
        return self.base


    def _attention_rule(self, step: Step, module: nn.Module | None) -> Rule:
        """An attention module named in ``names`` gets that rule; else the rule its output
        projection (a Linear: ``out_proj``; window attention's ``proj``/``merge``) maps to
        when that rule has a meaning at attention (R-LRP, ε: the dense layers' ε), else
        ``base``.
        ``scaled_dot_product_attention`` (no module) gets ``base``."""
        if module is not None and step.module in self.names:
            return self.names[step.module]
        out_proj = getattr(module, step.out_proj if isinstance(step, WindowAttention)
                           else "out_proj", None)
        if isinstance(out_proj, nn.Linear):
            for types, rule in self.layer_map:
                if isinstance(out_proj, types):
                    return rule if type(step) in rule.applies_to else self.base
        return self.base


@dataclass(frozen=True)
class Assignment:
    """One rule per plan step (None for routing steps): what an explainer runs."""

    rules: tuple[Rule | None, ...]

    @property
    def keeps_mass(self) -> bool:
        """Every rule is R-LRP (or Pass): relevance carries its L1 mass apart, and forks
        keep the mass that arrives."""
        used = [r for r in self.rules if r is not None]
        return all(isinstance(r, (RLRP, Pass)) for r in used) and any(
            isinstance(r, RLRP) for r in used)

    def propagators(self, plan: Plan, dtype: torch.dtype) -> list[Propagator | None]:
        """One propagator per step of ``plan`` (None for routing steps), weights in ``dtype``."""
        return [None if rule is None else rule.propagator(step, dtype)
                for rule, step in zip(self.rules, plan.steps)]


def _pairs(pairs, what: str) -> list[tuple]:
    try:
        out = [tuple(p) for p in pairs]
    except TypeError:
        raise TypeError(f"{what} must be a list of (types, rule) pairs, got "
                        f"{type(pairs).__name__}") from None
    if any(len(p) != 2 for p in out):
        raise TypeError(f"{what} must be a list of (types, rule) pairs")
    return out


def _check_types(types, what: str):
    try:
        isinstance(None, types)
    except TypeError:
        raise TypeError(f"{what}: {types!r} is not a type or a tuple of types") from None
    return types


def _check_rule(rule, what: str) -> Rule:
    if not isinstance(rule, Rule):
        raise TypeError(f"{what}: expected a rule object (rlrp_fast.rules.Epsilon(...), "
                        f"...), got {_show(rule)}")
    return rule


def _describe(step: Step, module: nn.Module | None) -> str:
    if module is None:
        kind = {Add: "residual sum", Pool: "pooling/mean"}.get(type(step), type(step).__name__)
        return f"the {kind} {step.target!r} (node {step.name!r})"
    return f"layer {step.module!r} ({type(module).__name__})"


def _kinds(kinds: tuple[type, ...]) -> str:
    words = {Affine: "Linear/Conv", Pool: "average pools and means", Scale: "lone BatchNorms",
             Add: "residual sums", Gate: "gated or scaled products",
             Normalization: "normalisation layers", Attention: "attention",
             WindowAttention: "window attention", Product: "products of two signals"}
    return ", ".join(words[k] for k in kinds)


def _bound(value, dtype, device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype, device=device)


def _bound_like(bound: torch.Tensor, a: torch.Tensor, name: str) -> torch.Tensor:
    """``low``/``high`` broadcast to the layer input ``a`` ``(N, C, ...)``: a scalar, a
    per-channel ``(C,)`` vector, or a tensor broadcastable with or without the batch dim
    (zennit's ``(1, C, 1, 1)`` and ``(C, 1, 1)`` both work). On a ``(N, features)`` input a
    ``(features,)`` vector is one bound per feature."""
    given = tuple(bound.shape)
    bound = bound.to(a.dtype)
    if bound.dim() == 1 and a.dim() > 2:
        # a vector on an image is per channel (never per column, which also broadcasts)
        if bound.numel() != a.shape[1]:
            raise ValueError(f"{name} of shape {given} does not broadcast to the input "
                             f"{tuple(a.shape)} of a layer the zB rule applies to: a vector "
                             f"holds one bound per channel ({a.shape[1]} here)")
        bound = bound.view(1, -1, *([1] * (a.dim() - 2)))
    elif 0 < bound.dim() == a.dim() - 1:
        bound = bound.unsqueeze(0)
    try:
        return bound.expand_as(a)
    except RuntimeError:
        raise ValueError(f"{name} of shape {given} does not broadcast to the input "
                         f"{tuple(a.shape)} of a layer the zB rule applies to; pass a scalar, "
                         "a (C,) vector or a tensor shaped like one input") from None


def _bounds_like(low: torch.Tensor, high: torch.Tensor, a: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both bounds broadcast to ``a``, checked ``low <= high`` element by element (the check
    ``make_rule`` cannot do when their shapes alone do not say how they line up)."""
    low, high = _bound_like(low, a, "low"), _bound_like(high, a, "high")
    if (low > high).any():
        raise ValueError("low must not exceed high: " + _first_inversion(low, high))
    return low, high


def _first_inversion(low: torch.Tensor, high: torch.Tensor) -> str:
    index = tuple(int(i) for i in (low > high).nonzero()[0])
    where = f" at index {index}" if index else ""
    return f"low {low[index].item():g} > high {high[index].item():g}{where}"


_BOUND_HELP = ("a real number or a tensor/sequence of real numbers (the lowest and highest "
               "possible input values: scalars, (C,) per channel, (C, 1, 1) or (1, C, 1, 1))")


def _check_bound(name: str, value) -> torch.Tensor:
    """``low``/``high`` as a float64 CPU tensor to check, or a ValueError naming it."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (it has no values); pass {_BOUND_HELP}")
    if not _real_valued(value):
        raise ValueError(f"{name} must be {_BOUND_HELP}, got {_show(value)}")
    try:
        as_float = torch.as_tensor(value, dtype=torch.float64, device="cpu").detach()
    except (TypeError, ValueError, RuntimeError, OverflowError):  # "a", [[0], [0, 1]], ...
        raise ValueError(f"{name} must be {_BOUND_HELP}, got {_show(value)}") from None
    if not torch.isfinite(as_float).all():
        raise ValueError(f"{name} must be finite, got {_show(value)}")
    return as_float


def _real_valued(value) -> bool:
    """False for what a float64 cast would silently accept: bools, complex (imaginary part
    dropped); None and strings fail the cast itself."""
    if isinstance(value, (bool, complex, str, bytes)) or value is None:
        return False
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
    else:
        try:
            dtype = torch.as_tensor(value).dtype
        except (TypeError, ValueError, RuntimeError, OverflowError):
            return True  # e.g. an int beyond int64: the float64 cast decides
    return dtype != torch.bool and not dtype.is_complex


def _show(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_number(key: str, value) -> None:
    """A non-negative, finite real number (not a bool, not a tensor)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        try:
            ok = math.isfinite(float(value)) and value >= 0
        except OverflowError:  # an int too large for a float
            ok = False
    if not ok:
        raise ValueError(f"{key} must be a non-negative finite number, got {_show(value)}")


def _check_bounds(low, high) -> None:
    """``low``/``high`` real, finite, and ``low <= high`` where their shapes say how they
    line up (other pairs are checked where they meet the first layer's input)."""
    low, high = _check_bound("low", low), _check_bound("high", high)
    if low.dim() == high.dim() or low.dim() == 0 or high.dim() == 0:
        try:
            low, high = torch.broadcast_tensors(low, high)
        except RuntimeError:
            raise ValueError(f"low of shape {tuple(low.shape)} and high of shape "
                             f"{tuple(high.shape)} do not broadcast together") from None
        if (low > high).any():
            raise ValueError("low must not exceed high: " + _first_inversion(low, high))


# -- presets: every name ``Explainer(rule=...)`` takes, defined here and nowhere else -------
# Options each preset accepts, with defaults (zennit 0.5.1's defaults for the classic rules).
_OPTIONS: dict[str, dict[str, object]] = {
    "rlrp": {"skip": "linear", "norm": DEFAULT_NORM},
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


def _preset(name: str, o: dict) -> Rule | Composite:
    stab = o.get("stabilizer", 1e-6)
    if name == "rlrp":
        return RLRP(norm=o["norm"], skip=o["skip"])
    single = {"lrp0": lambda: Epsilon(0.0), "epsilon": lambda: Epsilon(o["epsilon"]),
              "zplus": lambda: ZPlus(stab), "gamma": lambda: Gamma(o["gamma"], stab),
              "alphabeta": lambda: AlphaBeta(o["alpha"], o["beta"], stab),
              "zbox": lambda: ZBox(o["low"], o["high"], stab), "flat": lambda: Flat(stab),
              "wsquare": lambda: WSquare(stab)}
    if name in single:
        return single[name]()
    dense = Epsilon(o["epsilon"])  # zennit's composites: ε on dense layers, Norm elsewhere
    if name == "EpsilonPlus":
        return Composite([(CONVOLUTIONS, ZPlus(stab)), (nn.Linear, dense)], base=Norm(stab))
    if name == "EpsilonPlusFlat":
        return Composite([(CONVOLUTIONS, ZPlus(stab)), (nn.Linear, dense)], first=Flat(stab),
                         base=Norm(stab))
    if name == "EpsilonGammaBox":
        return Composite([(CONVOLUTIONS, Gamma(o["gamma"], stab)), (nn.Linear, dense)],
                         first=[(CONVOLUTIONS, ZBox(o["low"], o["high"], stab))],
                         base=Norm(stab))
    raise AssertionError(name)  # unreachable: names are validated in make_rule


def make_rule(name: str, **options) -> Rule | Composite:
    """The preset ``name`` with its options (validated, defaults filled in): a rule object
    (the rule on the whole network) or a :class:`Composite`."""
    if name not in _OPTIONS:
        raise ValueError(f"unknown rule {name!r}; choose one of {RULES + ('gradient_x_input',)}")
    allowed = _OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"rule {name!r} takes no option(s) {unknown}; its options are "
                        f"{sorted(allowed) or 'none'}")
    merged = {**allowed, **options}
    if "low" in allowed and (merged["low"] is None or merged["high"] is None):
        raise ValueError(f"rule {name!r} needs the input's bounds: pass low=... and high=... "
                         "(the lowest and highest possible input values, scalars or "
                         "per-channel tensors)")
    return _preset(name, merged)


def resolve(rule, plan: Plan, model: nn.Module) -> Assignment:
    """The per-step rules of a preset's result, a rule object or a composite on ``plan``."""
    composite = rule if isinstance(rule, Composite) else Composite.of(_check_rule(rule, "rule"))
    return composite.assign(plan, model)
