"""LayerNorm with σ held constant, and scaling by a parameter (ConvNeXt's layer scale): the
fast path against the float64 reference (which writes each group's Jacobian out in full)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast.capture import capture
from rlrp_fast.plan import Constant, Gate, LayerNorm
from rlrp_fast.reference import reference_explain


class Block(nn.Module):
    """A ConvNeXt block in miniature: depthwise conv, channels-last LayerNorm (module or
    functional), MLP, layer scale (a parameter or a number), residual."""

    def __init__(self, functional: bool, scale_by: str):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.norm = nn.LayerNorm(4, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
        self.layer_scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.functional, self.scale_by = functional, scale_by

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        if self.functional:
            h = F.layer_norm(h, (4,), self.norm.weight, self.norm.bias, 1e-6)
        else:
            h = self.norm(h)
        h = self.fc2(F.gelu(self.fc1(h))).permute(0, 3, 1, 2)
        h = self.layer_scale * h if self.scale_by == "parameter" else h * 0.7
        return x + h


def block_net(functional: bool, scale_by: str) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), Block(functional, scale_by),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(4),
                          nn.Linear(4, 3)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.2)
    return model


CASES = [("rlrp", {"norm": "layer"}), ("rlrp", {"norm": "neuron"}),
         ("rlrp", {"skip": "ratio"}), ("epsilon", {"epsilon": 0.1})]


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("scale_by", ["parameter", "number"])
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_layer_norm_and_layer_scale_match_the_reference(functional, scale_by, rule, options):
    model = block_net(functional, scale_by).double()
    plan = capture(model)
    kinds = [type(s) for s in plan.steps]
    assert kinds.count(LayerNorm) == 2 and Gate in kinds and Constant in kinds
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    torch.testing.assert_close(fast.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-9, atol=1e-12)


def test_layer_norm_is_the_linear_map_with_sigma_held():
    """The reference's J is the Jacobian of LayerNorm at fixed σ: J x equals the centred,
    scaled input (checked on the reference's own forward)."""
    model = block_net(False, "parameter").double()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    e = rlrp_fast.explain(model, x)
    with torch.no_grad():
        torch.testing.assert_close(e.logits, model(x))
    mass = e.logits.gather(1, e.targets[:, None]).abs().view(-1)
    torch.testing.assert_close(e.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10, atol=0)


def test_layer_scale_changes_are_refused():
    model = block_net(False, "parameter")
    explainer = rlrp_fast.Explainer(model)
    explainer.explain(torch.randn(1, 2, 5, 6))
    with torch.no_grad():
        model[1].layer_scale.mul_(2)
    with pytest.raises(rlrp_fast.StaleModelError):
        explainer.explain(torch.randn(1, 2, 5, 6))


def test_convnext_explains():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    for norm in ("layer", "neuron"):
        e = rlrp_fast.Explainer(model, norm=norm).explain(x)  # trace verification included
        assert torch.isfinite(e.relevance).all()
        mass = e.logits.double().gather(1, e.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(e.relevance.double().abs().flatten(1).sum(1), mass,
                                   rtol=1e-4, atol=0)


def test_the_safe_rerun_keeps_layer_norms_exact():
    """The rerun for out-of-range values scales each step's inputs, but not a layer norm's
    (σ = √(var + eps) does not scale with its input): a dead sample forces the rerun for the
    whole batch, and the live sample's map must not move."""
    model = block_net(False, "parameter").double()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    dead = torch.cat([x[:1], torch.zeros_like(x[:1])])  # all-zero input: relevance vanishes
    with torch.no_grad():
        model[0].bias.zero_()
    alone = rlrp_fast.explain(model, x[:1]).relevance
    both = rlrp_fast.Explainer(model).explain(dead)
    torch.testing.assert_close(both.relevance[:1], alone, rtol=1e-10, atol=1e-14)
