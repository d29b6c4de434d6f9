"""Properties of the fast path that docs/RLRP_SPEC.md asks for, each checked against something
independent: autograd, a hand-built model, the model's own forward, or the same call in
another form."""
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tv_models import randomized

import rlrp_fast


def l1(t: torch.Tensor) -> torch.Tensor:
    return t.abs().flatten(1).sum(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample relative L1 error of ``a`` against ``b``."""
    return l1(a.double() - b.double()) / l1(b.double())


def chain_cnn(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    """Linear ops separated by ReLUs (max-pool routes): the chain of the spec's identity.
    ``batchnorm`` puts a BatchNorm (random statistics) after each of the first three layers."""
    torch.manual_seed(seed)
    bn = (lambda n, dims=2: nn.BatchNorm2d(n) if dims == 2 else nn.BatchNorm1d(n)) \
        if batchnorm else (lambda n, dims=2: nn.Identity())
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), bn(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), bn(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), bn(16, 1), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.1)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


class _ReluValueGrad(torch.autograd.Function):
    """ReLU whose derivative 1[z > 0] is replaced by relu(z) (the spec's chain identity)."""

    @staticmethod
    def forward(ctx, z):
        out = z.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * out


def _autograd_raw_rlrp(model: nn.Sequential, x: torch.Tensor, r_out: torch.Tensor):
    x = x.clone().requires_grad_(True)
    h = x
    for layer in model:
        h = _ReluValueGrad.apply(h) if isinstance(layer, nn.ReLU) else layer(h)
    (grad,) = torch.autograd.grad(h, x, r_out)
    return x.detach() * grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chain_equals_autograd_identity(seed):
    """On a chain, R-LRP = gradient × input with relu'(z) replaced by relu(z), up to a
    positive per-sample scale (the renormalisation)."""
    model = chain_cnn(seed).double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    e = rlrp_fast.explain(model, x)
    raw = _autograd_raw_rlrp(model, x, torch.zeros_like(e.logits).scatter_(
        1, e.targets[:, None], e.logits.gather(1, e.targets[:, None])))
    scale = l1(e.relevance) / l1(raw)
    assert (scale > 0).all()
    assert rel_err(e.relevance, raw * scale.view(-1, 1, 1, 1)).max() < 1e-12
    # the identity is not gradient × input itself
    gxi = rlrp_fast.explain(model, x, rule="gradient_x_input").relevance
    assert rel_err(gxi * (l1(e.relevance) / l1(gxi)).view(-1, 1, 1, 1), e.relevance).min() > 1e-2


def test_l1_conserved_end_to_end_on_a_chain():
    e = rlrp_fast.explain(chain_cnn(), torch.randn(4, 3, 16, 16))
    target_logit = e.logits.gather(1, e.targets[:, None]).squeeze(1).abs()
    torch.testing.assert_close(l1(e.relevance), target_logit, rtol=1e-5, atol=0)


@pytest.mark.parametrize("rule, options", [
    ("rlrp", {}), ("rlrp", {"skip": "ratio"}), ("epsilon", {"epsilon": 0.1}),
    ("EpsilonPlus", {}), ("EpsilonGammaBox", {"low": -3.0, "high": 3.0}), ("alphabeta", {})])
def test_positive_homogeneity(rule, options):
    # float64, so that the check sees the rule's algebra and not float32 cancellation
    model = randomized("resnet18", seed=3).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    explainer = rlrp_fast.Explainer(model, rule=rule, **options)
    r_out = torch.randn(2, 1000, dtype=torch.float64)
    base = explainer.explain(x, output_relevance=r_out).relevance
    scaled = explainer.explain(x, output_relevance=7.5 * r_out).relevance
    assert rel_err(scaled, 7.5 * base).max() < 1e-10


@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
@pytest.mark.parametrize("skip", ["linear", "ratio"])
def test_batch_independence(name, skip):
    """A sample's map is the same alone and inside any batch (no statistic is shared)."""
    model = randomized(name, seed=4)
    x = torch.randn(5, 3, 32, 32)
    explainer = rlrp_fast.Explainer(model, skip=skip)
    batch = explainer.explain(x).relevance
    for i in (0, 3):
        alone = explainer.explain(x[i:i + 1]).relevance
        assert rel_err(alone, batch[i:i + 1]).max() < 1e-5
    # a batch that differs elsewhere does not move sample 0
    other = torch.cat([x[:1], 100 * torch.randn(2, 3, 32, 32)])
    assert rel_err(explainer.explain(other).relevance[:1], batch[:1]).max() < 1e-5


def _near_zero_model(logit_bias: float) -> nn.Module:
    """Hidden neuron 0 has pre-activation exactly 0 on X_NEAR_ZERO; the target logit is
    ``logit_bias`` (0, or ±1e-30)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, -1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0]]))
        model[0].bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
        model[2].weight.copy_(torch.tensor([[1.0, 2.0, -1.0], [1.0, 1.0, 1.0]]))
        model[2].bias.copy_(torch.tensor([logit_bias, 0.0]))
    return model


X_NEAR_ZERO = torch.tensor([[1.0, 2.0, 3.0, 4.0]])


@pytest.mark.parametrize("logit_bias", [0.0, 1e-30, -1e-30])
def test_no_blow_up_where_lrp0_blows_up(logit_bias):
    model = _near_zero_model(logit_bias)
    one_hot = torch.tensor([[1.0, 0.0]])
    lrp0 = rlrp_fast.explain(model, X_NEAR_ZERO, rule="lrp0", output_relevance=one_hot)
    assert lrp0.logits[0, 0].item() == torch.tensor(logit_bias).item()  # float32 value
    assert (not torch.isfinite(lrp0.relevance).all()) or lrp0.relevance.abs().max() > 1e20
    ours = rlrp_fast.explain(model, X_NEAR_ZERO, output_relevance=one_hot).relevance
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(l1(ours), torch.tensor([1.0]))


def test_ratio_skip_is_zero_where_the_sum_is_exactly_zero():

    class Opposite(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.a(x) + self.b(x))

    model = Opposite().eval()
    with torch.no_grad():
        model.b.weight.copy_(-model.a.weight)
        model.b.bias.copy_(-model.a.bias)
    x = torch.randn(2, 3)
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ratio = rlrp_fast.explain(model, x, skip="ratio", output_relevance=one_hot).relevance
    assert torch.equal(ratio, torch.zeros_like(ratio))
    linear = rlrp_fast.explain(model, x, output_relevance=one_hot).relevance
    assert torch.isfinite(linear).all()


def _state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks),
              dict(m._backward_hooks)) for m in model.modules()],
            [(p.requires_grad, p.grad) for p in model.parameters()])


@pytest.mark.parametrize("rule, options", [
    ("rlrp", {}), ("EpsilonGammaBox", {"low": -3.0, "high": 3.0}), ("gradient_x_input", {})])
def test_model_unchanged(rule, options):
    model = randomized("resnet18", seed=5)
    before = _state(model)
    rlrp_fast.explain(model, torch.randn(2, 3, 32, 32), rule=rule, **options)
    after = _state(model)
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1] == after[1]
    assert before[2] == after[2]


def test_rlrp_keeps_no_copy_of_the_weights():
    """BatchNorm is folded on the fly: every weight the explainer holds for the forward and
    for R-LRP is the model's own tensor, not a scaled copy (ResNet50: 93 MB)."""
    model = randomized("resnet18", seed=4)
    explainer = rlrp_fast.Explainer(model)
    own = {p.data_ptr() for p in model.parameters()}
    held = [w for w, _, _ in explainer._weights[torch.float32].values()]
    held += [p.weight for p in explainer._propagators[torch.float32] if hasattr(p, "weight")]
    assert len(held) == 2 * 21  # 20 convs and the fc, each for the forward and R-LRP
    assert all(w.data_ptr() in own for w in held)
    # the classic rules do keep folded weights: the check above can fail
    classic = rlrp_fast.Explainer(model, rule="epsilon")
    assert not all(p.weight.data_ptr() in own for p in classic._propagators[torch.float32]
                   if hasattr(p, "weight"))


def test_thread_safety():
    model = randomized("resnet18", seed=6)
    explainer = rlrp_fast.Explainer(model)
    batches = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    serial = [explainer.explain(b).relevance for b in batches]
    results = [None] * 4

    def work(i):
        for _ in range(3):
            results[i] = explainer.explain(batches[i]).relevance

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        assert rel_err(got, want).max() < 1e-6


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.15), (torch.float16, 0.05)])
def test_low_precision_inputs(dtype, tolerance, batchnorm):
    """bfloat16/float16 forwards with float32 relevance stay close to the float32 map (the
    tolerance is the forward's rounding, which moves ReLU gates and max-pool winners)."""
    model = chain_cnn(7, batchnorm)
    x = torch.rand(4, 3, 16, 16)
    explainer = rlrp_fast.Explainer(model)
    full = explainer.explain(x)
    low = explainer.explain(x.to(dtype), target=full.targets)
    assert low.relevance.dtype == torch.float32 and low.logits.dtype == dtype
    assert torch.isfinite(low.relevance).all()
    assert rel_err(low.relevance, full.relevance).max() < tolerance


