"""torchvision's classification models out of the box (``weights=None``): every model
explains with finite relevance, ‖relevance‖₁ = |logit| and trace verification passing.

The whole list takes ~40 minutes on a 2-core CPU: the normal run checks the smallest member
of each family; ``RLRP_ZOO=all`` checks every model (the command in the closing note)."""
import os

import pytest
import torch

import rlrp_fast

torchvision = pytest.importorskip("torchvision")

# the smallest of each family that explains (the rest share its ops)
FAMILIES = ["alexnet", "resnet18", "vgg11_bn", "densenet121", "googlenet", "squeezenet1_1",
            "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5",
            "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "vit_b_32",
            "swin_t", "swin_v2_t", "maxvit_t"]
ALL = os.environ.get("RLRP_ZOO") == "all"
NAMES = torchvision.models.list_models(module=torchvision.models) if ALL else FAMILIES


def _size(name: str) -> int:
    if name.startswith(("vit", "maxvit")):  # their image size is fixed when built
        return 224
    return 299 if name == "inception_v3" else 64


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", NAMES)
def test_model_explains(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, _size(name), _size(name))
    e = rlrp_fast.Explainer(model).explain(x)  # verification: plan logits == model's
    assert torch.isfinite(e.relevance).all()
    mass = e.logits.double().gather(1, e.targets[:, None]).abs().view(-1)
    torch.testing.assert_close(e.relevance.double().abs().flatten(1).sum(1), mass, rtol=1e-4,
                               atol=0)
