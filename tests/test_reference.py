"""The float64 reference (``rlrp_fast.reference``) held to docs/RLRP_SPEC.md and to independent truths.

- Its explicit matrices are the Jacobians of PyTorch's own convolutions, pools and means.
- Its forward equals the model's own float64 forward (this also checks BatchNorm folding).
- On every linear op, ``Σ_i c_ij = (z_j − b_j)·R_j`` (R-LRP); ``‖R_a‖₁ = ‖R_z‖₁`` on every
  linear op and routing op (signed sums where routing may add up several values).
- Positive homogeneity and batch independence, for every rule.
- On chains, raw R-LRP is gradient × input with each linear op's input multiplying the
  gradient (docs/RLRP_SPEC.md, "What is tested"): computed with autograd, independently.
- The classic rules and composites equal zennit 0.5.1's on small chains.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_fast_vs_reference import RULE_CASES, RULE_IDS, SEEDS, _case

from rlrp_fast.capture import capture
from rlrp_fast.reference import (LinearRecord, RoutingRecord, reference_explain,
                                 reference_forward)

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


def _records(model: nn.Module, x: torch.Tensor, rule: str = "rlrp", **options):
    relevance, logits, records = reference_explain(capture(model), x, rule=rule, trace=True,
                                                   **options)
    return relevance, logits, records


def _l1(t: torch.Tensor) -> torch.Tensor:
    return t.abs().flatten(1).sum(1)


# =============================================================================================
# The explicit matrices are the maps PyTorch computes
# =============================================================================================
CONV_GEOMETRIES = [
    # dims, c_in, c_out, kernel, stride, padding, dilation, groups, spatial
    (1, 2, 3, 3, 1, 1, 1, 1, (11,)),
    (1, 4, 2, 5, 2, 2, 2, 2, (13,)),
    (2, 3, 4, 3, 2, 1, 1, 1, (7, 9)),
    (2, 4, 6, 5, 1, 2, 2, 2, (9, 8)),
    (2, 2, 2, 1, 2, 0, 1, 2, (7, 7)),
    (2, 3, 2, (3, 5), (2, 1), (0, 2), (2, 1), 1, (8, 9)),
    (3, 2, 2, 3, 2, 1, 1, 1, (4, 5, 6)),
]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_conv_matrix_is_the_jacobian_of_the_convolution(geometry):
    """The patch-built matrix M of a ConvNd equals d conv(a) / d a (and z = M a + b)."""
    dims, c_in, c_out, k, s, p, d, g, spatial = geometry
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](
        c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(1, 2)).double()
    out_numel = conv(torch.zeros(1, c_in, *spatial, dtype=D)).numel()
    model[2] = nn.Linear(out_numel, 2).double()
    x = torch.randn(2, c_in, *spatial, dtype=D)
    _, _, records = _records(model.eval(), x)
    (rec,) = [r for r in records if isinstance(r, LinearRecord) and r.kind == "Affine"
              and r.matrix.shape[1] == x[0].numel()]
    jacobian = torch.autograd.functional.jacobian(
        lambda a: conv(a.view(1, c_in, *spatial)).reshape(-1), x[0].reshape(-1))
    torch.testing.assert_close(rec.matrix, jacobian, rtol=0, atol=1e-14)
    torch.testing.assert_close(rec.z, conv(x).flatten(1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(rec.bias, conv.bias.repeat_interleave(out_numel // c_out))


POOLS = [
    nn.AvgPool1d(3, stride=2, padding=1),
    nn.AvgPool1d(2, stride=1, ceil_mode=True),
    nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
    nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=True, ceil_mode=True),
    nn.AvgPool2d((2, 3), stride=(2, 2), ceil_mode=True, count_include_pad=False),
    nn.AvgPool2d(3, stride=2, padding=1, divisor_override=5),
    nn.AvgPool3d(2, stride=1, padding=1, count_include_pad=False),
    nn.AdaptiveAvgPool1d(4),
    nn.AdaptiveAvgPool2d((3, 2)),
    nn.AdaptiveAvgPool2d((None, 4)),
    nn.AdaptiveAvgPool3d((2, 3, 1)),
]


@pytest.mark.parametrize("pool", POOLS, ids=[repr(p) for p in POOLS])
def test_pool_matrix_is_the_jacobian_of_the_pool(pool):
    """The averaging matrix of every pool variant equals d pool(a) / d a."""
    dims = 1 if "1d" in type(pool).__name__ else 3 if "3d" in type(pool).__name__ else 2
    spatial = {1: (11,), 2: (7, 9), 3: (4, 5, 5)}[dims]
    x = torch.randn(2, 2, *spatial, dtype=D)
    out_numel = pool(x[:1]).numel()
    model = nn.Sequential(pool, nn.Flatten(), nn.Linear(out_numel, 2)).double().eval()
    _, _, records = _records(model, x)
    (rec,) = [r for r in records if r.kind == "Pool"]
    jacobian = torch.autograd.functional.jacobian(
        lambda a: pool(a.view(1, 2, *spatial)).reshape(-1), x[0].reshape(-1))
    torch.testing.assert_close(rec.matrix, jacobian, rtol=0, atol=1e-15)


class _Mean(nn.Module):
    def __init__(self, dims, keepdim):
        super().__init__()
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x):
        return x.mean(dim=self.dims, keepdim=self.keepdim).flatten(1)


@pytest.mark.parametrize("dims,keepdim", [((2, 3), False), ((-1,), True), ((1, 3), False)])
def test_mean_matrix_is_the_jacobian_of_the_mean(dims, keepdim):
    x = torch.randn(2, 3, 4, 5, dtype=D)
    mean = _Mean(dims, keepdim)
    model = nn.Sequential(mean, nn.Linear(mean(x[:1]).numel(), 2)).double().eval()
    _, _, records = _records(model, x)
    (rec,) = [r for r in records if r.kind == "Pool"]
    jacobian = torch.autograd.functional.jacobian(
        lambda a: mean(a.view(1, 3, 4, 5)).reshape(-1), x[0].reshape(-1))
    torch.testing.assert_close(rec.matrix, jacobian, rtol=0, atol=1e-15)


def test_linear_on_a_3d_input_acts_on_the_last_dim():
    lin = nn.Linear(5, 3).double()
    model = nn.Sequential(lin, nn.Flatten(), nn.Linear(12, 2)).double().eval()
    x = torch.randn(2, 4, 5, dtype=D)
    _, _, records = _records(model, x)
    rec = [r for r in records if r.kind == "Affine"][-1]  # backward order: the first Linear
    jacobian = torch.autograd.functional.jacobian(lambda a: lin(a.view(4, 5)).reshape(-1),
                                                  x[0].reshape(-1))
    torch.testing.assert_close(rec.matrix, jacobian, rtol=0, atol=1e-15)


# =============================================================================================
# Forward
# =============================================================================================
@pytest.mark.parametrize("seed", SEEDS)
def test_reference_forward_equals_the_models_forward(seed):
    """On a float64 copy of the model: same logits (BatchNorm folded or as a Scale, pools,
    residual adds, cat, reshapes all computed by the reference's own arithmetic)."""
    model, _, x = _case(seed)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        expected = model64(x.double())
    torch.testing.assert_close(reference_forward(capture(model64), x), expected,
                               rtol=1e-11, atol=1e-12)


# =============================================================================================
# Per-op properties (docs/RLRP_SPEC.md, "What is tested")
# =============================================================================================
@pytest.mark.parametrize("skip", ["linear", "ratio"])
@pytest.mark.parametrize("seed", SEEDS)
def test_each_neuron_passes_on_its_relevance_times_z_minus_b(seed, skip):
    """``Σ_i c_ij = (z_j − b_j)·R_j`` for every neuron of every linear op (for the ratio
    rule at adds: ``Σ_i c_ij = R_j`` where ``y_j ≠ 0``); no other rule is checked here."""
    _, plan, x = _case(seed)
    _, _, records = reference_explain(plan, x, rule="rlrp", skip=skip, norm="layer",
                                      trace=True)
    linear = [r for r in records if isinstance(r, LinearRecord)]
    assert linear
    for rec in linear:
        sums = rec.c.sum(dim=2)
        if rec.formula == "ratio":
            expected = torch.where(rec.z != 0, rec.r_z, torch.zeros_like(rec.r_z))
        else:
            assert rec.formula == "rlrp"
            expected = (rec.z - rec.bias) * rec.r_z
        scale = (rec.c.abs().sum(dim=2) + expected.abs()).clamp_min(1e-300)
        assert ((sums - expected).abs() <= 1e-12 * scale).all(), (rec.name, rec.kind)
        # c_ij is a_i w_ji R_j literally: the matrix entry times input times relevance.
        if rec.formula == "rlrp":
            torch.testing.assert_close(
                rec.c, rec.a[:, None, :] * rec.matrix[None] * rec.r_z[:, :, None],
                rtol=0, atol=0)


@pytest.mark.parametrize("skip", ["linear", "ratio"])
@pytest.mark.parametrize("seed", SEEDS)
def test_neuron_reading_passes_each_neurons_relevance_in_l1(seed, skip):
    """``norm="neuron"``: ``c_ij = a_i w_ji R_j / s_j`` with ``s_j = Σ_i |a_i w_ji|``, so
    ``Σ_i |c_ij| = |R_j|`` where ``s_j > 0``, the signed sum is ``R_j`` times a factor
    ``(z_j − b_j) / s_j`` in [−1, 1], and ``s_j = 0`` passes nothing. Adds keep the layer
    form (the ratio rule under ``skip="ratio"``)."""
    _, plan, x = _case(seed)
    _, _, records = reference_explain(plan, x, rule="rlrp", norm="neuron", skip=skip,
                                      trace=True)
    neuron = [r for r in records if isinstance(r, LinearRecord) and r.formula == "rlrp_neuron"]
    assert neuron
    for rec in records:
        if isinstance(rec, LinearRecord) and rec.kind == "Add":
            assert rec.formula == ("ratio" if skip == "ratio" else "rlrp")
    for rec in neuron:
        s = (rec.a[:, None, :] * rec.matrix[None]).abs().sum(dim=2)
        live = s > 0
        passed = rec.c.abs().sum(dim=2)
        torch.testing.assert_close(passed[live], rec.r_z.abs()[live], rtol=1e-12, atol=1e-300)
        assert (rec.c.abs().sum(dim=2)[~live] == 0).all()
        factor = torch.where(live, (rec.z - rec.bias) / torch.where(live, s, torch.ones_like(s)),
                             torch.zeros_like(s))
        assert (factor.abs() <= 1 + 1e-12).all()
        torch.testing.assert_close(rec.c.sum(dim=2), factor * rec.r_z, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("seed", SEEDS)
def test_l1_is_conserved_by_every_linear_and_routing_op(seed):
    """R-LRP: ``‖R_a‖₁ = ‖R_z‖₁`` per sample on every linear op (renormalisation; 0 only
    when ``R̃_a`` is all 0); activations, reshapes and cat move relevance unchanged
    (``‖·‖₁`` and every value kept); max-pool keeps ``‖·‖₁`` (rescaled where windows overlap,
    as at a fork), and the signed sum unless two outputs of opposite sign share a winner."""
    _, plan, x = _case(seed)
    _, _, records = reference_explain(plan, x, rule="rlrp", trace=True)
    for rec in records:
        if isinstance(rec, LinearRecord):
            l1_in, l1_out = _l1(rec.r_a), _l1(rec.r_z)
            dead = _l1(rec.r_tilde) == 0
            torch.testing.assert_close(l1_in[~dead], l1_out[~dead], rtol=1e-12, atol=0)
            assert (l1_in[dead] == 0).all()
            continue
        assert isinstance(rec, RoutingRecord)
        r_a_sum = sum(p.flatten(1).sum(1) for p in rec.r_a)
        l1_in = sum(_l1(p) for p in rec.r_a)
        if rec.kind == "MaxPool":
            alive = l1_in > 0
            torch.testing.assert_close(l1_in[alive], _l1(rec.r_z)[alive], rtol=1e-12, atol=0)
            same_sign = (rec.r_z >= 0).flatten(1).all(1) | (rec.r_z <= 0).flatten(1).all(1)
            torch.testing.assert_close(r_a_sum[same_sign], rec.r_z.flatten(1).sum(1)[same_sign],
                                       rtol=1e-12, atol=1e-15)
        else:
            torch.testing.assert_close(r_a_sum, rec.r_z.flatten(1).sum(1), rtol=1e-12,
                                       atol=1e-15)
            torch.testing.assert_close(l1_in, _l1(rec.r_z), rtol=1e-12, atol=0)
            values = torch.cat([p.flatten(1) for p in rec.r_a], 1).sort(1).values
            torch.testing.assert_close(values, rec.r_z.flatten(1).sort(1).values, rtol=0,
                                       atol=0)


def test_l1_is_conserved_end_to_end_on_a_chain():
    """No fork, no add: the input map's ``‖·‖₁`` is ``|logit|`` of the target."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 2 * 3, 5)).eval()
    x = torch.randn(3, 2, 8, 10)
    relevance, logits = reference_explain(capture(model), x, target=torch.tensor([0, 2, 4]))
    torch.testing.assert_close(_l1(relevance), logits[[0, 1, 2], [0, 2, 4]].abs(),
                               rtol=1e-12, atol=0)


HOMOGENEITY_SEEDS = [0, 3, 6, 9]


@pytest.mark.parametrize("rule,options", RULE_CASES, ids=RULE_IDS)
def test_positive_homogeneity(rule, options):
    """Scaling ``R_out`` by ``k > 0`` scales the input map by ``k`` (every rule)."""
    for seed in HOMOGENEITY_SEEDS:
        _, plan, x = _case(seed)
        logits = reference_forward(plan, x)
        r_out = torch.randn(logits.shape, dtype=D, generator=torch.Generator().manual_seed(seed))
        base, _ = reference_explain(plan, x, rule=rule, output_relevance=r_out, **options)
        for k in (1e-3, 7.5, 1e4):
            scaled, _ = reference_explain(plan, x, rule=rule, output_relevance=k * r_out,
                                          **options)
            torch.testing.assert_close(scaled, k * base, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("rule,options", RULE_CASES, ids=RULE_IDS)
def test_batch_independence(rule, options):
    """A sample's map is the same alone and inside a batch (in any position)."""
    for seed in HOMOGENEITY_SEEDS:
        _, plan, x = _case(seed)
        together, logits = reference_explain(plan, x, rule=rule, **options)
        targets = logits.argmax(1)
        for s in range(x.shape[0]):
            alone, _ = reference_explain(plan, x[s:s + 1], rule=rule, target=targets[s:s + 1],
                                         **options)
            torch.testing.assert_close(alone, together[s:s + 1], rtol=1e-12, atol=1e-300)
        flipped, _ = reference_explain(plan, x.flip(0), rule=rule, target=targets.flip(0),
                                       **options)
        torch.testing.assert_close(flipped.flip(0), together, rtol=1e-12, atol=1e-300)


def test_default_target_is_the_argmax_and_output_relevance_is_the_logit():
    _, plan, x = _case(0)
    default, logits = reference_explain(plan, x)
    targets = logits.argmax(1)
    one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None],
                                                logits.gather(1, targets[:, None]))
    explicit, _ = reference_explain(plan, x, output_relevance=one_hot)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


