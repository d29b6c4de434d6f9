"""Parity with zennit 0.5.1 on torchvision VGG16 and ResNet50: the test of the engine's graph
handling (forks, residual adds, max-pool routing, adaptive pooling, flatten, first layer).

Like is compared with like (docs/RLRP_SPEC.md, "Parity set-up"): BatchNorm pre-folded, biases inside the convs and
random, zennit's ResNet canonizer for the residual sums."""
import pytest
import torch
import torch.nn as nn
from tv_models import fold_batchnorm, randomized

import rlrp_fast

zennit = pytest.importorskip("zennit")
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import (EpsilonGammaBox, EpsilonPlus, LayerMapComposite,  # noqa: E402
                               layer_map_base)
from zennit.rules import Epsilon  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402

TOLERANCE = 1e-4  # per image, relative L1 (the bound)


@pytest.fixture(scope="module", params=["vgg16", "resnet50"])
def model(request):
    return fold_batchnorm(randomized(request.param, seed=1))


def _zennit_composite(rule: str, canonizers):
    if rule == "epsilon":
        return LayerMapComposite(layer_map=layer_map_base() + [
            ((nn.Conv2d, nn.Linear), Epsilon(epsilon=0.25))], canonizers=canonizers)
    if rule == "EpsilonPlus":
        return EpsilonPlus(canonizers=canonizers)
    return EpsilonGammaBox(low=-3.0, high=3.0, canonizers=canonizers)


OPTIONS = {"epsilon": {"epsilon": 0.25}, "EpsilonPlus": {},
           "EpsilonGammaBox": {"low": -3.0, "high": 3.0}}


@pytest.mark.parametrize("rule", ["epsilon", "EpsilonPlus", "EpsilonGammaBox"])
def test_matches_zennit(model, rule):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    ours = rlrp_fast.explain(model, x, rule=rule, backend="torch", **OPTIONS[rule])

    is_resnet = hasattr(model, "layer1")
    composite = _zennit_composite(rule, [ResNetCanonizer()] if is_resnet else [])
    r_out = torch.zeros_like(ours.logits).scatter_(
        1, ours.targets[:, None], ours.logits.gather(1, ours.targets[:, None]))
    with Gradient(model=model, composite=composite) as attributor:
        _, theirs = attributor(x, r_out)

    assert torch.isfinite(theirs).all() and theirs.abs().sum() > 0
    err = (ours.relevance - theirs).abs().sum((1, 2, 3)) / theirs.abs().sum((1, 2, 3))
    assert err.max() <= TOLERANCE, f"{rule}: per-image relative L1 error {err.tolist()}"
    # guard against a vacuous pass: the rule differs from gradient × input on these models
    gxi = rlrp_fast.explain(model, x, rule="gradient_x_input").relevance
    assert ((gxi - theirs).abs().sum() / theirs.abs().sum()) > 1e-2
