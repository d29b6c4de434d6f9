"""The public API: :class:`Explainer`, :func:`explain`, :class:`Explanation`."""
from __future__ import annotations

import numbers
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from .backends import get_backend
from .capture import capture
from .engine import RelevancePass, run_forward, run_relevance
from .guard import ModelGuard, check_eval
from .numerics import l1_per_sample, relevance_dtype
from .plan import Affine, Plan, Step
from .rules import Composite, Propagator, Rule, make_rule, resolve
from .verify import verify_logits

GRADIENT_X_INPUT = "gradient_x_input"
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Explanation:
    """One batch's prediction and its explanation.

    Attributes:
        relevance: relevance per input element, shape of ``x``; float32 (float64 for
            float64 inputs). For R-LRP every step passes on the L1 mass it receives (forks
            keep the sum of the masses arriving from their consumers), so each sample's
            ``‖relevance‖₁`` equals ``‖output_relevance‖₁`` (``|logit|`` of the target by
            default) on every architecture with ``skip="linear"``; the signed sum is not
            conserved. ``skip="ratio"`` does not renormalise, so its L1 may differ.
        logits: the model's output ``(N, classes)``, in ``x``'s dtype.
        targets: ``(N,)`` long, the class explained per sample (with a custom
            ``output_relevance``: the arg-max of ``|output_relevance|``).

    With K maps per sample (``Explainer.explain(..., top_k=K)``, ``(N, K)`` targets or
    ``(N, K, classes)`` output relevance), ``relevance`` is ``(N, K, ...)`` and ``targets``
    and ``vanished`` are ``(N, K)``.
        vanished: ``(N,)`` bool (R-LRP; None for the other rules): samples whose relevance
            became exactly 0 on the way (a layer whose inputs were all dead, or whose
            contributions cancelled exactly) although their output relevance was not; their
            map is all 0.
    """

    relevance: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    vanished: torch.Tensor | None = None


class _ExplainerArgs(NamedTuple):
    """The constructor's arguments, kept for pickling (:meth:`Explainer.__getstate__`)."""

    rule: str
    backend: str
    compile: bool
    verify: bool
    options: dict


