"""The fast path (``Explainer(..., backend="torch")``) against the float64 reference
(``rlrp_fast.reference``), for every rule, on many small seeded random architectures.

The architectures are drawn by :func:`random_model`: Conv1d/Conv2d (and one Conv3d) with
kernel sizes 1/3/5, strides 1/2, padding, dilation 1/2, groups 1/2; BatchNorm after a conv
(folded by capture) and lone BatchNorms after an activation (not foldable); max, average and
adaptive pooling; residual blocks with and without a projection; torch.cat; flatten (module
and ``x.view(x.size(0), -1)``), spatial mean; a Linear head. Biases and BatchNorm statistics
are random (never zero) and image sizes ragged.

Errors are per sample, relative L1, in float64: ``‖R_fast − R_ref‖₁ / ‖R_ref‖₁``.
"""
from __future__ import annotations

import functools
import random

import pytest
import torch
import torch.nn as nn

from rlrp_fast import Explainer
from rlrp_fast.capture import capture
from rlrp_fast.reference import reference_explain

pytestmark = pytest.mark.usefixtures("one_thread")

FP32_TOL = 1e-5   # float32 fast path vs float64 reference
FP64_TOL = 1e-10  # float64 fast path vs float64 reference

# (rule, options): every rule of rules.py; zB's bounds cover the inputs (randn, |x| < 4.5).
RULE_CASES = [
    ("rlrp", {}),
    ("rlrp", {"skip": "ratio"}),
    ("rlrp", {"norm": "layer"}),
    ("rlrp", {"norm": "neuron"}),
    ("rlrp", {"norm": "neuron", "skip": "ratio"}),
    ("lrp0", {}),
    ("epsilon", {}),
    ("epsilon", {"epsilon": 0.25}),
    ("zplus", {}),
    ("gamma", {}),
    ("gamma", {"gamma": 1.0}),
    ("alphabeta", {}),
    ("alphabeta", {"alpha": 1.0, "beta": 0.0}),
    ("zbox", {"low": -4.5, "high": 4.5}),
    ("flat", {}),
    ("wsquare", {}),
    ("EpsilonPlus", {}),
    ("EpsilonGammaBox", {"low": -4.5, "high": 4.5}),
    ("EpsilonPlusFlat", {}),
]
RULE_IDS = [r + "".join(f"-{k}={v}" for k, v in o.items()) for r, o in RULE_CASES]
SEEDS = list(range(32))


# =============================================================================================
# Random architectures
# =============================================================================================
class Residual(nn.Module):
    """``act(body(x) + shortcut(x))``; ``shortcut`` None is the identity."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None, act: nn.Module):
        super().__init__()
        self.body, self.shortcut, self.act = body, shortcut, act

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.body(x) + skip)


class Concat(nn.Module):
    """``torch.cat([a(x), b(x)], dim=1)``: a fork and a concatenation."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class SpatialMean(nn.Module):
    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.mean(dim=self.dims)


class ViewFlatten(nn.Module):
    """``x.view(x.size(0), -1)``: a reshape whose argument is computed at run time."""

    def forward(self, x):
        return x.view(x.size(0), -1)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_ADAPTIVE_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_ADAPTIVE_MAX = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}


