"""Normalisation layers (LayerNorm, GroupNorm, RMSNorm) with σ held constant, and scaling by a parameter (ConvNeXt's layer scale): the
fast path against the float64 reference (which writes each group's Jacobian out in full)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast.capture import capture
from rlrp_fast.plan import Constant, Gate, Normalization
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
    assert kinds.count(Normalization) == 2 and Gate in kinds and Constant in kinds
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


class GroupNormNet(nn.Module):
    """Conv → GroupNorm (module or F.group_norm, 2 groups or one per channel) → ReLU →
    conv → GroupNorm without affine → pool → head."""

    def __init__(self, functional: bool, groups: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.gn1 = nn.GroupNorm(groups, 4, eps=1e-3)
        self.gn2 = nn.GroupNorm(2, 4, affine=False)
        self.head = nn.Linear(4, 3)
        self.functional, self.groups = functional, groups

    def forward(self, x):
        h = self.conv1(x)
        if self.functional:
            h = F.group_norm(h, self.groups, self.gn1.weight, self.gn1.bias, eps=1e-3)
        else:
            h = self.gn1(h)
        h = self.gn2(self.conv2(torch.relu(h)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class RMSNormNet(nn.Module):
    """Tokens (N, L, 3) → Linear → RMSNorm (module or F.rms_norm; eps given or torch's
    default) → GELU → RMSNorm over the last two dims without a weight → mean → head."""

    def __init__(self, functional: bool, eps: float | None):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.norm1 = nn.RMSNorm(4, eps=eps)
        self.norm2 = nn.RMSNorm((5, 4), elementwise_affine=False)
        self.head = nn.Linear(4, 2)
        self.functional, self.eps = functional, eps

    def forward(self, x):
        h = self.fc(x)
        if self.functional:
            h = F.rms_norm(h, (4,), self.norm1.weight, self.eps)
        else:
            h = self.norm1(h)
        return self.head(self.norm2(F.gelu(h)).mean(1))


def _randomised(model: nn.Module) -> nn.Module:
    """Affine parameters away from their (1, 0) initialisation, which would hide a wrong γ."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.RMSNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.normal_(1, 0.3)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0, 0.2)
    return model.double().eval()


NORM_MODELS = {
    "group-module-2": lambda: GroupNormNet(False, 2), "group-functional-2": lambda: GroupNormNet(True, 2),
    "group-module-4": lambda: GroupNormNet(False, 4), "group-module-1": lambda: GroupNormNet(False, 1),
    "rms-module": lambda: RMSNormNet(False, 1e-4), "rms-functional": lambda: RMSNormNet(True, 1e-4),
    "rms-default-eps": lambda: RMSNormNet(False, None),
    "rms-functional-default-eps": lambda: RMSNormNet(True, None),
}


def _norm_case(name: str):
    torch.manual_seed(5)
    model = _randomised(NORM_MODELS[name]())
    shape = (3, 2, 5, 6) if name.startswith("group") else (3, 5, 3)
    return model, torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("name", list(NORM_MODELS))
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_group_and_rms_norms_match_the_reference(name, rule, options):
    model, x = _norm_case(name)
    plan = capture(model)
    kinds = [s.kind for s in plan.steps if isinstance(s, Normalization)]
    assert kinds == [name.split("-")[0]] * 2
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-9, atol=1e-12)
    assert (fast.relevance != 0).any()
    if rule == "rlrp":  # no residual here: ratio is linear too, and every step keeps the mass
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10,
                                   atol=0)


@pytest.mark.parametrize("norm", ["layer", "neuron"])
def test_group_norm_contributions_sum_to_the_centred_output(norm):
    """On the reference's own matrix: ``Σ_i c_ij = (z_j − β_j) R_j`` (layer reading), or
    ``Σ_i |c_ij| = |R_j|`` (neuron reading, where ``s_j > 0``): σ is held, the centring stays."""
    from rlrp_fast.reference import _normalization_backward, _normalization_parts
    model, x = _norm_case("group-module-2")
    step = next(s for s in capture(model).steps if isinstance(s, Normalization))
    h = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    r = torch.randn_like(h)
    flat, same, n, mean, sigma, gamma, beta = _normalization_parts(step, h)
    eye = torch.eye(flat.shape[1], dtype=torch.float64)
    jac = (gamma / sigma)[:, :, None] * (eye - same / n[:, None])
    c = flat[:, None, :] * jac * r.reshape(2, -1)[:, :, None]
    z = F.group_norm(h, 2, step.weight, step.bias, step.eps).reshape(2, -1)
    torch.testing.assert_close(c.sum(2), (z - beta) * r.reshape(2, -1))
    out = _normalization_backward(step, r, h, "normalization", {"norm": norm})
    torch.testing.assert_close(out.abs().sum((1, 2, 3)), r.abs().sum((1, 2, 3)))