class Explainer:
    """Explains a classifier with a relevance rule. Build once, call for many batches.

    Args:
        model: an ``nn.Module`` in eval mode that ``torch.fx`` can trace, built from the
            supported ops (``rlrp_fast.SUPPORTED_OPS``). It is never modified.
        rule: a preset name: ``"rlrp"`` (default: ``rules.RLRP()`` on the whole network),
            a classic rule (``"lrp0"``, ``"epsilon"``, ``"zplus"``, ``"gamma"``,
            ``"alphabeta"``, ``"zbox"``, ``"flat"``, ``"wsquare"``: that rule on every
            Linear/Conv, ``Norm`` on pools and sums), a composite (``"EpsilonPlus"``,
            ``"EpsilonGammaBox"``, ``"EpsilonPlusFlat"``), or ``"gradient_x_input"``; or a
            rule object (``rlrp_fast.rules.Epsilon(0.25)``, on the whole network likewise);
            or a :class:`rlrp_fast.Composite` (which layer gets which rule). Presets are
            defined in ``rules.make_rule``.
        backend: ``"auto"`` (fastest available), ``"torch"``, ``"triton"`` or ``"cpp"``.
        compile: run the plan's forward and relevance pass through ``torch.compile``
            (torch and cpp backends). Each new batch shape or dtype compiles first (seconds
            to a minute) and needs more memory (50-450 MB). Measured on CPU
            (bench/RESULTS.md) it wins at larger batches (batch 32: digits CNN 0.79x
            gradient × input instead of 0.87x, ResNet50 0.83x instead of 0.94x), ties at
            batch 8 and ties or loses at batch 1, where its guards cost more than it saves.
            Off by default. torch caps the variants one process compiles
            (``torch._dynamo.config``); past the cap it runs eagerly.
        verify: on the first call for each new (input shape, dtype, device), also run the
            model itself and compare its logits with the plan's; a mismatch raises
            :class:`rlrp_fast.TraceMismatchError` naming the first step that differs,
            instead of returning a map of a function the model does not compute. Costs one
            forward of the model per new shape (bench/RESULTS.md); ``False`` skips it.
        **options: a preset's options, e.g. ``skip="ratio"`` or ``norm="neuron"`` for
            ``rlrp``, ``epsilon=0.25``, ``gamma=0.25``, ``low=..., high=...`` for
            ``zbox``/``EpsilonGammaBox`` (a rule object or composite carries its own).

    The model's weights are read in place, not copied (BatchNorm is applied as a per-channel
    scale; only the classic rules keep folded or modified copies, z⁺, w², ...): changing the
    model afterwards (its weights, buffers, dtype or submodules) raises
    :class:`rlrp_fast.StaleModelError` on the next call (build a new explainer). Safe to
    call from several threads. Pickles and deep-copies (the model and the constructor's
    arguments are kept; the trace, caches and lock are rebuilt on loading), so it can be sent
    to ``spawn`` DataLoader workers and multiprocessing pools.
    """

    def __init__(self, model: nn.Module, rule: str | Rule | Composite = "rlrp",
                 backend: str = "auto",
                 compile: bool = False, verify: bool = True,  # noqa: A002 (torch's name)
                 **options) -> None:
        # what pickling keeps (with the model); everything else is rebuilt from it
        self._args = _ExplainerArgs(rule, backend, compile, verify, dict(options))
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_eval(model)
        self.model = model
        self.rule_name = rule if isinstance(rule, str) else repr(rule)
        tensors = [*model.parameters(), *model.buffers()]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self._param_dtype = next((t.dtype for t in tensors if t.is_floating_point()),
                                 torch.float32)
        self._tensors = tensors
        self._guard = ModelGuard(model)
        self._verify = verify
        self._verified: set[tuple] = set()  # (shape, dtype, device) the plan was checked on
        self._backend = get_backend(backend, self.device)
        self._lock = threading.Lock()
        self._propagators: dict[torch.dtype, list[Propagator | None]] = {}
        self._weights: dict[torch.dtype, dict[int, tuple]] = {}
        self._compiled = None
        if rule == GRADIENT_X_INPUT:
            if options or compile:
                given = sorted(options) + (["compile"] if compile else [])
                raise TypeError(f"rule {rule!r} takes no options, got {given}")
            self._plan: Plan | None = None
            self._rule = None
            self._input_layers: list[Affine] = []
            return
        if isinstance(rule, str):
            rule = make_rule(rule, **options)
        elif not isinstance(rule, (Rule, Composite)):
            raise TypeError(f"rule must be a preset name, a rule object (rlrp_fast.rules) or "
                            f"a rlrp_fast.Composite, got {type(rule).__name__}")
        elif options:
            raise TypeError(f"options {sorted(options)} go with a preset name; a rule object "
                            "or composite carries its own parameters")
        # what the plan derives from the weights (folded BatchNorm, modified weights) is a
        # constant: without autograd it holds no graph, and an export sees plain constants
        with torch.no_grad():
            self._plan = capture(model)
            self._rule = resolve(rule, self._plan, model)  # one rule per plan step
        # the Linear/Conv steps that read the input, checked against x on every call
        self._input_layers = [s for s in self._plan.steps if isinstance(s, Affine)
                              and self._plan.input_slot in s.inputs]
        self._prepare(torch.float32)
        if compile:
            if self._backend.name == "triton":
                raise ValueError("compile=True is not supported with the triton backend (its "
                                 "kernels are already fused); use backend='torch' or 'cpp'")
            self._compiled = torch.compile(_explain_batch)

    # -- pickling and copying: keep the model and the arguments, rebuild the rest -------------
    def __getstate__(self) -> dict:
        return {"model": self.model, "args": self._args}

    def __setstate__(self, state: dict) -> None:
        a = state["args"]
        self.__init__(state["model"], rule=a.rule, backend=a.backend, compile=a.compile,
                      verify=a.verify, **a.options)

    @property
    def backend(self) -> str:
        """Name of the backend in use."""
        return self._backend.name

    # -- per-dtype caches (built once per dtype, under a lock) ---------------------------------
    def _prepare(self, dtype: torch.dtype, keep: bool = True
                 ) -> tuple[list[Propagator | None], dict[int, tuple]]:
        """The propagators and forward weights for inputs of ``dtype``. ``keep=False`` (a
        trace: export, compile) builds what is not kept yet without keeping it (its tensors
        are the tracer's) and takes no lock (dynamo cannot trace one)."""
        rel_dtype = relevance_dtype(dtype)
        if not keep:
            propagators, weights = self._propagators.get(rel_dtype), self._weights.get(dtype)
            if propagators is None:
                propagators = self._rule.propagators(self._plan, rel_dtype)
            if weights is None:
                weights = self._forward_weights(dtype, rel_dtype)
            return propagators, weights
        with self._lock, torch.no_grad():
            if rel_dtype not in self._propagators:
                self._propagators[rel_dtype] = self._rule.propagators(self._plan, rel_dtype)
            if dtype not in self._weights:
                self._weights[dtype] = self._forward_weights(dtype, rel_dtype)
            return self._propagators[rel_dtype], self._weights[dtype]

    def _forward_weights(self, dtype: torch.dtype, rel_dtype: torch.dtype) -> dict[int, tuple]:
        return {i: _forward_weights(s, dtype, rel_dtype) for i, s in enumerate(self._plan.steps)
                if isinstance(s, Affine)}

    # -- validation ----------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"x has dtype {x.dtype}; expected one of "
                            f"{[str(d) for d in _INPUT_DTYPES]}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the model is on {self.device}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
        for step in self._input_layers:
            self._check_first_layer(step, x)
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or Inf")

    @staticmethod
    def _check_first_layer(step: Affine, x: torch.Tensor) -> None:
        w = step.weight
        if step.is_conv:
            expected = w.shape[1] * step.groups
            if x.dim() != step.conv_dims + 2 or x.shape[1] != expected:
                raise ValueError(
                    f"x has shape {tuple(x.shape)} but the first layer {step.target!r} "
                    f"(Conv{step.conv_dims}d) expects (N, {expected}, "
                    f"{', '.join(['...'] * step.conv_dims)})")
        elif x.shape[-1] != w.shape[1]:
            raise ValueError(f"x has shape {tuple(x.shape)} but the first layer "
                             f"{step.target!r} (Linear) expects (N, ..., {w.shape[1]})")

    @staticmethod
    def _check_target(target, n: int) -> torch.Tensor | int | None:
        if isinstance(target, numbers.Integral) and not isinstance(target, bool):
            return int(target)  # any size (numpy ints too): the range is checked on the logits
        if target is None:
            return None
        if isinstance(target, (list, tuple)):
            huge = [v for v in target if isinstance(v, int) and not -2**63 <= v < 2**63]
            if huge:  # torch.tensor would raise "Overflow when unpacking long long"
                raise ValueError(f"target {huge[0]} is out of range")
            try:
                target = torch.tensor(target)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"target must be None, an int or a tensor of class indices, "
                                f"got a {type(target).__name__} torch cannot convert ({exc})"
                                ) from None
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be None, an int or a tensor of class indices, "
                            f"got {type(target).__name__}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
        if target.device.type == "meta":
            raise ValueError("target is a meta tensor (it has no values); pass class indices")
        if target.dim() == 0:
            return int(target)
        if target.dim() > 2 or target.shape[0] != n or target.numel() == 0:
            raise ValueError(f"target must have shape ({n},) (one class per sample) or "
                             f"({n}, K) (K classes per sample), got {tuple(target.shape)}")
        return target

    @staticmethod
    def _check_output_relevance(output_relevance, n: int) -> None:
        """A dense, finite, floating ``(n, classes)`` tensor with values (any device: it is
        copied to the model's; its columns are checked against the logits after the forward)."""
        if not isinstance(output_relevance, torch.Tensor):
            raise TypeError("output_relevance must be a tensor of the logits' shape, got "
                            f"{type(output_relevance).__name__}")
        if output_relevance.device.type == "meta":
            raise ValueError("output_relevance is a meta tensor (it has no values)")
        if output_relevance.layout != torch.strided:
            raise TypeError(f"output_relevance must be a dense tensor, got layout "
                            f"{output_relevance.layout}; call .to_dense() first")
        if not output_relevance.is_floating_point():
            raise TypeError(f"output_relevance must be a floating-point tensor, got dtype "
                            f"{output_relevance.dtype}")
        if output_relevance.dim() not in (2, 3) or output_relevance.shape[0] != n \
                or output_relevance.numel() == 0:
            raise ValueError(f"output_relevance has shape {tuple(output_relevance.shape)}; "
                             f"expected ({n}, classes), the logits' shape, or ({n}, K, "
                             "classes) for K maps per sample")
        if not torch.isfinite(output_relevance).all():
            raise ValueError("output_relevance contains NaN or Inf")

    # -- the call ------------------------------------------------------------------------------
    def explain(self, x: torch.Tensor, target: int | torch.Tensor | None = None,
                output_relevance: torch.Tensor | None = None,
                top_k: int | None = None,
                on_step: Callable[[Step, torch.Tensor, list[torch.Tensor]], None] | None = None
                ) -> Explanation:
        """Predict and explain the batch ``x``.

        Args:
            x: input batch ``(N, ...)`` on the model's device, float16/bfloat16/float32/
                float64 (the forward runs in this dtype; relevance accumulates in float32,
                float64 for float64 inputs).
            target: class to explain: None (arg-max per sample), an int, an ``(N,)``
                integer tensor, or ``(N, K)`` for K classes per sample.
            output_relevance: instead of ``target``, the relevance at the logits
                ``(N, classes)`` (e.g. a one-hot), or ``(N, K, classes)`` for K maps.
            top_k: instead of ``target``, explain each sample's K highest logits.
            on_step: a recording hook, ``on_step(step, relevance_out, relevance_in)``, called
                once per step whose rule changes relevance (Linear, Conv, pools, lone
                BatchNorms, sums, gates, norms, attention), in backward order, with the
                relevance at the step's output and at each of its inputs, materialised
                (``N·K`` rows); only the pass whose result is returned is reported. For
                diagnostics (:func:`rlrp_fast.metrics.layer_diagnostics`): it costs a copy of
                every step's relevance and runs eagerly (``compile=True`` is not used).

        With K classes per sample (``(N, K)`` targets, ``(N, K, classes)`` output relevance
        or ``top_k``) the forward runs once and the K relevance passes run as one batched
        pass; ``relevance`` is ``(N, K, *x.shape[1:])`` and ``targets`` ``(N, K)``, each map
        equal to the one a separate call would give.
        """
        self._guard.check()
        self._check_input(x)
        if sum(v is not None for v in (target, output_relevance, top_k)) > 1:
            raise ValueError("pass at most one of target, output_relevance and top_k")
        target = self._check_target(target, x.shape[0])
        if output_relevance is not None:
            self._check_output_relevance(output_relevance, x.shape[0])
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                                  or top_k < 1):
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        request = _Request(target, output_relevance, top_k)
        if self._plan is None:
            if on_step is not None:
                raise ValueError("on_step needs a relevance rule: gradient_x_input has no "
                                 "layers to report")
            return self._gradient_x_input(x, request)
        propagators, weights = self._prepare(x.dtype)
        observed: list[tuple] = []
        if on_step is not None:
            propagators = [None if p is None else _Observed(p, observed) for p in propagators]
        args = (self._plan, x, weights, propagators, self._backend, request,
                self._rule.keeps_mass)
        with torch.inference_mode():
            logits, targets, r_out, result = (self._run(args) if on_step is None
                                              else _explain_batch(*args))
            if result.healthy is not None and not bool(result.healthy.all()):
                _check_target_logits(logits, targets, request)
                # some value left the range where float32 is exact: redo with every step's
                # inputs and relevance scaled to a maximum of 1 (R-LRP is invariant to it)
                observed.clear()
                logits, targets, r_out, result = _explain_batch(*args, safe=True)
                if not bool(torch.isfinite(result.relevance).all()):
                    raise FloatingPointError(
                        "R-LRP relevance overflowed although the logits are finite (weights "
                        "near the float range's limits?); try float64 input")
            elif result.healthy is None:
                _check_target_logits(logits, targets, request)
        if self._verify:
            self._verify_once(x, logits, weights, propagators)
        for event in observed:
            on_step(*event)
        # clones made outside inference mode: ordinary tensors the caller may modify in place
        relevance = result.relevance
        vanished = None
        if result.healthy is not None:
            vanished = (l1_per_sample(relevance) == 0) & (l1_per_sample(r_out) > 0)
        return _shaped(Explanation(relevance=relevance.clone(), logits=logits.clone(),
                                   targets=targets.clone(), vanished=vanished), request)

    def _run(self, args: tuple) -> tuple[torch.Tensor, torch.Tensor, RelevancePass]:
        if self._compiled is None:
            return _explain_batch(*args)
        try:
            return self._compiled(*args)
        except Exception as exc:  # noqa: BLE001
            failure = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        # a batch at fault (say, a target out of range) raises its clear error here
        out = _explain_batch(*args)
        warnings.warn(f"torch.compile failed ({failure}); this Explainer runs eagerly from "
                      "now on", RuntimeWarning, stacklevel=3)
        self._compiled = None
        return out

    def _verify_once(self, x: torch.Tensor, logits: torch.Tensor, weights: dict,
                     propagators: list) -> None:
        """Trace verification, once per (shape, dtype, device) that passes."""
        key = (tuple(x.shape), x.dtype, x.device)
        if key in self._verified:
            return

        def run_plan(x_: torch.Tensor, record: dict) -> torch.Tensor:
            return run_forward(self._plan, x_, weights, propagators, record)[0]

        verify_logits(self.model, self._param_dtype, self._plan, x, logits, run_plan)
        with self._lock:
            self._verified.add(key)

    __call__ = explain

    def _gradient_x_input(self, x: torch.Tensor, request: "_Request") -> Explanation:
        """Gradient × input, dtypes as the R-LRP path: the forward (and so autograd's
        backward) in ``x``'s dtype, with the model's floating parameters and buffers cast to
        it for the call when they differ (the model is untouched), relevance in float32
        (float64 for float64 input). K classes per sample: one forward, autograd's batched
        gradients (``is_grads_batched``)."""
        cast = any(t.is_floating_point() and t.dtype != x.dtype for t in self._tensors)
        with torch.inference_mode(False), torch.enable_grad():
            x_grad = x.detach().clone().requires_grad_(True)
            if not cast:
                logits = self.model(x_grad)
            else:
                params = {name: t.to(x.dtype) if t.is_floating_point() else t
                          for name, t in (*self.model.named_parameters(),
                                          *self.model.named_buffers())}
                try:
                    logits = torch.func.functional_call(self.model, params, (x_grad,))
                except RuntimeError as exc:
                    first = (str(exc).splitlines() or [""])[0]
                    if not any(w in first for w in ("Half", "BFloat16", "Double", "Float",
                                                    "dtype", "type")):
                        raise
                    raise TypeError(
                        f"the model could not run in {x.dtype} with its parameters cast to "
                        f"it ({first}); pass x as {self._param_dtype}") from exc
            rel_dtype = relevance_dtype(x.dtype)
            r_out, targets = _output_relevance(logits.detach(), request, rel_dtype)
            n, k = targets.shape
            if k == 1:
                (grad,) = torch.autograd.grad(logits, x_grad, r_out.to(logits.dtype))
            else:  # (K, N, classes) → K gradients from one graph
                batched = r_out.view(n, k, -1).transpose(0, 1).to(logits.dtype)
                (grad,) = torch.autograd.grad(logits, x_grad, batched, is_grads_batched=True)
                grad = grad.transpose(0, 1).reshape(n * k, *x.shape[1:])
        x_rows = x.to(rel_dtype).repeat_interleave(k, 0) if k > 1 else x.to(rel_dtype)
        return _shaped(Explanation(relevance=x_rows * grad.to(rel_dtype),
                                   logits=logits.detach(), targets=targets), request)


