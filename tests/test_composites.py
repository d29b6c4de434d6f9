"""Rule objects and composites: validation, which step gets which rule, presets as
composites, mixed R-LRP/classic composites against the float64 reference, per-layer ε, and
parity with zennit's own LayerMapComposite / SpecialFirstLayerMapComposite."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_fast_vs_reference import FP64_TOL, SEEDS, _case, _relative_errors

import rlrp_fast
from rlrp_fast import Composite
from rlrp_fast.capture import capture
from rlrp_fast.plan import Add, Affine, Pool, Scale
from rlrp_fast.reference import reference_explain
from rlrp_fast.rules import (RLRP, AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, Rule, WSquare,
                             ZBox, ZPlus, make_rule)

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Net(nn.Module):
    """conv → BN (folded) → relu → residual sum (functional) → avg pool → lone BN → linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.conv2(h) + h)
        h = self.bn2(F.relu(self.pool(h)))
        return self.fc(F.avg_pool2d(h, 1).flatten(1))


def _net() -> nn.Module:
    torch.manual_seed(3)
    net = Net().eval()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return net


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _assigned(composite, model=None) -> dict[str, object]:
    """{step.module or step.target: rule} for the linear steps."""
    model = model or _net()
    plan = capture(model)
    rules = composite.assign(plan, model).rules
    return {s.module or s.target: r for s, r in zip(plan.steps, rules) if r is not None}


# -- rule objects ----------------------------------------------------------------------------
@pytest.mark.parametrize("build, error, match", [
    (lambda: Epsilon(-1), ValueError, "^epsilon must be a non-negative finite number"),
    (lambda: Epsilon(float("nan")), ValueError, "^epsilon must be"),
    (lambda: Epsilon(torch.tensor(0.1)), ValueError, "^epsilon must be"),
    (lambda: Gamma(float("inf")), ValueError, "^gamma must be"),
    (lambda: ZPlus(stabilizer="1e-6"), ValueError, "^stabilizer must be"),
    (lambda: Flat(stabilizer=-1.0), ValueError, "^stabilizer must be"),
    (lambda: AlphaBeta(3, 1), ValueError, r"alpha - beta == 1"),
    (lambda: AlphaBeta(2, float("nan")), ValueError, "^beta must be"),
    (lambda: ZBox(1.0, -1.0), ValueError, "^low must not exceed high: low 1 > high -1$"),
    (lambda: ZBox(None, 1.0), ValueError, "needs the input's bounds"),
    (lambda: ZBox("0", 1.0), ValueError, "^low must be a real number"),
    (lambda: ZBox(torch.zeros(2), torch.ones(3)), ValueError, "do not broadcast together"),
    (lambda: RLRP(skip="sum"), ValueError, "skip must be 'linear' or 'ratio'"),
    (lambda: RLRP(norm="batch"), ValueError, "norm must be 'layer' or 'neuron'"),
    (lambda: Norm(float("nan")), ValueError, "^stabilizer must be"),
])
def test_rules_validate_on_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_rules_show_their_parameters():
    assert repr(Epsilon(0.25)) == "Epsilon(epsilon=0.25)"
    assert repr(RLRP(norm="neuron", skip="ratio")) == "RLRP(norm='neuron', skip='ratio')"
    assert "gamma=0.5" in repr(Gamma(0.5))
    assert repr(Pass()) == "Pass()"


def test_composite_arguments_are_checked():
    with pytest.raises(TypeError, match="layer_map: expected a rule object"):
        Composite(layer_map=[(nn.Linear, "epsilon")])
    with pytest.raises(TypeError, match="is not a type"):
        Composite(layer_map=[("Linear", Epsilon())])
    with pytest.raises(TypeError, match=r"\(types, rule\) pairs"):
        Composite(layer_map=[(nn.Linear, Epsilon(), 1)])
    with pytest.raises(TypeError, match="names must be a mapping"):
        Composite(names=[("fc", Epsilon())])
    with pytest.raises(TypeError, match="rule_for must be a callable"):
        Composite(rule_for=Epsilon())
    with pytest.raises(ValueError, match="base must apply to average pools"):
        Composite(base=ZPlus())