def test_sigma_is_held_constant_not_differentiated():
    """R-LRP at a GroupNorm without affine, written independently: ``x ⊙ (Jᵀ R)`` with
    ``J = (I − 11ᵀ/n)/σ``, renormalised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.GroupNorm(1, 3, affine=False), nn.Flatten(), nn.Linear(12, 2))
    model = model.double().eval()
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    plan = capture(model)
    e = rlrp_fast.Explainer(model, backend="torch", norm="layer").explain(x)
    h = model[0](x).flatten(1)
    r = e.logits.gather(1, e.targets[:, None]) * model[2].weight[e.targets]
    r = h * r  # the Linear's own R-LRP step (renormalised away below)
    sigma = x.var(correction=0).add(1e-5).sqrt()
    u = (r / sigma).view(1, 3, 2, 2)
    want = x * (u - u.mean())
    want = want * e.relevance.abs().sum() / want.abs().sum()
    torch.testing.assert_close(e.relevance, want)
    torch.testing.assert_close(reference_explain(plan, x)[0], want)


class WrittenLayerNorm(nn.Module):
    """Layer norms written out in ``forward``: ``how`` picks the spelling."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.weight, self.bias = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.eps = 1e-6

    def forward(self, x):
        if self.how == "convnext":  # the original ConvNeXt's channels-first LayerNorm
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + self.eps)
            return self.weight[:, None, None] * x + self.bias[:, None, None]
        if self.how == "rsqrt":  # over the last dim, var(correction=0), no affine
            h = x.permute(0, 2, 3, 1)
            h = (h - torch.mean(h, dim=-1, keepdim=True)) * torch.rsqrt(
                h.var(-1, keepdim=True, correction=0) + 1e-5)
            return h.permute(0, 3, 1, 2)
        if self.how == "square":  # (x − μ)·(x − μ), eps first, weight only, two dims
            u = x.mean((2, 3), keepdim=True)
            c = x - u
            return (c / (1e-5 + (c * c).mean((2, 3), keepdim=True)).sqrt()) * self.weight.view(4, 1, 1)
        if self.how == "unbiased":  # the sample variance: not LayerNorm's
            u = x.mean(1, keepdim=True)
            return (x - u) / torch.sqrt(x.var(1, keepdim=True) + self.eps)
        if self.how == "mean_reused":  # μ is read again: not only a normalisation
            u = x.mean(1, keepdim=True)
            return (x - u) / torch.sqrt((x - u).pow(2).mean(1, keepdim=True) + self.eps) + u
        raise AssertionError(self.how)


def written_net(how: str) -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), WrittenLayerNorm(how), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()


@pytest.mark.parametrize("how", ["convnext", "rsqrt", "square"])
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_a_layer_norm_written_out_is_one_normalization_step(how, rule, options):
    model = written_net(how)
    plan = capture(model)
    (step,) = [s for s in plan.steps if isinstance(s, Normalization)]
    assert step.kind == "layer" and [type(s).__name__ for s in plan.steps].count("Gate") == 0
    assert (step.weight is None) == (how == "rsqrt") and (step.bias is None) == (how != "convnext")
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-9, atol=1e-12)


def test_a_written_out_layer_norm_equals_the_module():
    """Written out over the channels, it is the same step as nn.LayerNorm over channels-last
    input (what torchvision's ConvNeXt does): same maps."""
    written = written_net("convnext")
    norm = written[1]

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(4, eps=norm.eps)
            with torch.no_grad():
                self.ln.weight.copy_(norm.weight)
                self.ln.bias.copy_(norm.bias)

        def forward(self, x):
            return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    module = nn.Sequential(written[0], ChannelsLast(), *written[2:]).double().eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    for norm_kind in ("layer", "neuron"):
        a = rlrp_fast.Explainer(written, norm=norm_kind).explain(x)
        b = rlrp_fast.Explainer(module, norm=norm_kind).explain(x)
        torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("how", ["unbiased", "mean_reused"])
def test_a_normalisation_that_is_not_layer_norm_is_refused_by_name(how):
    with pytest.raises(rlrp_fast.UnsupportedModelError, match=r"in module '1' \(WrittenLayerNorm\)"):
        rlrp_fast.Explainer(written_net(how))


def test_several_targets_with_a_layer_scale():
    """K targets per pass repeat each sample's tape rows; a layer scale (a constant gate,
    no batch dim) must not be repeated (it raised a shape error before)."""
    model = block_net(False, "parameter").double()
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    explainer = rlrp_fast.Explainer(model, backend="torch")
    multi = explainer.explain(x, top_k=2)
    for k in range(2):
        single = explainer.explain(x, target=multi.targets[:, k])
        torch.testing.assert_close(multi.relevance[:, k], single.relevance, rtol=1e-10,
                                   atol=1e-14)
