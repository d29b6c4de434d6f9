"""The evaluation's model zoo: architectures, split, shipped weights, reproducible training."""
import pytest
import torch
import torch.nn as nn

import rlrp_fast
from rlrp_fast import digits, zoo


@pytest.mark.parametrize("arch", list(zoo.ARCHS))
def test_architectures_trace_and_explain(arch):
    model = zoo.build(arch)
    x = torch.rand(2, 1, 32, 32)
    assert model(x).shape == (2, 10)
    for rule in ("rlrp", "lrp0", "EpsilonPlus"):
        r = rlrp_fast.Explainer(model, rule=rule).explain(x).relevance
        assert r.shape == x.shape and torch.isfinite(r).all()
    torch.fx.symbolic_trace(model)


def test_resnet_has_a_strided_projection_and_residual_adds():
    model = zoo.SmallResNet()
    proj = [b.downsample for b in (model.layer1, model.layer2, model.layer3)
            if b.downsample is not None]
    assert len(proj) == 1
    conv = proj[0][0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    graph = torch.fx.symbolic_trace(model).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 3
    vgg = zoo.VGGBN()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 6


def test_eval_split_is_larger_and_the_demo_split_is_unchanged():
    xtr, ytr, xte, yte = zoo.load_eval_split()
    assert len(xte) == 540 and len(xtr) == 1257
    assert xte.shape[1:] == (1, 32, 32)
    assert len(digits.load_digits_split()[2]) == 360


@pytest.mark.parametrize("arch", list(zoo.ARCHS))
def test_shipped_weights_are_small_and_accurate(arch):
    path = zoo.weights_path(arch)
    assert path.stat().st_size < 1_000_000
    model = zoo.load_pretrained(arch)
    assert not model.training
    _, _, xte, yte = zoo.load_eval_split()
    assert digits.evaluate_accuracy(model, xte, yte) > 0.95


def test_training_is_seeded_and_reproducible():
    a, acc_a = zoo.train("resnet", seed=1, epochs=1)
    b, acc_b = zoo.train("resnet", seed=1, epochs=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert acc_a == acc_b
    assert not torch.equal(sa["fc.weight"], zoo.SmallResNet().state_dict()["fc.weight"])


def test_unknown_arch_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture"):
        zoo.build("alexnet")
    with pytest.raises(FileNotFoundError, match="python -m rlrp_fast.zoo"):
        zoo.load_pretrained("resnet", tmp_path / "nope.pt")


def test_modern_architectures_have_attention_and_gates():
    vit = zoo.TinyViT()
    attns = [m for m in vit.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attns) == 2 and all(a.batch_first for a in attns)
    assert vit.cls_token.shape == (1, 1, 32) and vit.pos_embed.shape == (1, 65, 32)
    assert any(isinstance(m, nn.GELU) for m in vit.modules())
    se = zoo.SEConvNet()
    assert sum(isinstance(m, nn.Sigmoid) for m in se.modules()) == 2
    depthwise = [m for m in se.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [m.groups for m in depthwise] == [16, 32]
    graph = torch.fx.symbolic_trace(se).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 2
    assert set(zoo.CLASSIC_ARCHS) | set(zoo.MODERN_ARCHS) == set(zoo.ARCHS)


@pytest.mark.parametrize("norm", ["layer", "neuron"])
@pytest.mark.parametrize("arch", list(zoo.MODERN_ARCHS))
def test_shipped_modern_models_explain_verified_and_conserve(arch, norm):
    """Trace verification (on by default) passes on the trained weights and R-LRP passes on
    exactly |logit| to the input (||R||_1 = |logit|), under both norms."""
    model = zoo.load_pretrained(arch)
    _, _, xte, _ = zoo.load_eval_split()
    x = xte[:4]
    e = rlrp_fast.Explainer(model, rule="rlrp", norm=norm, verify=True).explain(x)
    torch.testing.assert_close(e.logits, model(x), rtol=1e-5, atol=1e-5)
    logit = e.logits.gather(1, e.targets[:, None])[:, 0].abs()
    l1 = e.relevance.abs().flatten(1).sum(1)
    torch.testing.assert_close(l1, logit, rtol=1e-4, atol=1e-6)
    assert (e.relevance != 0).any(dim=(1, 2, 3)).all()
