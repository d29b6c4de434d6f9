"""The backend interface: the contractions a relevance pass needs, nothing else.

Rules (``rules.py``) express every linear op's relevance through these primitives, so a
backend that implements them faster (fused kernels) plugs in without touching the plan or
the rules. Relevance tensors (``g``) are float32 (float64 for float64 inputs); activations
(``a``) may be in a lower precision and are upcast on use. Per-sample scales are ``(N,)``
tensors of the relevance dtype.

Each primitive has one name everywhere: the backend method, the C++ op
``torch.ops.rlrp_fast.<name>`` (typed wrapper in ``rlrp_fast.ops``), the Triton entry point
``rlrp_fast.kernels.affine_relevance.<name>``, its test ``tests/test_<name>.py`` and its
benchmark ``bench/<name>.py``. Attention's pair (``attention_mix``, ``attention_relevance``)
shares one kernel module, test and benchmark, named after ``attention_relevance``; it has no
C++ op (the cpp backend inherits the torch backend's).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from ..plan import Affine, Pool


class Backend(ABC):
    """One implementation of the relevance contractions. Stateless and thread-safe."""

    name: str = "abstract"

    @abstractmethod
    def affine_forward(self, step: Affine, weight: torch.Tensor, bias: torch.Tensor | None,
                       x: torch.Tensor) -> torch.Tensor:
        """``W x + b`` with the step's geometry (rules need it for modified weights)."""

    @abstractmethod
    def affine_relevance(self, step: Affine, weight: torch.Tensor, g: torch.Tensor,
                         input_shape: torch.Size, a: torch.Tensor | None = None,
                         z: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
        """``a ⊙ Wᵀ(g / stab(z))``: the classic rules' contraction.

        ``a`` None means no input factor (flat, w²); ``z`` None means no division. ``stab``
        is zennit's ``z + eps·(sign(z) + (z == 0))``. Shape ``input_shape``."""

    @abstractmethod
    def affine_relevance_l1(self, step: Affine, weight: torch.Tensor, g: torch.Tensor,
                            a: torch.Tensor, g_scale: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The R-LRP hot path: ``(R̃, ‖R̃‖₁ per sample)`` with
        ``R̃ = g_scale ⊙ a ⊙ (Wᵀ g)`` (``g_scale`` per sample, 1 when None)."""

    @abstractmethod
    def affine_abs(self, step: Affine, a: torch.Tensor, weight: torch.Tensor,
                   scale: torch.Tensor | None, abs_weight: Callable[[], torch.Tensor]
                   ) -> torch.Tensor:
        """``s = |σ ⊙ W| |a|`` (``norm="neuron"``'s denominators) in float32 (float64 for a
        float64 ``weight``), a fresh tensor the caller may overwrite. ``σ`` (``scale``) is
        a folded BatchNorm's per-channel factor or None; ``abs_weight()`` returns the cached
        ``|σ ⊙ W|`` for backends that need it as a tensor (ATen has no ``abs`` on load), so
        a backend that takes ``abs`` on load never makes that copy."""

    @abstractmethod
    def attention_mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      bias: torch.Tensor | None, scale: float | None, abs_v: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(P v, P |v| or None, state)`` with ``P = softmax(q kᵀ · scale + bias)`` over the
        keys (``q`` ``[N, …, L, d]``, ``k`` ``[N, …, S, d]``, ``v`` ``[N, …, S, e]``, any
        strides; ``bias`` an additive float mask broadcastable to ``[N, …, L, S]``, may hold
        -inf; ``scale`` None is ``1/√d``). ``state`` is what :meth:`attention_relevance`
        needs for the same ``P`` (``P`` itself, or the rows' log-sum-exp for a backend that
        never materialises it): hand it back unchanged."""

    @abstractmethod
    def attention_relevance(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            g: torch.Tensor, bias: torch.Tensor | None, scale: float | None,
                            state: torch.Tensor, compute_l1: bool
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(R̃_V, ‖R̃_V‖₁ per sample or None)`` with ``R̃_V = v ⊙ (Pᵀ g)``: the value
        mixing's relevance (``Pᵀ g`` is attention's ``dV``), ``P`` that of the
        :meth:`attention_mix` call that returned ``state`` (same ``q, k, v, bias, scale``);
        ``g`` has ``P v``'s shape."""

    @abstractmethod
    def pool_forward(self, step: Pool, x: torch.Tensor) -> torch.Tensor:
        """``P x`` for a parameter-free linear map ``P`` (average pooling, mean)."""

    @abstractmethod
    def pool_adjoint(self, step: Pool, g: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        """``Pᵀ g`` for a parameter-free linear map ``P`` (average pooling, mean)."""