# -- which step gets which rule ----------------------------------------------------------------
def test_priority_names_first_layer_map_rule_for_base():
    eps, zp, flat, gam, norm = Epsilon(0.3), ZPlus(), Flat(), Gamma(), Norm(1e-3)
    composite = Composite(layer_map=[(nn.Conv2d, zp), (nn.Linear, eps)], first=flat,
                          names={"conv2": gam}, base=norm)
    got = _assigned(composite)
    # the folded BatchNorm belongs to its conv; the functional sum, pools and the lone BN
    # get the base rule
    assert got["conv1"] is flat and got["conv2"] is gam and got["fc"] is eps
    assert got["pool"] is norm and got["bn2"] is norm
    assert got["add"] is norm and got["avg_pool2d"] is norm
    # names beats first; layer_map beats rule_for; rule_for sees what nothing else matched
    seen = []

    def rule_for(name, module):
        seen.append((name, type(module).__name__))
        return coarse if isinstance(module, nn.AvgPool2d) else None

    coarse = Norm(1e-2)
    got = _assigned(Composite(layer_map=[(nn.Linear, eps)], first=flat,
                              names={"conv1": gam, "conv2": zp}, rule_for=rule_for))
    assert got["conv1"] is gam and got["conv2"] is zp and got["fc"] is eps
    assert got["pool"] is coarse and isinstance(got["bn2"], Norm) and got["bn2"] is not coarse
    assert seen == [("pool", "AvgPool2d"), ("bn2", "BatchNorm2d")]


def test_rule_for_cannot_give_an_unfit_rule():
    with pytest.raises(ValueError, match=r"rule WSquare\(.*\) does not apply to layer 'pool'"):
        _assigned(Composite(layer_map=[(CONVS + (nn.Linear,), Epsilon())],
                            rule_for=lambda name, m: WSquare()))


def test_first_as_a_map_takes_the_first_matching_layer():
    got = _assigned(Composite(layer_map=[((nn.Conv2d, nn.Linear), Epsilon())],
                              first=[(nn.Linear, Flat())]))
    assert isinstance(got["fc"], Flat) and isinstance(got["conv1"], Epsilon)


def test_unnamed_layers_and_unknown_names_are_errors():
    with pytest.raises(ValueError, match=r"gives layer 'fc' \(Linear\) no rule"):
        _assigned(Composite(layer_map=[(nn.Conv2d, ZPlus())]))
    with pytest.raises(ValueError, match="the model has no module 'conv3'"):
        _assigned(Composite(layer_map=[(CONVS + (nn.Linear,), Epsilon())],
                            names={"conv3": Flat()}))
    with pytest.raises(ValueError, match=r"module 'bn1' \(BatchNorm2d\) has no linear step"):
        _assigned(Composite(layer_map=[(CONVS + (nn.Linear,), Epsilon())],
                            names={"bn1": Flat()}))
    with pytest.raises(ValueError, match=r"Pass\(\) does not apply to layer 'conv1' \(Conv2d\)"):
        _assigned(Composite(layer_map=[(nn.Module, Pass())]))
    with pytest.raises(ValueError, match="Pass\\(\\) alone"):
        rlrp_fast.Explainer(_net(), rule=Pass())
    # Pass where it means something: a lone BatchNorm, and (a no-op) an activation by name
    got = _assigned(Composite(layer_map=[(CONVS + (nn.Linear,), Epsilon())],
                              names={"bn2": Pass()}))
    assert isinstance(got["bn2"], Pass)


def test_explainer_takes_names_objects_and_composites():
    model = _net()
    with pytest.raises(TypeError, match="go with a preset name"):
        rlrp_fast.Explainer(model, rule=Epsilon(0.25), epsilon=0.3)
    with pytest.raises(TypeError, match="rule must be a preset name"):
        rlrp_fast.Explainer(model, rule=42)
    e = rlrp_fast.Explainer(model, rule=Composite(
        layer_map=[(nn.Conv2d, ZPlus()), (nn.Linear, Epsilon(0.25))]))
    assert torch.isfinite(e.explain(X).relevance).all()
    assert "ZPlus" in e.rule_name


