"""timm models (random weights, eval) explain, and the ops timm writes that fx traces into:
``BatchNormAct2d`` (``F.batch_norm`` + activation), timm's ``Linear`` (``F.linear``), and a
forward with optional arguments (``attn_mask=None``). The zoo tests skip without timm (a
test-only dependency: ``pip install timm``)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast.capture import capture
from rlrp_fast.plan import Affine, Scale
from rlrp_fast.reference import reference_explain

# (name, input size): ViT and DeiT only take their 224×224
TIMM_MODELS = [("vit_tiny_patch16_224", 224), ("deit_tiny_patch16_224", 224),
               ("convnext_tiny", 64), ("efficientnet_b0", 64), ("mobilenetv3_large_100", 64),
               ("resnet50", 64), ("regnety_008", 64)]


@pytest.mark.parametrize("name,size", TIMM_MODELS, ids=[n for n, _ in TIMM_MODELS])
def test_timm_model_explains_and_conserves(name, size):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    e = rlrp_fast.Explainer(model).explain(torch.randn(1, 3, size, size))  # trace verified
    assert torch.isfinite(e.relevance).all()
    mass = e.logits.double().gather(1, e.targets[:, None]).abs().view(-1)
    assert (mass > 0).all()
    torch.testing.assert_close(e.relevance.double().abs().flatten(1).sum(1), mass, rtol=1e-4,
                               atol=0)


class FunctionalLayers(nn.Module):
    """What timm's layers trace into: F.batch_norm with the module's running statistics
    (training=False), F.linear on its own parameters, and optional forward arguments."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn, self.lone_bn = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for bn in (self.bn, self.lone_bn):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2)
                bn.weight.normal_(1, 0.3)
                bn.bias.normal_(0, 0.3)

    def forward(self, x, attn_mask=None, pre_logits: bool = False, scale: float = 1.0):
        h = F.batch_norm(self.conv(x), self.bn.running_mean, self.bn.running_var,
                         self.bn.weight, self.bn.bias, False, 0.1, self.bn.eps)
        h = torch.relu(h)
        h = F.batch_norm(h, self.lone_bn.running_mean, self.lone_bn.running_var, None, None,
                         False, 0.1, 1e-3)
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        if attn_mask is not None:
            h = h + attn_mask
        if pre_logits:
            return h
        return F.linear(h, self.fc.weight, self.fc.bias)


@pytest.mark.parametrize("rule,options", [("rlrp", {"norm": "layer"}),
                                          ("rlrp", {"norm": "neuron"}),
                                          ("EpsilonPlus", {})])
def test_functional_batch_norm_and_linear_match_the_reference(rule, options):
    torch.manual_seed(1)
    model = FunctionalLayers().double().eval()
    plan = capture(model)
    kinds = [type(s) for s in plan.steps]
    assert kinds.count(Affine) == 2 and kinds.count(Scale) == 1  # the first BN is folded
    (conv, linear) = [s for s in plan.steps if isinstance(s, Affine)]
    assert conv.channel_scale is not None and linear.module == "fc"  # the weight's owner
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-9, atol=1e-12)


def test_batch_statistics_are_refused_by_name():
    class Training(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return F.batch_norm(x, self.bn.running_mean, self.bn.running_var, training=True)

    with pytest.raises(rlrp_fast.UnsupportedModelError, match="batch statistics"):
        rlrp_fast.Explainer(Training().eval())