def _randomise_bn(bn: nn.Module, rng: random.Random) -> nn.Module:
    """Random running statistics and affine parameters (γ of either sign, never near 0)."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        sign = torch.where(torch.rand(bn.num_features, generator=g) < 0.2, -1.0, 1.0)
        bn.weight.uniform_(0.5, 1.5, generator=g).mul_(sign)
        bn.bias.normal_(0, 0.2, generator=g)
    return bn


class _Builder:
    """Appends random layers while tracking the activation's shape ``(C, *spatial)``."""

    def __init__(self, rng: random.Random, dims: int, shape: tuple[int, ...]):
        self.rng, self.dims, self.shape = rng, dims, shape

    def out_shape(self, module: nn.Module, shape=None) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(module.eval()(torch.zeros(1, *(shape or self.shape))).shape[1:])

    def activation(self) -> nn.Module:
        r = self.rng.random()
        if r < 0.6:
            return nn.ReLU()
        if r < 0.75:
            return nn.LeakyReLU(0.1)
        if r < 0.85:
            return nn.Tanh()
        if r < 0.95:
            return nn.GELU()
        return nn.Identity()

    def conv(self, c_in: int, c_out: int, shape=None, small: bool = False) -> nn.Module:
        """A random conv that fits the spatial size; groups 2 when both widths are even."""
        rng, spatial = self.rng, (shape or self.shape)[1:]
        for _ in range(50):
            k = rng.choice([1, 3] if small else [1, 3, 3, 5])
            dilation = rng.choice([1, 1, 2]) if k > 1 else 1
            stride = rng.choice([1, 1, 2])
            padding = rng.randint(0, (k - 1) * dilation // 2 + (1 if k > 1 else 0))
            extent = dilation * (k - 1) + 1
            if all(s + 2 * padding >= extent for s in spatial):
                break
        else:
            k, dilation, stride, padding = 1, 1, 1, 0
        groups = 2 if c_in % 2 == 0 and c_out % 2 == 0 and rng.random() < 0.3 else 1
        conv = _CONV[self.dims](c_in, c_out, k, stride=stride, padding=padding,
                                dilation=dilation, groups=groups)
        with torch.no_grad():  # random biases of a useful size (never zero)
            conv.bias.normal_(0, 0.2, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        return conv

    def add_conv_block(self, layers: list) -> None:
        c_in = self.shape[0]
        c_out = self.rng.choice([2, 3, 4, 6])
        block = [self.conv(c_in, c_out)]
        if self.rng.random() < 0.5:
            block.append(_randomise_bn(_BN[self.dims](c_out), self.rng))  # folded by capture
        block.append(self.activation())
        if self.rng.random() < 0.2:
            block.append(_randomise_bn(_BN[self.dims](c_out), self.rng))  # lone: a Scale
        seq = nn.Sequential(*block)
        self.shape = self.out_shape(seq)
        layers.append(seq)

    def add_pool(self, layers: list) -> None:
        spatial = self.shape[1:]
        if min(spatial) < 2:
            return
        rng = self.rng
        k = rng.choice([2, 3]) if min(spatial) >= 3 else 2
        stride = rng.choice([1, 2])
        padding = rng.choice([0, 1]) if k == 3 else 0
        if rng.random() < 0.5:
            pool = _MAXPOOL[self.dims](k, stride=stride, padding=padding,
                                       ceil_mode=rng.random() < 0.3)
        else:
            pool = _AVGPOOL[self.dims](k, stride=stride, padding=padding,
                                       ceil_mode=rng.random() < 0.3,
                                       count_include_pad=rng.random() < 0.5)
        self.shape = self.out_shape(pool)
        layers.append(pool)

    def add_residual(self, layers: list) -> None:
        c_in = self.shape[0]
        project = self.rng.random() < 0.5
        c_out = self.rng.choice([2, 4]) if project else c_in
        stride = self.rng.choice([1, 2]) if project and min(self.shape[1:]) >= 3 else 1
        conv1 = _CONV[self.dims](c_in, c_out, 3, stride=stride, padding=1)
        conv2 = _CONV[self.dims](c_out, c_out, 3, padding=1)
        body = nn.Sequential(conv1, _randomise_bn(_BN[self.dims](c_out), self.rng), nn.ReLU(),
                             conv2, _randomise_bn(_BN[self.dims](c_out), self.rng))
        shortcut = None
        if project:
            shortcut = nn.Sequential(_CONV[self.dims](c_in, c_out, 1, stride=stride),
                                     _randomise_bn(_BN[self.dims](c_out), self.rng))
        block = Residual(body, shortcut, nn.ReLU())
        self.shape = self.out_shape(block)
        layers.append(block)

    def add_cat(self, layers: list) -> None:
        c_in = self.shape[0]
        a = nn.Sequential(_CONV[self.dims](c_in, self.rng.choice([2, 3]), 3, padding=1),
                          nn.ReLU())
        b = nn.Sequential(_CONV[self.dims](c_in, 2, 1), self.activation())
        block = Concat(a, b)
        self.shape = self.out_shape(block)
        layers.append(block)

    def add_head(self, layers: list, classes: int) -> None:
        rng = self.rng
        choice = rng.choice(["flatten", "view", "adaptive_avg", "adaptive_max", "mean"])
        if choice in ("adaptive_avg", "adaptive_max"):
            table = _ADAPTIVE_AVG if choice == "adaptive_avg" else _ADAPTIVE_MAX
            size = tuple(rng.choice([1, 2]) if s > 1 else 1 for s in self.shape[1:])
            layers += [table[self.dims](size), nn.Flatten()]
        elif choice == "mean":
            layers.append(SpatialMean(tuple(range(2, 2 + self.dims))))
        else:
            layers.append(nn.Flatten() if choice == "flatten" else ViewFlatten())
        features = self.out_shape(nn.Sequential(*layers[-2:]) if choice.startswith("adaptive")
                                  else layers[-1])[0]
        if rng.random() < 0.5:
            hidden = rng.choice([5, 8])
            layers += [nn.Linear(features, hidden), nn.ReLU()]
            if rng.random() < 0.3:
                layers.append(_randomise_bn(nn.BatchNorm1d(hidden), rng))  # lone, after ReLU
            features = hidden
        layers.append(nn.Linear(features, classes))


def _is_alive(model: nn.Module, shape: tuple[int, ...], seed: int) -> bool:
    """No ReLU of ``model`` is dead on a probe batch: each has ≥ 10 % non-zero outputs and
    every sample has a non-zero output at each ReLU (a dead net explains nothing)."""
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    probe = torch.randn(8, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(probe)
    for h in hooks:
        h.remove()
    return all((o != 0).double().mean() >= 0.1 and (o != 0).flatten(1).any(1).all()
               for o in outputs)


def random_model(seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A random small classifier in eval mode and its input shape ``(C, *spatial)``.

    ``seed`` ≡ 1 (mod 4) gives a Conv1d net; ``seed == 7`` a Conv3d net; otherwise Conv2d.
    Draws again (from the same stream) until no ReLU is dead."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    dims = 3 if seed == 7 else (1 if seed % 4 == 1 else 2)
    for _ in range(20):
        spatial = {1: (rng.randint(13, 19),), 2: (rng.randint(7, 10), rng.randint(8, 11)),
                   3: (4, 5, 6)}[dims]
        channels = rng.choice([1, 2, 3])
        b = _Builder(rng, dims, (channels, *spatial))
        layers: list[nn.Module] = []
        if dims == 1 and rng.random() < 0.4:
            # A Linear over the last dim of (N, C, L) comes first: the first Affine is then
            # not a conv (EpsilonPlusFlat's flat and EpsilonGammaBox's zB part ways).
            layers += [nn.Linear(spatial[0], rng.randint(9, 14)), b.activation()]
            b.shape = b.out_shape(nn.Sequential(*layers))
        b.add_conv_block(layers)
        for _ in range(rng.randint(1, 3) if dims < 3 else 1):
            kind = rng.choice(["conv", "conv", "pool", "pool", "residual", "cat"])
            getattr(b, {"conv": "add_conv_block", "pool": "add_pool",
                        "residual": "add_residual", "cat": "add_cat"}[kind])(layers)
        b.add_head(layers, classes=rng.choice([3, 4]))
        model = nn.Sequential(*layers).eval()
        if _is_alive(model, (channels, *spatial), seed):
            return model, (channels, *spatial)
    raise RuntimeError(f"seed {seed}: no live random model in 20 draws")


@functools.lru_cache(maxsize=None)
def _case(seed: int):
    """(model, plan, x) for ``seed``: 3 samples of standard normal input (|x| < 4.5)."""
    model, shape = random_model(seed)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1000 + seed))
    x = x.clamp(-4.4, 4.4)
    return model, capture(model), x


def _relative_errors(fast: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per sample ``‖fast − ref‖₁ / ‖ref‖₁`` in float64 (0 where both are exactly 0)."""
    diff = (fast.double() - ref).abs().flatten(1).sum(1)
    norm = ref.abs().flatten(1).sum(1)
    return torch.where(norm > 0, diff / norm.clamp_min(1e-300),
                       torch.where(diff > 0, torch.inf, 0.0))


def _perturbation_floor(plan, x: torch.Tensor, rule: str, options: dict,
                        target: torch.Tensor) -> torch.Tensor:
    """How far the float64 reference itself moves, per sample (relative L1), when the input
    is perturbed by float32 rounding noise (relative 2⁻²³): the accuracy no float32
    implementation can beat on this case. Classic rules divide by sums that can nearly
    cancel (``Norm`` at residual adds, pools and lone BatchNorms), which amplifies rounding;
    this measures by how much."""
    ref, _ = reference_explain(plan, x, rule=rule, target=target, **options)
    floor = torch.zeros(x.shape[0], dtype=torch.float64)
    for k in range(2):
        g = torch.Generator().manual_seed(k)
        noise = 2 * torch.rand(x.shape, generator=g, dtype=torch.float64) - 1
        moved, _ = reference_explain(plan, x.double() * (1 + 2.0**-23 * noise), rule=rule,
                                     target=target, **options)
        floor = torch.maximum(floor, _relative_errors(moved, ref))
    return floor


def _compare(seed: int, rule: str, options: dict, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample relative L1 error of the fast path (input in ``dtype``) vs the reference."""
    model, plan, x = _case(seed)
    fast = Explainer(model, rule=rule, backend="torch", **options).explain(x.to(dtype))
    ref, logits = reference_explain(plan, x.to(dtype), rule=rule, target=fast.targets,
                                    **options)
    assert fast.relevance.shape == x.shape and fast.relevance.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(fast.relevance).all()
    # Both forwards must agree before the maps are compared.
    torch.testing.assert_close(fast.logits.double(), logits,
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    return _relative_errors(fast.relevance, ref)


# =============================================================================================
# Tests
# =============================================================================================
@pytest.mark.parametrize("seed", SEEDS)
def test_generator_builds_what_it_promises(seed):
    """Each random model traces, and the plan holds the step kinds the generator meant."""
    model, plan, x = _case(seed)
    with torch.no_grad():
        assert model(x).shape[0] == x.shape[0]
    assert any(type(s).__name__ == "Affine" and s.conv_dims for s in plan.steps)


def _batchnorm_fold_sides(model: nn.Module, plan, x: torch.Tensor) -> set[str]:
    """Which side each folded BatchNorm is applied to on ``x`` (the engine scales the
    weight or the layer's output/relevance, whichever is smaller): both must be tested."""
    folded = {s.target.split("+")[0]: s for s in plan.steps
              if type(s).__name__ == "Affine" and s.channel_scale is not None}
    sides: set[str] = set()

    def record(step):
        def hook(module, args, output):
            assert step.output_numel(args[0].shape) == output.numel()
            smaller = step.weight.numel() < output.numel()
            sides.add("bn_scales_weight" if smaller else "bn_scales_output")
        return hook

    handles = [model.get_submodule(name).register_forward_hook(record(step))
               for name, step in folded.items()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sides


def test_generator_covers_the_architecture_space():
    """Across the seeds, every feature the fast path must handle occurs at least once."""
    seen = set()
    for seed in SEEDS:
        model, plan, x = _case(seed)
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                seen.add(type(m).__name__)
                seen.add(f"k{m.kernel_size[0]}")
                seen.add(f"s{m.stride[0]}")
                seen.add(f"d{m.dilation[0]}")
                seen.add(f"g{m.groups}")
                if any(m.padding):
                    seen.add("padding")
            seen.add(type(m).__name__)
            if isinstance(m, Residual):
                seen.add("projection" if m.shortcut is not None else "identity_skip")
        seen.update(type(s).__name__ for s in plan.steps)
        first = next(s for s in plan.steps if type(s).__name__ == "Affine")
        seen.add("linear_first" if not first.conv_dims else "conv_first")
        seen.update(_batchnorm_fold_sides(model, plan, x))
    required = {"bn_scales_weight", "bn_scales_output",
                "Conv1d", "Conv2d", "Conv3d", "k1", "k3", "k5", "s1", "s2", "d1", "d2", "g1",
                "g2", "padding", "MaxPool2d", "AvgPool2d", "Residual", "projection",
                "identity_skip", "Concat", "SpatialMean", "ViewFlatten", "Flatten", "Linear",
                "Scale", "Add", "Cat", "MaxPool", "Pool", "Reshape", "Meta",
                "AdaptiveAvgPool2d", "AdaptiveMaxPool1d", "AvgPool1d", "MaxPool1d",
                "linear_first", "conv_first"}
    assert required <= seen, f"not covered: {sorted(required - seen)}"


@pytest.mark.parametrize("rule,options", RULE_CASES, ids=RULE_IDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_fast_float32_matches_reference(seed, rule, options):
    """Float32 fast path within 1e-5 of the reference; where the case is ill-conditioned
    (the reference itself moves by more under float32-sized input noise), within 10× that
    measured floor instead (the float64 test below holds every case to 1e-10)."""
    err = _compare(seed, rule, options, torch.float32)
    if err.max() > FP32_TOL:
        _, plan, x = _case(seed)
        fast = Explainer(_case(seed)[0], rule=rule, backend="torch", **options).explain(x)
        floor = _perturbation_floor(plan, x, rule, options, fast.targets)
        bound = torch.clamp(10 * floor, min=FP32_TOL)
        assert (err <= bound).all(), (f"per-sample relative L1 errors {err.tolist()} exceed "
                                      f"max(1e-5, 10 × conditioning floor) {bound.tolist()}")


@pytest.mark.parametrize("rule,options", RULE_CASES, ids=RULE_IDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_fast_float64_matches_reference(seed, rule, options):
    err = _compare(seed, rule, options, torch.float64)
    assert err.max() <= FP64_TOL, f"per-sample relative L1 errors {err.tolist()}"


@pytest.mark.parametrize("rule,options", RULE_CASES, ids=RULE_IDS)
def test_comparisons_are_not_vacuous(rule, options):
    """The maps compared above are mostly non-zero (a dead net would compare 0 with 0)."""
    nonzero = 0
    for seed in SEEDS:
        _, plan, x = _case(seed)
        ref, _ = reference_explain(plan, x, rule=rule, **options)
        nonzero += int((ref.abs().flatten(1).sum(1) > 0).all())
    assert nonzero >= 0.8 * len(SEEDS), f"only {nonzero}/{len(SEEDS)} seeds give non-zero maps"


@pytest.mark.parametrize("rule,options", [RULE_CASES[0], RULE_CASES[6], RULE_CASES[14]],
                         ids=[RULE_IDS[0], RULE_IDS[6], RULE_IDS[14]])
@pytest.mark.parametrize("seed", SEEDS[:8])
def test_fast_batch_independence(seed, rule, options):
    """A sample's fast map is the same alone as inside the batch (float64, to rounding)."""
    model, _, x = _case(seed)
    explainer = Explainer(model, rule=rule, backend="torch", **options)
    together = explainer.explain(x.double())
    for s in range(x.shape[0]):
        alone = explainer.explain(x[s:s + 1].double(), target=together.targets[s:s + 1])
        err = _relative_errors(alone.relevance, together.relevance[s:s + 1])
        assert err.max() <= 1e-12, (s, err)


# =============================================================================================
# zB's bounds as tensors
# =============================================================================================
def _per_channel_bounds(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds ``(1, C, 1, …)`` (zennit's documented shape) that cover ``x``."""
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    low = -4.5 - torch.arange(x.shape[1], dtype=torch.float32).view(shape)
    return low, -low + 0.5


BOUND_SEEDS = [s for s in SEEDS if _case(s)[2].shape[1] > 1 and _case(s)[2].dim() == 4][:4]


@pytest.mark.parametrize("seed", BOUND_SEEDS)
def test_zbox_per_channel_bounds_without_batch_dim(seed):
    """EpsilonGammaBox with per-channel bounds given as ``(C, 1, 1)`` (the shape the engine
    accepts today) equals the reference with the same bounds as ``(1, C, 1, 1)``."""
    model, plan, x = _case(seed)
    low, high = _per_channel_bounds(x)
    fast = Explainer(model, rule="EpsilonGammaBox", backend="torch", low=low[0],
                     high=high[0]).explain(x.double())
    ref, _ = reference_explain(plan, x, rule="EpsilonGammaBox", target=fast.targets,
                               low=low, high=high)
    scalar, _ = reference_explain(plan, x, rule="EpsilonGammaBox", target=fast.targets,
                                  low=-4.5, high=4.5)
    assert _relative_errors(scalar, ref).max() > 1e-3  # the bounds do matter
    assert _relative_errors(fast.relevance, ref).max() <= FP64_TOL


@pytest.mark.parametrize("seed", BOUND_SEEDS[:1])
def test_zbox_bounds_in_zennits_shape(seed):
    """zennit 0.5.1 takes ``low``/``high`` broadcastable to the input *with* its batch dim,
    e.g. ``(1, C, 1, 1)`` (and rejects ``(C, 1, 1)``); the spec says the classic rules mean
    what zennit means, so the fast path must take that shape."""
    model, plan, x = _case(seed)
    low, high = _per_channel_bounds(x)
    fast = Explainer(model, rule="EpsilonGammaBox", backend="torch", low=low,
                     high=high).explain(x.double())
    ref, _ = reference_explain(plan, x, rule="EpsilonGammaBox", target=fast.targets,
                               low=low, high=high)
    assert _relative_errors(fast.relevance, ref).max() <= FP64_TOL


class _BroadcastSums(nn.Module):
    """Sums whose operands broadcast: a map plus its own spatial mean, plus a per-channel
    term from a dense branch (``(N, C, 1, 1)``), then a row vector (``(N, 1, H, W)``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)
        self.row = nn.Conv2d(3, 1, 1)
        self.head = nn.Linear(3 * 5 * 4, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h + h.mean((2, 3), keepdim=True)
        h = h + self.fc(h.mean((2, 3)))[:, :, None, None]
        h = torch.relu(h) + self.row(h)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("rule,options", RULE_CASES, ids=RULE_IDS)
def test_broadcasting_sums_match_reference(rule, options):
    """Each operand of a broadcasting sum gets the relevance summed over the dims it was
    broadcast along, on the fast path as in the reference."""
    torch.manual_seed(3)
    model = _BroadcastSums().double().eval()
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    fast = Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, _ = reference_explain(capture(model), x, rule=rule, target=fast.targets, **options)
    assert ref.abs().sum() > 0
    assert _relative_errors(fast.relevance, ref).max() < FP64_TOL