# -- presets are composites: same maps as the rule objects they stand for --------------------
PRESETS = [
    ("rlrp", {}, RLRP()),
    ("rlrp", {"norm": "neuron", "skip": "ratio"}, RLRP(norm="neuron", skip="ratio")),
    ("lrp0", {}, Epsilon(0)),
    ("epsilon", {"epsilon": 0.25}, Epsilon(0.25)),
    ("zplus", {"stabilizer": 1e-3}, Composite([(CONVS + (nn.Linear,), ZPlus(1e-3))],
                                              base=Norm(1e-3))),
    ("gamma", {"gamma": 0.5}, Gamma(0.5)),
    ("alphabeta", {}, AlphaBeta()),
    ("zbox", {"low": -4.0, "high": 4.0}, ZBox(-4.0, 4.0)),
    ("flat", {}, Flat()),
    ("wsquare", {}, WSquare()),
    ("EpsilonPlus", {}, Composite([(CONVS, ZPlus()), (nn.Linear, Epsilon())])),
    ("EpsilonGammaBox", {"low": -4.0, "high": 4.0},
     Composite([(CONVS, Gamma()), (nn.Linear, Epsilon())], first=ZBox(-4.0, 4.0))),
    ("EpsilonPlusFlat", {}, Composite([(CONVS, ZPlus()), (nn.Linear, Epsilon())],
                                      first=Flat())),
]


@pytest.mark.parametrize("name, options, rule", PRESETS,
                         ids=[f"{n}{o}" for n, o, _ in PRESETS])
def test_presets_equal_their_rule_objects(name, options, rule):
    model = _net()
    by_name = rlrp_fast.Explainer(model, rule=name, backend="torch", **options)
    by_object = rlrp_fast.Explainer(model, rule=rule, backend="torch")
    assert by_name._rule.keeps_mass == by_object._rule.keeps_mass == (name == "rlrp")
    a, b = by_name.explain(X.double()), by_object.explain(X.double())
    torch.testing.assert_close(a.relevance, b.relevance, rtol=0, atol=0)
    assert isinstance(make_rule(name, **options), (Composite, Rule))


def test_rlrp_preset_uses_the_default_norm():
    from rlrp_fast.rules import DEFAULT_NORM
    assert make_rule("rlrp").norm == DEFAULT_NORM == RLRP().norm


# -- mixed composites against the float64 reference ------------------------------------------
def _formula(rule) -> tuple[str, dict]:
    """The reference's name for a rule object (a restatement, not shared code)."""
    if isinstance(rule, RLRP):
        return ("rlrp_neuron" if rule.norm == "neuron" else "rlrp"), {}
    if isinstance(rule, Epsilon):
        return "epsilon", {"eps": rule.epsilon}
    if isinstance(rule, Norm):
        return "norm", {"eps": rule.stabilizer}
    if isinstance(rule, ZPlus):
        return "zplus", {"stabilizer": rule.stabilizer}
    if isinstance(rule, Gamma):
        return "gamma", {"gamma": rule.gamma, "stabilizer": rule.stabilizer}
    if isinstance(rule, Flat):
        return "flat", {"stabilizer": rule.stabilizer}
    raise AssertionError(rule)


# each: (composite, the reference's assignment by step kind: conv, linear, first, other)
MIXED = {
    # R-LRP on the convs, ε on the dense layers, Norm on sums/pools/lone BNs
    "rlrp_convs": (Composite([(CONVS, RLRP(norm="layer")), (nn.Linear, Epsilon(0.25))]),
                   dict(conv=RLRP(norm="layer"), linear=Epsilon(0.25), other=Norm())),
    # flat first, z⁺ on convs, R-LRP (neuron) on dense layers and everywhere else
    "rlrp_rest": (Composite([(CONVS, ZPlus()), (nn.Linear, RLRP(norm="neuron"))],
                            first=Flat(), base=RLRP(norm="neuron")),
                  dict(conv=ZPlus(), linear=RLRP(norm="neuron"), first=Flat(),
                       other=RLRP(norm="neuron"))),
    # γ on convs, ε on dense layers, R-LRP with the paper's ratio rule at sums and on pools
    "ratio_sums": (Composite([(CONVS, Gamma(0.5)), (nn.Linear, Epsilon(0.1))],
                             base=RLRP(skip="ratio", norm="layer")),
                   dict(conv=Gamma(0.5), linear=Epsilon(0.1),
                        other=RLRP(skip="ratio", norm="layer"))),
}


