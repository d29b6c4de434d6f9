"""The whole explainer on CUDA: ``backend="auto"`` (the fused Triton path) equals the plain
PyTorch backend on torchvision VGG16 and ResNet50. Skipped without a GPU; run by
bench/gpu_check.sh on a lent H100/H200."""
import os

import pytest
import torch
from tv_models import randomized

import rlrp_fast

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs CUDA with compiled Triton kernels (TRITON_INTERPRET=0)"),
    pytest.mark.usefixtures("no_tf32"),  # TF32 would put the torch backend itself ~1e-3 off
]


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().flatten(1).sum(1)
            / b.double().abs().flatten(1).sum(1))


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
@pytest.mark.parametrize("rule, options", [("rlrp", {}), ("rlrp", {"skip": "ratio"}),
                                           ("epsilon", {"epsilon": 0.25}), ("EpsilonPlus", {})])
def test_triton_equals_torch_on_cuda(name, rule, options):
    model = randomized(name, seed=1).cuda()
    x = torch.randn(3, 3, 64, 64, device="cuda")
    fused = rlrp_fast.Explainer(model, rule=rule, backend="auto", **options)
    assert fused.backend == "triton"
    plain = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options)
    got, want = fused.explain(x), plain.explain(x)
    assert torch.equal(got.targets, want.targets)
    assert _rel_err(got.relevance, want.relevance).max() <= 1e-4


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.15), (torch.float16, 0.03)])
def test_low_precision_on_cuda(dtype, tolerance):
    model = randomized("resnet50", seed=2).cuda()
    x = torch.rand(2, 3, 64, 64, device="cuda")
    explainer = rlrp_fast.Explainer(model)
    full = explainer.explain(x)
    low = explainer.explain(x.to(dtype), target=full.targets)
    assert torch.isfinite(low.relevance).all()
    assert _rel_err(low.relevance, full.relevance).max() < tolerance