class _Observed:
    """A step's propagator that also keeps ``(step, R_out, [R_in...])`` for ``on_step``."""

    def __init__(self, inner: Propagator, events: list) -> None:
        self.inner, self.events = inner, events
        self.needs_output = inner.needs_output

    def __call__(self, backend, step, r, inputs, z):
        r_out = r.materialize()
        parts = self.inner(backend, step, r, inputs, z)
        self.events.append((step, r_out, [p.materialize() for p in parts]))
        return parts


@dataclass(frozen=True)
class _Request:
    """What the caller asked to explain (validated): one of the three, or none (arg-max)."""

    target: int | torch.Tensor | None
    output_relevance: torch.Tensor | None
    top_k: int | None

    @property
    def multi(self) -> bool:
        """K maps per sample (the results get a K dimension)."""
        if self.top_k is not None:
            return True
        if self.output_relevance is not None:
            return self.output_relevance.dim() == 3
        return isinstance(self.target, torch.Tensor) and self.target.dim() == 2


def _shaped(e: Explanation, request: _Request) -> Explanation:
    """Rows ``n·K + k`` of a batched pass as ``(N, K, ...)`` (or ``(N, ...)`` for one map)."""
    n, k = e.targets.shape
    if request.multi:
        e.relevance = e.relevance.view(n, k, *e.relevance.shape[1:])
        e.vanished = None if e.vanished is None else e.vanished.view(n, k)
    else:
        e.targets = e.targets.view(n)
    return e