def _mixed_assignment(plan, spec: dict, sums: str = "rlrp") -> dict:
    """{step index: (formula, params)} for the linear steps, from the composite's meaning."""
    out = {}
    first = next(k for k, s in enumerate(plan.steps) if isinstance(s, Affine))
    for k, step in enumerate(plan.steps):
        if isinstance(step, Affine):
            key = "first" if k == first and "first" in spec else (
                "conv" if step.conv_dims else "linear")
            out[k] = _formula(spec[key])
        elif isinstance(step, (Pool, Scale, Add)):
            formula, params = _formula(spec["other"])
            if isinstance(step, Add) and isinstance(spec["other"], RLRP):
                # sums never take the neuron form; skip="ratio" is the paper's rule there
                formula = "ratio" if spec["other"].skip == "ratio" else "rlrp"
            out[k] = (formula, params)
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("which", sorted(MIXED))
@pytest.mark.parametrize("seed", SEEDS[:16])
def test_mixed_composite_matches_reference(seed, which):
    composite, spec = MIXED[which]
    model, plan, x = _case(seed)
    fast = rlrp_fast.Explainer(model, rule=composite, backend="torch").explain(x.double())
    assert fast.vanished is None  # mixed: no mass carried apart
    ref, _ = reference_explain(plan, x, rule=_mixed_assignment(plan, spec),
                               target=fast.targets)
    err = _relative_errors(fast.relevance, ref)
    assert err.max() <= FP64_TOL, err.tolist()
    # and in float32, to float32 accuracy on the well-conditioned cases
    fast32 = rlrp_fast.Explainer(model, rule=composite, backend="torch").explain(x)
    assert torch.isfinite(fast32.relevance).all()


@pytest.mark.usefixtures("one_thread")
def test_mixed_rlrp_steps_renormalise_to_the_arriving_mass():
    """In a mixed composite an R-LRP step hands on exactly the L1 mass that arrives."""
    model, plan, x = _case(0)
    composite, spec = MIXED["rlrp_convs"]
    target = rlrp_fast.Explainer(model, rule=composite, backend="torch").explain(x).targets
    _, _, records = reference_explain(plan, x, rule=_mixed_assignment(plan, spec),
                                      target=target, trace=True)
    rlrp = [r for r in records if getattr(r, "formula", None) == "rlrp"]
    assert rlrp
    for r in rlrp:
        torch.testing.assert_close(r.r_a.abs().sum(1), r.r_z.abs().sum(1))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seed", SEEDS[:4])
def test_all_rlrp_composite_equals_the_rlrp_preset(seed):
    model, _, x = _case(seed)
    by_hand = Composite([(CONVS + (nn.Linear,), RLRP())], base=RLRP())
    a = rlrp_fast.Explainer(model, rule=by_hand, backend="torch")
    assert a._rule.keeps_mass
    b = rlrp_fast.Explainer(model, backend="torch")
    torch.testing.assert_close(a.explain(x.double()).relevance, b.explain(x.double()).relevance,
                               rtol=0, atol=0)


