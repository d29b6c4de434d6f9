"""An explained model you can ship: :class:`ExplainedModel`, an ``nn.Module`` whose forward
returns ``(logits, relevance)`` with no Python branch on tensor values, so ``torch.export``,
AOTInductor and ``torch.compile(fullgraph=True)`` take it whole."""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from .backends import Backend, TorchBackend
from .explainer import (GRADIENT_X_INPUT, Explainer, _check_target_logits, _explain_batch,
                        _Request)
from .rules import Composite, Rule

class ExplainedModel(nn.Module):
    """``model`` and its explanation as one module: ``forward(x)`` returns ``(logits,
    relevance)``.

    Args:
        model: as for :class:`rlrp_fast.Explainer` (eval mode, ``torch.fx`` traceable).
        rule: as for :class:`rlrp_fast.Explainer`, except ``"gradient_x_input"`` (autograd,
            not a plan; export ``torch.func.grad`` of the model for it).
        top_k: explain each sample's ``top_k`` highest logits (``torch.topk`` in the graph).
            ``relevance`` is ``(N, *x.shape[1:])`` for ``top_k=1`` (the arg-max, as
            ``Explainer.explain(x)``), ``(N, top_k, *x.shape[1:])`` otherwise.
        backend: ``"torch"`` (default), ``"cpp"``, ``"triton"`` or ``"auto"``: the backend of
            eager calls. ``torch.export`` always uses ``"torch"`` (a program that called
            ``torch.ops.rlrp_fast`` could not load without this package; a warning says so
            when another was asked for); ``torch.compile`` uses ``"cpp"`` (its ops have fake
            kernels) or ``"torch"`` (for ``"triton"``, whose kernels are launched from Python).
        example_input: a batch to check the plan on now (see "Trust" below); optional.
        verify: trace verification as in :class:`rlrp_fast.Explainer`.
        **options: the rule preset's options (``skip=``, ``norm=``, ``epsilon=``, ...).

    Relevance is float32 (float64 for float64 input), equal to
    ``Explainer(model, rule, **options).explain(x, top_k=top_k).relevance`` to rounding. The
    forward is branch-free: R-LRP always takes the overflow-safe path (every step's inputs
    and relevance scaled to a maximum of 1 per sample; exact, since R-LRP is invariant to
    positive per-sample scales), where ``Explainer`` takes it only after a range check fails.

    Trust: eager calls check what ``Explainer.explain`` checks — the model has not changed
    since capture (:class:`rlrp_fast.StaleModelError`), the input's dtype, device, shape and
    finiteness, finite target logits, and, once per input shape, the plan's logits against
    the model's own (:class:`rlrp_fast.TraceMismatchError`). ``example_input`` runs that
    once at construction; otherwise the first eager call does. A traced program
    (export, compile) checks none of these: verify before exporting (pass
    ``example_input`` or call the module once; exporting an unverified module warns, but
    ``torch.compile`` cannot: dynamo traces no warning). In a traced program NaN or Inf input
    or logits give NaN or Inf relevance, not an error.

    The module has no parameters of its own: the plan reads the model's weights in place
    (an exported program holds them as constants). Build it on the model's device and
    dtype, after the model is final; ``.to()`` on it moves nothing. Pickles and deep-copies
    (the explainer inside rebuilds its plan and lock), for ``spawn`` DataLoader workers and
    multiprocessing pools.
    """

    def __init__(self, model: nn.Module, rule: str | Rule | Composite = "rlrp",
                 top_k: int = 1, *, backend: str = "torch",
                 example_input: torch.Tensor | None = None, verify: bool = True,
                 **options) -> None:
        super().__init__()
        if rule == GRADIENT_X_INPUT:
            raise ValueError(f"ExplainedModel explains with a plan; rule {rule!r} is autograd "
                             "(use rlrp_fast.Explainer, or export torch.func.grad of the model)")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        self.top_k = top_k
        # a plain attribute, not a submodule: the weights reach the graph through the plan
        # only, so an exported program holds them once
        self._explainer = Explainer(model, rule=rule, backend=backend, verify=verify,
                                    **options)
        self.train(False)
        if example_input is not None:
            self(example_input)

    def train(self, mode: bool = True) -> "ExplainedModel":
        """Eval mode only: an explanation has no training mode (the model's own mode is
        never changed; it must be in eval mode when wrapped)."""
        if mode:
            raise ValueError("ExplainedModel has no training mode; train the model itself and "
                             "wrap it again (in eval mode)")
        return super().train(False)

    @property
    def model(self) -> nn.Module:
        """The explained model (read in place, never modified)."""
        return self._explainer.model

    @property
    def backend(self) -> str:
        """The backend of eager calls."""
        return self._explainer.backend

    def extra_repr(self) -> str:
        return (f"model={type(self.model).__name__}, rule={self._explainer.rule_name!r}, "
                f"top_k={self.top_k}, backend={self.backend!r}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (N, classes) in x's dtype, relevance)``; see the class docstring."""
        explainer = self._explainer
        tracing = torch.compiler.is_compiling()
        if not tracing:
            explainer._guard.check()
            explainer._check_input(x)
        elif explainer._verify and not explainer._verified:
            _warn("rlrp_fast: ExplainedModel is traced before its plan was checked against "
                  "the model; call it once on a real batch (or pass example_input) first")
        keeps_mass = explainer._rule.keeps_mass
        request = _Request(None, None, self.top_k)
        # export: no grad-mode region (recorded as a wrap_with_set_grad_enabled node, which
        # torch 2.14 fails to load when empty); the plan's tensors are constants there anyway
        with contextlib.nullcontext() if torch.compiler.is_exporting() else torch.no_grad():
            propagators, weights = explainer._prepare(x.dtype, keep=not tracing)
            logits, targets, _, result = _explain_batch(
                explainer._plan, x, weights, propagators, self._backend_for(tracing), request,
                keeps_mass, safe=keeps_mass)
        relevance = result.relevance
        if not tracing:
            _check_target_logits(logits, targets, request)
            if keeps_mass and not bool(torch.isfinite(relevance).all()):  # as Explainer
                raise FloatingPointError(
                    "R-LRP relevance overflowed although the logits are finite (weights near "
                    "the float range's limits?); try float64 input")
            if explainer._verify:
                explainer._verify_once(x, logits, weights, propagators)
        if self.top_k > 1:
            relevance = relevance.view(x.shape[0], self.top_k, *relevance.shape[1:])
        return logits, relevance

    def _backend_for(self, tracing: bool) -> Backend:
        asked = self._explainer._backend
        if not tracing or asked.name == "torch":
            return asked
        if torch.compiler.is_exporting():
            _warn(f"rlrp_fast: ExplainedModel exports with the 'torch' backend, not "
                  f"{asked.name!r}: a program calling rlrp_fast's own ops could not be loaded "
                  "without rlrp_fast")
            return TorchBackend()
        return asked if asked.name == "cpp" else TorchBackend()


def _warn(message: str) -> None:
    """A warning while tracing, except under dynamo (it cannot trace ``warnings.warn``)."""
    if not torch.compiler.is_dynamo_compiling():
        warnings.warn(message, RuntimeWarning, stacklevel=4)