# =============================================================================================
# Independent computations of the same quantity
# =============================================================================================
class _PassThrough(torch.autograd.Function):
    """ReLU forward; backward passes the gradient unchanged (relevance passes activations)."""

    @staticmethod
    def forward(ctx, z):
        return z.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g


class _TimesInput(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by the input: placed before a
    linear op, it turns ``Wᵀ g`` into ``a ⊙ Wᵀ g`` (the raw R-LRP step)."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a.clone()

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return g * a


@pytest.mark.parametrize("seed", range(4))
def test_chain_rlrp_is_modified_gradient_times_input(seed):
    """docs/RLRP_SPEC.md ("What is tested"): on a chain of linear ops, ReLUs and max-pools, raw R-LRP is gradient ×
    input with every linear op's input multiplying the gradient; renormalisation only
    multiplies each layer by a positive number, so the maps agree up to one scale per sample."""
    torch.manual_seed(seed)
    conv1, conv2 = nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.Conv2d(6, 8, 3, dilation=2)
    lin1, lin2 = nn.Linear(8 * 1 * 2, 12), nn.Linear(12, 3)
    model = nn.Sequential(conv1, nn.ReLU(), nn.MaxPool2d(2, 1), nn.AvgPool2d(2, 1), conv2,
                          nn.ReLU(), nn.Flatten(), lin1, nn.ReLU(), lin2).double().eval()
    x = torch.randn(2, 3, 13, 15, dtype=D).requires_grad_(True)
    t = _TimesInput.apply
    h = F.max_pool2d(_PassThrough.apply(conv1(t(x))), 2, 1)
    h = F.avg_pool2d(t(h), 2, 1)
    h = _PassThrough.apply(conv2(t(h)))
    h = _PassThrough.apply(lin1(t(h.flatten(1))))
    logits = lin2(t(h))
    target = logits.argmax(1)
    r_out = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
    (raw,) = torch.autograd.grad(logits, x, r_out.detach())
    assert (_l1(raw) > 0).all(), "a dead chain compares nothing"
    relevance, _ = reference_explain(capture(model), x.detach(), target=target)
    ratio = _l1(relevance) / _l1(raw)
    torch.testing.assert_close(relevance, raw * ratio.view(-1, 1, 1, 1), rtol=1e-10,
                               atol=1e-14)


zennit = pytest.importorskip("zennit")


def _zennit_attribution(model, x, rule, options, r_out):
    from zennit.attribution import Gradient
    from zennit.composites import (EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat,
                                   LayerMapComposite, layer_map_base)
    from zennit import rules as zr
    single = {
        "lrp0": lambda: zr.Epsilon(epsilon=0.0),
        "epsilon": lambda: zr.Epsilon(epsilon=options.get("epsilon", 1e-6)),
        "zplus": lambda: zr.ZPlus(),
        "gamma": lambda: zr.Gamma(gamma=options.get("gamma", 0.25)),
        "alphabeta": lambda: zr.AlphaBeta(alpha=options.get("alpha", 2.0),
                                          beta=options.get("beta", 1.0)),
        "zbox": lambda: zr.ZBox(low=options["low"], high=options["high"]),
        "flat": lambda: zr.Flat(),
        "wsquare": lambda: zr.WSquare(),
    }
    if rule in single:
        composite = LayerMapComposite(layer_map=layer_map_base() + [
            ((nn.Conv1d, nn.Conv2d, nn.Linear), single[rule]())])
    else:
        composite = {"EpsilonPlus": EpsilonPlus, "EpsilonGammaBox": EpsilonGammaBox,
                     "EpsilonPlusFlat": EpsilonPlusFlat}[rule](**options)
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, r_out)
    return relevance