# -- per-layer ε ----------------------------------------------------------------------------------
def _preactivation_stds(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    stds = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: stds.__setitem__(n, o.std().item()))
             for n, m in model.named_modules() if isinstance(m, CONVS + (nn.Linear,))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return stds


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seed", SEEDS[:4])
def test_per_layer_epsilon_is_a_one_liner(seed):
    model, plan, x = _case(seed)
    std = _preactivation_stds(model, x)
    # the one-liner: ε = 0.25 · std of each layer's pre-activations
    composite = Composite(
        rule_for=lambda name, m: Epsilon(0.25 * std[name]) if name in std else None)
    fast = rlrp_fast.Explainer(model, rule=composite, backend="torch").explain(x.double())
    assignment = {}
    for k, step in enumerate(plan.steps):
        if isinstance(step, Affine):
            assignment[k] = ("epsilon", {"eps": 0.25 * std[step.module]})
        elif isinstance(step, (Pool, Scale, Add)):
            assignment[k] = ("norm", {"eps": 1e-6})
    ref, _ = reference_explain(plan, x, rule=assignment, target=fast.targets)
    assert _relative_errors(fast.relevance, ref).max() <= FP64_TOL
    uniform = rlrp_fast.Explainer(model, rule="epsilon", epsilon=0.25, backend="torch")
    assert _relative_errors(uniform.explain(x.double()).relevance, ref).max() > 1e-6


# -- the README's example runs as written --------------------------------------------------------
def test_readme_composite_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index("### Rules and composites"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})


# -- zennit parity ---------------------------------------------------------------------------------
PARITY_TOLERANCE = 1e-4  # per image, relative L1 (the bound)


@pytest.fixture(scope="module", params=["vgg16", "resnet50"])
def tv_model(request):
    from tv_models import fold_batchnorm, randomized
    return fold_batchnorm(randomized(request.param, seed=1))


@pytest.mark.parametrize("kind", ["layer_map", "special_first"])
def test_custom_composites_match_zennit(tv_model, kind):
    pytest.importorskip("zennit")
    from zennit.attribution import Gradient
    from zennit.composites import (LayerMapComposite, SpecialFirstLayerMapComposite,
                                   layer_map_base)
    from zennit.rules import Epsilon as ZEpsilon
    from zennit.rules import Flat as ZFlat
    from zennit.rules import Gamma as ZGamma
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Convolution, Linear

    canonizers = [ResNetCanonizer()] if hasattr(tv_model, "layer1") else []
    # zennit's presets put layer_map_base() (Pass on activations, Norm on sums and average
    # pools) under their own map: ours does the same for every composite
    theirs_map = layer_map_base() + [(Convolution, ZGamma(0.25)), (Linear, ZEpsilon(0.1))]
    ours_map = [(nn.Conv2d, Gamma(0.25)), (nn.Linear, Epsilon(0.1))]
    if kind == "layer_map":
        composite = LayerMapComposite(layer_map=theirs_map, canonizers=canonizers)
        ours_composite = Composite(layer_map=ours_map)
    else:
        composite = SpecialFirstLayerMapComposite(layer_map=theirs_map,
                                                  first_map=[(Linear, ZFlat())],
                                                  canonizers=canonizers)
        ours_composite = Composite(layer_map=ours_map, first=Flat())

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    ours = rlrp_fast.explain(tv_model, x, rule=ours_composite, backend="torch")
    r_out = torch.zeros_like(ours.logits).scatter_(
        1, ours.targets[:, None], ours.logits.gather(1, ours.targets[:, None]))
    with Gradient(model=tv_model, composite=composite) as attributor:
        _, theirs = attributor(x, r_out)
    assert torch.isfinite(theirs).all() and theirs.abs().sum() > 0
    err = (ours.relevance - theirs).abs().sum((1, 2, 3)) / theirs.abs().sum((1, 2, 3))
    print(f"\nparity {type(tv_model).__name__} {kind}: max relative L1 {err.max():.2e}")
    assert err.max() <= PARITY_TOLERANCE, f"{kind}: per-image relative L1 error {err.tolist()}"
    # not vacuous: the first layer's rule matters, and the map is not gradient × input
    other = Composite(layer_map=ours_map, first=Flat()) if kind == "layer_map" else \
        Composite(layer_map=ours_map)
    moved = rlrp_fast.explain(tv_model, x, rule=other, backend="torch").relevance
    assert ((moved - theirs).abs().sum() / theirs.abs().sum()) > 1e-3
    assert math.isfinite(float(err.max()))