def _explain_batch(plan: Plan, x: torch.Tensor, weights: dict, propagators: list,
                   backend, request: _Request, keep_mass: bool, safe: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RelevancePass]:
    """The plan's forward and relevance pass on a validated batch (what ``compile`` compiles):
    ``(logits, targets (N, K), R_out (N·K, classes), relevance pass of N·K rows)``."""
    logits, tape = run_forward(plan, x, weights, propagators)
    rel_dtype = relevance_dtype(x.dtype)
    r_out, targets = _output_relevance(logits, request, rel_dtype)
    result = run_relevance(plan, tape, r_out, backend, propagators, keep_mass, safe,
                           repeat=targets.shape[1])
    return logits, targets, r_out, result


def _check_target_logits(logits: torch.Tensor, targets: torch.Tensor,
                         request: _Request) -> None:
    """Refuse to explain a target logit that is not finite (nothing to redistribute)."""
    if request.output_relevance is not None:  # the caller's start relevance, validated finite
        return
    bad = ~torch.isfinite(logits.gather(1, targets)).all(1)
    if bool(bad.any()):
        samples = bad.nonzero().view(-1).tolist()
        raise ValueError(f"the model's logits are not finite (NaN or Inf) for sample(s) "
                         f"{samples[:10]}: there is no finite output to explain (inputs or "
                         "weights beyond the model's numeric range?)")


