"""Rules: how each linear op (and residual add) redistributes relevance.

A rule turns a :class:`Plan` into one *propagator* per step that needs one (``Affine``,
``Pool``, ``Scale``, ``Add``); routing steps (activations, max-pool, reshapes, cat) route
relevance the same way under every rule and live in ``engine.py``. Rule weights (z⁺, γ, flat,
w², ...) are derived here once, at construction, and held by the propagators.

``"rlrp"`` is the formulation of ``RLRP_SPEC.md``. The classic rules and composites mean what
zennit 0.5.1 means by them: its stabiliser ``z + ε·(sign(z) + (z == 0))``, ``Pass`` on
activations and its ``Norm`` rule on average pools and residual sums. A BatchNorm with nothing
to fold into is a fixed diagonal linear map and gets ``Norm`` too (zennit has no rule for it).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from .backends import Backend
from .numerics import (Rel, l1_per_sample, per_channel, per_sample, safe_ratio, share_mass,
                       stabilize)
from .plan import Add, Affine, Gate, LayerNorm, Plan, Pool, Scale, Step, scale_rows

SINGLE_RULES = ("lrp0", "epsilon", "zplus", "gamma", "alphabeta", "zbox", "flat", "wsquare")
COMPOSITES = ("EpsilonPlus", "EpsilonGammaBox", "EpsilonPlusFlat")
RULES = ("rlrp", *SINGLE_RULES, *COMPOSITES)

# R-LRP's reading of the paper by default: "layer" (divide by nothing, renormalise each layer)
# or "neuron" (each neuron's contributions relative to their absolute sum); docs/EVALUATION.md
# holds the measurement that decides it.
DEFAULT_NORM = "layer"

# Options each rule accepts, with defaults (zennit 0.5.1's defaults for the classic rules).
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
# ``R_a = R̃_a · ‖R_z‖₁ / ‖R̃_a‖₁`` without a pass over memory.
@dataclass(frozen=True)
class RlrpAffine:
    """``R̃_a = a ⊙ (Wᵀ R_z)`` (``norm="layer"``) or ``R̃_a = a ⊙ (Wᵀ (R_z / s))`` with
    ``s = |W| |a|`` (``norm="neuron"``: each neuron splits its relevance by its inputs'
    contributions relative to the sum of their absolute values; 0 where ``s = 0``),
    renormalised to ``‖R_z‖₁`` per sample.

    The unit-L1 factor of the incoming value is applied in the contraction's epilogue. A
    folded BatchNorm (``W' = s·W``) enters as ``W'ᵀ R = Wᵀ (s ⊙ R)``: no scaled weight copy
    is kept. ``abs_weight`` is ``|W|``, kept for ``norm="neuron"`` only (one copy of the
    weights: a per-call ``abs`` would read them once more on every call)."""

    weight: torch.Tensor
    channel_scale: torch.Tensor | None
    abs_weight: torch.Tensor | None = None
    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        weight, g, s = self.weight, r.value, self.channel_scale
        a = inputs[0]
        if self.abs_weight is not None:
            den = backend.affine_forward(step, self.abs_weight, None, a.abs().to(g.dtype))
            if s is not None:
                den = den * per_channel(s.abs(), den)
            g = safe_ratio(g, den)
        if s is not None:  # scale whichever is smaller, the weight or the relevance
            if weight.numel() < g.numel():
                weight = scale_rows(weight, s)
            else:
                g = g * per_channel(s, g)
        # ``a`` stays in the forward's dtype: backends upcast it on load (no fp32 copy)
        r_tilde, l1 = backend.affine_contract_l1(step, weight, g, a, r.unit_scale())
        return [Rel(r_tilde, r.mass, l1)]


@dataclass(frozen=True)
class RlrpFixedLinear:
    """The same rule for average pools, means and lone BatchNorms (``neuron``: ``s = P|a|``,
    for a lone BatchNorm ``|scale · a|``, so it passes ``sign(scale · a) ⊙ R``)."""

    neuron: bool = False
    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        a = inputs[0]
        g = r.value * per_sample(r.unit_scale(), r.value)
        if self.neuron:
            if isinstance(step, Pool):
                den = backend.pool_forward(step, a.abs().to(g.dtype))
            else:
                den = (a.to(g.dtype) * per_channel(step.scale.to(g.dtype), g)).abs_()
            g = safe_ratio(g, den)
        r_tilde = _fixed_linear_back(backend, step, g, a)
        return [Rel(r_tilde, r.mass, l1_per_sample(r_tilde))]


@dataclass(frozen=True)
class RlrpAddLinear:
    """``skip="linear"``: the add as a unit-weight linear map, one joint scalar per sample."""

    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        parts = [(u.to(r.value.dtype) * r.value).sum_to_size(u.shape) for u in inputs]
        return share_mass(parts, r.mass)


@dataclass(frozen=True)
class RlrpAddRatio:
    """``skip="ratio"``: the paper's rule ``R_u = (u / y) ⊙ R_y``, 0 where ``y == 0``; not
    renormalised, so the operands' masses are what the ratios give them."""

    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        ups = [u.to(r.value.dtype) for u in inputs]
        y = sum(ups)
        nonzero = y != 0
        share = torch.where(nonzero, r.value / torch.where(nonzero, y, torch.ones_like(y)),
                            torch.zeros_like(y))
        parts = [(u * share).sum_to_size(u.shape) for u in ups]
        norms = [l1_per_sample(p) for p in parts]
        # the parts are in the incoming value's units: the incoming mass per unit of value
        per_unit = safe_ratio(r.mass, r.value_l1())
        return [Rel(p, n * per_unit, n) for p, n in zip(parts, norms)]


@dataclass(frozen=True)
class RlrpGate:
    """A product with a gate, ``z = s ⊙ g``: the signal takes all, as a linear step in ``s``
    with the gate as its (per-sample) weights: ``R̃_s = s ⊙ g ⊙ R`` (``norm="neuron"``: each
    output's single contribution relative to its absolute value, ``sign(s ⊙ g) ⊙ R``),
    renormalised to ``‖R‖₁``; the gate gets nothing."""

    neuron: bool = False
    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        signal, gate = (t.to(r.value.dtype) for t in inputs)
        product = signal * gate
        if self.neuron:  # 0 where s ⊙ g = 0
            c = torch.sign(product).mul_(r.value)
        else:
            c = product.mul_(r.value)
        r_tilde = c.sum_to_size(signal.shape)
        return [Rel(r_tilde, r.mass, l1_per_sample(r_tilde))]


@dataclass(frozen=True)
class RlrpLayerNorm:
    """Layer normalisation with ``σ`` held constant: the linear map ``J = diag(γ/σ)(I − 11ᵀ/n)``
    per normalised group, ``R̃_x = x ⊙ (Jᵀ R)`` (``norm="neuron"``: ``Jᵀ (R / s)`` with
    ``s = |J||x| = |γ/σ| ⊙ ((1 − 2/n)|x| + Σ|x|/n)``), renormalised per sample. ``σ`` is the
    forward's own ``√(biased var + eps)``, never small."""

    neuron: bool = False
    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        g = r.value
        x = inputs[0].to(g.dtype)
        dims = tuple(range(-len(step.normalized_shape), 0))
        n = math.prod(step.normalized_shape)
        sigma = torch.sqrt(x.var(dims, correction=0, keepdim=True) + step.eps)
        scale = 1 / sigma if step.weight is None else step.weight.to(g.dtype) / sigma
        if self.neuron:
            size = x.abs()
            s = scale.abs() * ((1 - 2 / n) * size + size.sum(dims, keepdim=True) / n)
            g = safe_ratio(g, s)
        u = g * scale
        r_tilde = x * (u - u.mean(dims, keepdim=True))
        return [Rel(r_tilde, r.mass, l1_per_sample(r_tilde))]


@dataclass(frozen=True)
class PassToSignal:
    """The classic rules at a gate or constant scale (zennit/LXT): the gate is a constant and
    the signal the only contributor to each output, so the signal receives the relevance
    itself; at a layer norm, LXT's identity through the normalisation."""

    needs_output = False

    def __call__(self, backend, step, r, inputs, z):
        return [Rel(r.value.sum_to_size(inputs[0].shape), r.mass)]


# -- zennit's rules ------------------------------------------------------------------------
@dataclass(frozen=True)
class Norm:
    """zennit's ``Norm``: ``R_a = a ⊙ Pᵀ(R / stab(z))`` for fixed linear maps and sums."""

    stabilizer: float
    needs_output = True

    def __call__(self, backend, step, r, inputs, z):
        g = r.value / stabilize(z.to(r.value.dtype), self.stabilizer)
        if isinstance(step, Add):
            return [Rel((u.to(g.dtype) * g).sum_to_size(u.shape)) for u in inputs]
        return [Rel(_fixed_linear_back(backend, step, g, inputs[0]))]


@dataclass(frozen=True)
class Epsilon:
    """LRP-ε (LRP-0 for ``epsilon = 0``): ``R_a = a ⊙ Wᵀ(R / stab(z))``."""

    weight: torch.Tensor
    epsilon: float
    needs_output = True

    def __call__(self, backend, step, r, inputs, z):
        a = inputs[0]
        return [Rel(backend.affine_contract(step, self.weight, r.value, a.shape, a, z=z,
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
            term = backend.affine_contract(step, w_for_pos, g, a.shape, a_pos, z=zk,
                                           eps=self.stabilizer)
            if has_neg:
                term = term + backend.affine_contract(step, w_for_neg, g, a.shape, a_neg,
                                                      z=zk, eps=self.stabilizer)
            term = term.mul_(coef) if coef != 1 else term
            out = term if out is None else out.add_(term)
        return [Rel(out)]


@dataclass(frozen=True)
class ZBox:
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
        return [Rel(backend.affine_contract(step, self.weight, g, a.shape, a)
                    - backend.affine_contract(step, w_pos, g, a.shape, low)
                    - backend.affine_contract(step, w_neg, g, a.shape, high))]


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
        return [Rel(backend.affine_contract(step, self.weight, t, shape, z=z_ones,
                                            eps=self.stabilizer))]


# -- building a rule -----------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A validated rule name with its options."""

    name: str
    options: dict

    @property
    def keeps_mass(self) -> bool:
        """R-LRP: relevance carries its L1 mass, and forks keep the mass that arrives."""
        return self.name == "rlrp"

    def propagators(self, plan: Plan, dtype: torch.dtype) -> list[Propagator | None]:
        """One propagator per step of ``plan`` (None for routing steps), weights in ``dtype``."""
        first = _first_affine(plan, conv_only=self.name == "EpsilonGammaBox")
        return [self._for_step(step, step is first, dtype) for step in plan.steps]

    def _for_step(self, step: Step, is_first: bool, dtype: torch.dtype) -> Propagator | None:
        if not isinstance(step, (Affine, Pool, Scale, Add, Gate, LayerNorm)):
            return None
        o = self.options
        if isinstance(step, Gate):
            return RlrpGate(o["norm"] == "neuron") if self.name == "rlrp" else PassToSignal()
        if isinstance(step, LayerNorm):  # classic rules: identity through normalisation (LXT)
            return RlrpLayerNorm(o["norm"] == "neuron") if self.name == "rlrp" else PassToSignal()
        if self.name == "rlrp":
            neuron = o["norm"] == "neuron"
            if isinstance(step, Affine):
                scale = None if step.channel_scale is None else step.channel_scale.to(dtype)
                weight = step.weight.to(dtype)
                return RlrpAffine(weight, scale, weight.abs() if neuron else None)
            if isinstance(step, Add):  # adds never take the neuron form (RLRP_SPEC.md)
                return RlrpAddLinear() if o["skip"] == "linear" else RlrpAddRatio()
            return RlrpFixedLinear(neuron)
        if not isinstance(step, Affine):
            return Norm(o.get("stabilizer", 1e-6))
        return self._classic_affine(step, is_first, dtype)

    def _classic_affine(self, step: Affine, is_first: bool, dtype: torch.dtype) -> Propagator:
        o = self.options
        name = self.name
        if name in COMPOSITES:
            if name == "EpsilonGammaBox" and is_first:
                name = "zbox"
            elif name == "EpsilonPlusFlat" and is_first:
                name = "flat"
            elif not step.is_conv:
                name = "epsilon"
            else:
                name = "gamma" if name == "EpsilonGammaBox" else "zplus"
        return _classic(name, step, o, dtype)


def _classic(name: str, step: Affine, o: dict, dtype: torch.dtype) -> Propagator:
    w = step.effective_weight(dtype)
    b = None if step.bias is None else step.bias.to(dtype)
    stab = o.get("stabilizer", 1e-6)
    if name == "lrp0":
        return Epsilon(w, 0.0)
    if name == "epsilon":
        return Epsilon(w, float(o["epsilon"]))
    if name == "zplus":
        return TwoSignTerms(((w.clamp(min=0), _pos(b), w.clamp(max=0), 1.0, 0),), stab)
    if name == "alphabeta":
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        return TwoSignTerms(((wp, _pos(b), wn, float(o["alpha"]), 0),
                             (wn, _neg(b), wp, -float(o["beta"]), 0)), stab)
    if name == "gamma":
        gamma = float(o["gamma"])
        w_up, w_down = w + gamma * w.clamp(min=0), w + gamma * w.clamp(max=0)
        b_up = None if b is None else b + gamma * b.clamp(min=0)
        b_down = None if b is None else b + gamma * b.clamp(max=0)
        return TwoSignTerms(((w_up, b_up, w_down, 1.0, 1), (w_down, b_down, w_up, 1.0, -1)),
                            stab, needs_output=True)
    if name == "zbox":
        return ZBox(w, b, _bound(o["low"], dtype, w.device), _bound(o["high"], dtype, w.device),
                    stab)
    if name == "flat":
        return InputFree(torch.ones_like(w), None, stab)
    if name == "wsquare":
        return InputFree(w * w, None if b is None else b * b, stab)
    raise AssertionError(name)  # unreachable: names are validated in make_rule


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


def _first_affine(plan: Plan, conv_only: bool) -> Affine | None:
    for step in plan.steps:
        if isinstance(step, Affine) and (step.is_conv or not conv_only):
            return step
    return None


def make_rule(name: str, **options) -> Rule:
    """Validate ``name`` and its options; fill in defaults."""
    if name not in _OPTIONS:
        raise ValueError(f"unknown rule {name!r}; choose one of {RULES + ('gradient_x_input',)}")
    allowed = _OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"rule {name!r} takes no option(s) {unknown}; its options are "
                        f"{sorted(allowed) or 'none'}")
    merged = {**allowed, **options}
    if name == "rlrp" and merged["skip"] not in ("linear", "ratio"):
        raise ValueError(f"skip must be 'linear' or 'ratio', got {merged['skip']!r}")
    if name == "rlrp" and merged["norm"] not in ("layer", "neuron"):
        raise ValueError(f"norm must be 'layer' or 'neuron', got {merged['norm']!r}")
    if "low" in allowed and (merged["low"] is None or merged["high"] is None):
        raise ValueError(f"rule {name!r} needs the input's bounds: pass low=... and high=... "
                         "(the lowest and highest possible input values, scalars or "
                         "per-channel tensors)")
    for key in ("epsilon", "stabilizer", "gamma", "alpha", "beta"):
        if key in merged:
            _check_number(key, merged[key])
    if name == "alphabeta" and abs(merged["alpha"] - merged["beta"] - 1) > 1e-12:
        raise ValueError("alphabeta needs alpha - beta == 1 (as zennit)")
    if "low" in allowed:
        low, high = _check_bound("low", merged["low"]), _check_bound("high", merged["high"])
        # the shapes line up without knowing the input when they have the same rank or one
        # is a scalar; other pairs are checked where they meet the first layer's input
        if low.dim() == high.dim() or low.dim() == 0 or high.dim() == 0:
            try:
                low, high = torch.broadcast_tensors(low, high)
            except RuntimeError:
                raise ValueError(f"low of shape {tuple(low.shape)} and high of shape "
                                 f"{tuple(high.shape)} do not broadcast together") from None
            if (low > high).any():
                raise ValueError("low must not exceed high: " + _first_inversion(low, high))
    return Rule(name, merged)