ZENNIT_CASES = [case for case in RULE_CASES if case[0] != "rlrp"]


@pytest.mark.parametrize("rule,options", ZENNIT_CASES,
                         ids=[i for i, c in zip(RULE_IDS, RULE_CASES) if c[0] != "rlrp"])
@pytest.mark.parametrize("chain", ["conv2d", "linear_first_1d"])
def test_classic_rules_equal_zennit(rule, options, chain):
    """The reference's classic rules and composites are zennit 0.5.1's, on chains zennit
    handles without canonizers: conv/linear (biases inside), ReLU/Tanh, max, average and
    adaptive average pools, flatten. zennit's own computation, float64, to 1e-10."""
    torch.manual_seed(3)
    if chain == "conv2d":
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Tanh(),
                              nn.AvgPool2d(2, 1), nn.Conv2d(4, 3, 1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(12, 6),
                              nn.ReLU(), nn.Linear(6, 4))
        x = torch.randn(2, 3, 8, 10, dtype=D)
    else:
        model = nn.Sequential(nn.Linear(11, 9), nn.ReLU(), nn.Conv1d(2, 6, 3, dilation=2),
                              nn.ReLU(), nn.Conv1d(6, 4, 3, stride=2), nn.LeakyReLU(0.1),
                              nn.Flatten(), nn.Linear(8, 3))
        x = torch.randn(2, 2, 11, dtype=D)
    model = model.double().eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "bias") and m.bias is not None:
                m.bias.normal_(0, 0.3)
    ref, logits = reference_explain(capture(model), x, rule=rule, **options)
    target = logits.argmax(1)
    r_out = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
    theirs = _zennit_attribution(model, x, rule, options, r_out)
    assert (_l1(theirs) > 0).all(), "a dead chain compares nothing"
    err = _l1(ref - theirs) / _l1(theirs)
    assert err.max() <= 1e-10, err


def test_zbox_per_channel_bounds_equal_zennit():
    """EpsilonGammaBox with per-channel bounds ``(1, C, 1, 1)``, zennit's shape."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 7, 3)).double().eval()
    x = torch.randn(2, 3, 7, 9, dtype=D)
    low = torch.tensor([-4.5, -3.0, -6.0], dtype=D).view(1, 3, 1, 1)
    options = {"low": low, "high": -low + 1}
    ref, logits = reference_explain(capture(model), x, rule="EpsilonGammaBox", **options)
    target = logits.argmax(1)
    r_out = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
    theirs = _zennit_attribution(model, x, "EpsilonGammaBox", options, r_out)
    assert (_l1(theirs) > 0).all()
    assert (_l1(ref - theirs) / _l1(theirs)).max() <= 1e-10