def _forward_weights(step: Affine, dtype: torch.dtype, rel_dtype: torch.dtype) -> tuple:
    """``(W, b, s)`` of an Affine step for the forward in ``dtype``. A folded BatchNorm's
    ``s`` (None without one) stays in the relevance dtype, float32 at least, so that a
    float16/bfloat16 forward rounds ``s·z`` (or ``s·W``) once, as the model's own would."""
    weight = step.weight.to(dtype)
    bias = None if step.bias is None else step.bias.to(dtype)
    scale = None if step.channel_scale is None else step.channel_scale.to(rel_dtype)
    return weight, bias, scale


def _output_relevance(logits: torch.Tensor, request: _Request, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R_out, targets)``: ``R_out`` ``(N·K, classes)``, row ``n·K + k`` the target's logit
    (0 elsewhere) or the caller's ``output_relevance[n, k]``; ``targets`` ``(N, K)``."""
    if logits.dim() != 2:
        raise ValueError(f"the model must output logits of shape (N, classes), got "
                         f"{tuple(logits.shape)}")
    n, classes = logits.shape
    given = request.output_relevance
    if given is not None:
        if given.shape[-1] != classes:
            raise ValueError(f"output_relevance has shape {tuple(given.shape)}, the logits "
                             f"have {tuple(logits.shape)}")
        # a copy: the relevance pass works in place and must not touch the caller's tensor
        r = given.to(device=logits.device, dtype=dtype, copy=True).reshape(-1, classes)
        return r, r.abs().argmax(dim=1).view(n, -1)
    target = request.target
    if request.top_k is not None:
        if request.top_k > classes:
            raise ValueError(f"top_k={request.top_k} exceeds the {classes} classes")
        targets = logits.topk(request.top_k, dim=1).indices
    elif target is None:
        targets = logits.argmax(dim=1, keepdim=True)
    elif isinstance(target, int):
        if not 0 <= target < classes:  # before torch.full: 2**70 overflows int64
            raise ValueError(f"target {target} is out of range for {classes} classes")
        targets = torch.full((n, 1), target, dtype=torch.long, device=logits.device)
    else:  # only the caller's indices need a range check (a data-dependent branch)
        targets = target.to(device=logits.device, dtype=torch.long).view(n, -1)
        bad = (targets < 0) | (targets >= classes)
        if bad.any():
            raise ValueError(f"target {targets[bad][0].item()} is out of range for "
                             f"{classes} classes")
    rows = targets.reshape(-1, 1)
    r = torch.zeros(rows.shape[0], classes, dtype=dtype, device=logits.device)
    picked = logits.gather(1, targets).reshape(-1, 1)
    return r.scatter_(1, rows, picked.to(dtype)), targets


def explain(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None,
            output_relevance: torch.Tensor | None = None, top_k: int | None = None,
            **options) -> Explanation:
    """One-shot convenience: ``Explainer(model, **options).explain(x, target, ...)``.

    Building an explainer traces the model; reuse an :class:`Explainer` for many batches."""
    return Explainer(model, **options).explain(x, target=target,
                                               output_relevance=output_relevance, top_k=top_k)
