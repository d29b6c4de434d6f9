"""The methods the benchmark times, each a ``setup(model, spec, device, dtype) -> fn`` with
``fn(x) -> tensor`` (the relevance, or the logits for the forward floor).

``setup`` does once what a user does once (build an explainer, open a zennit attributor,
wrap the model in Captum's LRP); ``fn`` is what a user pays per batch. Peers attach hooks
to the model they are given, so callers hand each of them its own copy."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

import rlrp_fast
from rlrp_fast.backends import unavailable_reason

from .models import ModelSpec

Fn = Callable[[torch.Tensor], torch.Tensor]

CAPTUM_EPSILON = 1e-9  # captum.attr._utils.lrp_rules.EpsilonRule's default


@dataclass(frozen=True)
class Method:
    key: str             # what --methods takes
    label: str           # what the table shows
    family: str          # floor | ours | zennit | captum
    setup: Callable[[nn.Module, ModelSpec, torch.device, torch.dtype], Fn]
    devices: tuple[str, ...] = ("cpu", "cuda")
    ours_dtype: bool = False  # runs in --dtype (our engine); the others always run float32
    backend: str | None = None  # our fused backend it needs, if any
    imports: tuple[str, ...] = ()  # modules whose code the memory probe does not count

    def skip_reason(self, device: torch.device) -> str | None:
        """Why this method cannot run here, or None."""
        if device.type not in self.devices:
            return f"{device.type} has no such backend"
        if self.backend is not None:
            reason = unavailable_reason(self.backend)
            if reason is not None:
                return f"backend unavailable: {reason}"
        if self.family == "zennit":
            try:
                import zennit  # noqa: F401
            except ImportError:
                return "zennit is not installed (pip install zennit==0.5.1)"
        if self.family == "captum":
            try:
                import captum  # noqa: F401
            except ImportError:
                return "captum is not installed (pip install captum==0.9.0)"
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the floor -------------------------------------------------------------------------------
def _forward(model, spec, device, dtype) -> Fn:
    def fn(x):
        with torch.inference_mode():
            return model(x)
    return fn


def _gradient_x_input(model, spec, device, dtype) -> Fn:
    """Plain autograd: one forward, one backward to the input, times the input."""
    def fn(x):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = model(xg)
            score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            (grad,) = torch.autograd.grad(score, xg)
        return grad * x
    return fn


# -- our engine ------------------------------------------------------------------------------
def _ours(rule: str, backend: str, compile: bool = False, **options):  # noqa: A002
    def setup(model, spec, device, dtype) -> Fn:
        opts = dict(options)
        if rule == "EpsilonGammaBox":
            opts.update(low=spec.low, high=spec.high)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # 'auto' falling back to torch
            explainer = rlrp_fast.Explainer(model, rule=rule, backend=backend,
                                            compile=compile, **opts)

        def fn(x):
            return explainer.explain(x.to(dtype)).relevance
        fn.explainer = explainer
        return fn
    return setup


# -- zennit ----------------------------------------------------------------------------------
def zennit_canonizers(model: nn.Module, spec: ModelSpec) -> list:
    """What a zennit user attaches: ResNetCanonizer (BN merge + Sum modules) for ResNets,
    a BN merge where a Sequential has conv→BN, nothing for VGG16."""
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer
    if spec.is_resnet:
        return [ResNetCanonizer()]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return [SequentialMergeBatchNorm()]
    return []


def zennit_composite(rule: str, spec: ModelSpec, canonizers: list):
    from zennit.composites import EpsilonGammaBox, EpsilonPlus
    if rule == "EpsilonPlus":
        return EpsilonPlus(canonizers=canonizers)
    return EpsilonGammaBox(low=spec.low, high=spec.high, canonizers=canonizers)


def _target_logit(output: torch.Tensor) -> torch.Tensor:
    """The start relevance our engine uses: the arg-max logit, 0 elsewhere."""
    index = output.argmax(1, keepdim=True)
    return torch.zeros_like(output).scatter_(1, index, output.gather(1, index))


def _zennit(rule: str):
    def setup(model, spec, device, dtype) -> Fn:
        from zennit.attribution import Gradient
        composite = zennit_composite(rule, spec, zennit_canonizers(model, spec))
        attributor = Gradient(model=model, composite=composite)
        attributor.__enter__()  # kept open across calls, as a user explaining many batches

        def fn(x):
            _, relevance = attributor(x, _target_logit)
            return relevance
        fn.attributor = attributor
        return fn
    return setup


# -- Captum ----------------------------------------------------------------------------------
def _captum(model, spec, device, dtype) -> Fn:
    from captum.attr import LRP
    lrp = LRP(model)
    targets: dict[int, torch.Tensor] = {}

    def fn(x):
        # Captum needs the target class up front; it is computed once per batch, outside
        # the timed calls (the warm-up call pays it), which flatters Captum slightly.
        key = id(x)
        if key not in targets:
            with torch.no_grad():  # not inference_mode: Captum saves the targets for backward
                targets[key] = model(x).argmax(1)
        return lrp.attribute(x, target=targets[key])

    def release():
        """Captum keeps the last call's activations and relevances on its layers and rules
        until the next call; the timing loop drops them between calls (outside the clock)."""
        for layer in lrp.layers:
            layer.__dict__.pop("activations", None)
            rule = getattr(layer, "rule", None)
            if rule is not None:
                rule.__dict__.pop("relevance_input", None)
                rule.__dict__.pop("relevance_output", None)
    fn.release = release
    return fn


_ZENNIT_MODULES = ("zennit.attribution", "zennit.canonizers", "zennit.composites",
                   "zennit.torchvision")

METHODS = {m.key: m for m in [
    Method("forward", "forward only", "floor", _forward),
    Method("gxi", "gradient × input", "floor", _gradient_x_input),
    Method("rlrp-torch", "rlrp_fast R-LRP [torch]", "ours", _ours("rlrp", "torch"),
           ours_dtype=True),
    Method("rlrp-cpp", "rlrp_fast R-LRP [cpp]", "ours", _ours("rlrp", "cpp"), ("cpu",),
           ours_dtype=True, backend="cpp"),
    Method("rlrp-triton", "rlrp_fast R-LRP [triton]", "ours", _ours("rlrp", "triton"),
           ("cuda",), ours_dtype=True, backend="triton"),
    Method("neuron-torch", "rlrp_fast R-LRP norm=neuron [torch]", "ours",
           _ours("rlrp", "torch", norm="neuron"), ours_dtype=True),
    Method("neuron-cpp", "rlrp_fast R-LRP norm=neuron [cpp]", "ours",
           _ours("rlrp", "cpp", norm="neuron"), ("cpu",), ours_dtype=True, backend="cpp"),
    Method("neuron-triton", "rlrp_fast R-LRP norm=neuron [triton]", "ours",
           _ours("rlrp", "triton", norm="neuron"), ("cuda",), ours_dtype=True,
           backend="triton"),
    # compiles in the warm-up round (untimed): seconds on digits, a minute per batch on 224²
    Method("rlrp-compiled", "rlrp_fast R-LRP [cpp, compiled]", "ours",
           _ours("rlrp", "cpp", compile=True), ("cpu",), ours_dtype=True, backend="cpp",
           imports=("torch._dynamo", "torch._inductor.compile_fx")),
    Method("EpsilonPlus", "rlrp_fast EpsilonPlus", "ours", _ours("EpsilonPlus", "auto"),
           ours_dtype=True),
    Method("EpsilonGammaBox", "rlrp_fast EpsilonGammaBox", "ours",
           _ours("EpsilonGammaBox", "auto"), ours_dtype=True),
    Method("zennit-EpsilonPlus", "zennit EpsilonPlus", "zennit", _zennit("EpsilonPlus"),
           imports=_ZENNIT_MODULES),
    Method("zennit-EpsilonGammaBox", "zennit EpsilonGammaBox", "zennit",
           _zennit("EpsilonGammaBox"), imports=_ZENNIT_MODULES),
    Method("captum-LRP", "Captum LRP (ε=1e-9)", "captum", _captum, imports=("captum.attr",)),
]}

DEFAULT_METHODS = ("forward", "gxi", "rlrp-torch", "rlrp-cpp", "rlrp-triton", "rlrp-compiled",
                   "neuron-torch", "neuron-cpp", "neuron-triton", "EpsilonPlus", "zennit-EpsilonPlus", "zennit-EpsilonGammaBox", "captum-LRP")
QUICK_METHODS = ("forward", "gxi", "rlrp-torch", "rlrp-cpp", "rlrp-triton",
                 "zennit-EpsilonPlus")
