"""Small numeric helpers shared by rules, engine and backends (one home for each)."""
from __future__ import annotations

from typing import NamedTuple

import torch


def l1_per_sample(r: torch.Tensor) -> torch.Tensor:
    """``‖r‖₁`` over all non-batch dims, shape ``(N,)``."""
    # not linalg.vector_norm(ord=1): on CPU its float32 sum drifts by up to ~1e-3 relative on
    # 224×224 layers; sum() reduces pairwise (~1e-7)
    return r.abs().reshape(r.shape[0], -1).sum(1)


def per_sample(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An ``(N,)`` scale viewed to broadcast against ``like`` ``(N, ...)``."""
    return scale.view(-1, *([1] * (like.dim() - 1)))


def relevance_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype relevance accumulates in for a forward in ``dtype``: float64 for float64,
    float32 otherwise (float16/bfloat16 relevance would lose conservation to rounding)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_channel(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` scale viewed to broadcast against ``like`` ``(N, C, ...)``."""
    return scale.view(-1, *([1] * (like.dim() - 2)))


def scale_the_weight(weight_numel: int, other_numel: int) -> bool:
    """Whether a per-channel scale (a folded BatchNorm) goes on the weight rather than on the
    activation or relevance it meets: whichever is smaller. A traced graph (export, compile)
    always scales the weight: a choice by batch size would fix the graph's batch size."""
    return torch.compiler.is_compiling() or weight_numel < other_numel


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """zennit's stabiliser: ``z + ε·(sign(z) + (z == 0))`` (``ε = 0`` leaves ``z`` alone)."""
    if eps == 0:
        return z
    # sign(z) + (z == 0) is +1 for z >= 0 (including -0.0) and -1 below: three passes, not five
    return torch.where(z >= 0, z.new_tensor(eps), z.new_tensor(-eps)).add_(z)


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` per sample, 0 where ``den`` is 0 (a layer whose relevance is all 0)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny),
                       torch.zeros_like(den))


def divide_into(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den`` is 0, written over ``den`` (a fresh tensor the caller
    owns, ``den >= 0``): three passes and no allocation of ``den``'s size, where
    :func:`safe_ratio` takes five and three — this runs once per layer under
    ``norm="neuron"``."""
    zero = den == 0
    return torch.div(num, den, out=den).masked_fill_(zero, 0)


class Rel(NamedTuple):
    """Relevance on its way to the input.

    With ``mass`` None (the classic rules) the relevance is ``value`` itself. With ``mass``
    (R-LRP), it is ``value · mass / ‖value‖₁`` per sample: ``mass`` is its L1 norm, exactly,
    and ``value`` only its direction. R-LRP is invariant to any positive per-sample factor on
    a step's input or relevance, so the value may sit at whatever magnitude computes best;
    carrying the mass apart keeps every value near the magnitude of the activations (never
    that of the logits times the activations, which overflows float32) and applies each
    renormalisation for free. ``l1`` caches ``‖value‖₁`` per sample when known."""

    value: torch.Tensor
    mass: torch.Tensor | None = None
    l1: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        if self.mass is None:
            return self.value
        # two per-sample factors: mass / ‖value‖₁ alone may overflow where each is finite
        l1 = self.value_l1().clamp_min(torch.finfo(self.value.dtype).tiny)
        return self.value / per_sample(l1, self.value) * per_sample(self.mass, self.value)

    def value_l1(self) -> torch.Tensor:
        return self.l1 if self.l1 is not None else l1_per_sample(self.value)

    def total_l1(self) -> torch.Tensor:
        """``‖relevance‖₁`` per sample."""
        return self.mass if self.mass is not None else self.value_l1()

    def unit_scale(self) -> torch.Tensor | None:
        """``1 / ‖value‖₁`` per sample (0 for an all-zero value), or None without a mass:
        the factor that makes the value a direction of unit L1 before a contraction."""
        if self.mass is None:
            return None
        return safe_ratio(torch.ones_like(self.mass), self.value_l1())

    def __add__(self, other: "Rel") -> "Rel":
        """A fork: relevance arriving from two consumers is summed; with masses (R-LRP), the
        sum is rescaled to the sum of the arriving L1 masses (the spec's fork rule).

        Works in place on ``self.value``: a relevance value belongs to exactly one slot."""
        if self.mass is None:
            return Rel(self.value.add_(other.value))
        mass = self.mass + other.mass
        # each direction weighted by its share of the mass: the sum has L1 ≤ 1
        w_self = safe_ratio(safe_ratio(self.mass, mass), self.value_l1())
        w_other = safe_ratio(safe_ratio(other.mass, mass), other.value_l1())
        summed = self.value.mul_(per_sample(w_self, self.value))
        return Rel(summed.addcmul_(other.value, per_sample(w_other, other.value)), mass)


def share_mass(parts: list[torch.Tensor], mass: torch.Tensor | None) -> list[Rel]:
    """Relevance values that split one relevance: with a ``mass``, each part gets the share
    of it that its L1 norm is of the parts' total (one joint scalar per sample)."""
    if mass is None:
        return [Rel(p) for p in parts]
    norms = [l1_per_sample(p) for p in parts]
    total = sum(norms)
    return [Rel(p, mass * safe_ratio(n, total), n) for p, n in zip(parts, norms)]