def test_float64_input_gives_float64_relevance():
    model = chain_cnn(8)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    e = rlrp_fast.explain(model, x)
    assert e.relevance.dtype == torch.float64
    e32 = rlrp_fast.explain(model, x.float(), target=e.targets)
    assert rel_err(e32.relevance, e.relevance).max() < 1e-5


@pytest.mark.parametrize("name", ["vgg11", "vgg16", "vgg19", "vgg16_bn", "resnet18",
                                  "resnet34", "resnet50"])
def test_torchvision_models_out_of_the_box(name):
    model = randomized(name, seed=9)
    x = torch.randn(2, 3, 32, 32)
    e = rlrp_fast.explain(model, x)
    with torch.no_grad():
        torch.testing.assert_close(e.logits, model(x), rtol=1e-4, atol=1e-4)
    assert e.relevance.shape == x.shape and torch.isfinite(e.relevance).all()
    target = e.logits.gather(1, e.targets[:, None]).squeeze(1).abs()
    # every op and every fork keeps ‖R‖₁, chains (VGG) and residual nets alike
    torch.testing.assert_close(l1(e.relevance), target, rtol=1e-4, atol=0)


class FunctionalNet(nn.Module):
    """Functional forms of the supported ops, as people write them in forward()."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8 * 2 * 2 + 8, 3)

    def forward(self, x):
        a = F.relu(self.c1(x), inplace=True)
        b = torch.relu(self.c2(x))
        h = torch.cat([a, b], dim=1)
        h = F.max_pool2d(h, 2)
        pooled = F.adaptive_avg_pool2d(h, 2)
        flat = pooled.view(pooled.size(0), -1)
        mean = h.permute(0, 2, 3, 1).mean(dim=(1, 2))
        return self.fc(torch.cat([flat, mean], 1))


def test_functional_forms_trace_and_match_forward():
    model = FunctionalNet().eval()
    x = torch.randn(3, 3, 8, 8)
    e = rlrp_fast.explain(model, x)
    with torch.no_grad():
        torch.testing.assert_close(e.logits, model(x))
    assert torch.isfinite(e.relevance).all() and (l1(e.relevance) > 0).all()
