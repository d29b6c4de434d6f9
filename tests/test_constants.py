"""Constants added or subtracted (docs/RLRP_SPEC.md, "Constants take nothing"): input
normalisation written in ``forward`` (``(x − mean) / std``), numbers added or subtracted, a
parameter subtracted after a reshape. Each is a bias: the fast path against the float64
reference, conservation under R-LRP, the sign of a subtracted constant kept, and the forms no
rule covers (a signal subtracted) refused by name."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast import UnsupportedModelError
from rlrp_fast.capture import capture
from rlrp_fast.plan import Add, Affine, Constant
from rlrp_fast.reference import reference_explain

CASES = [("rlrp", {"norm": "layer"}), ("rlrp", {"norm": "neuron"}),
         ("rlrp", {"skip": "ratio"}), ("epsilon", {"epsilon": 0.1}), ("EpsilonPlus", {})]


class Normalised(nn.Module):
    """Every way a constant is added or subtracted here, in one small CNN."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("mean", torch.tensor([0.45, 0.5, 0.55]).view(3, 1, 1))
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.offset = nn.Parameter(torch.randn(5))
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        if self.how == "operator":
            x = (x - self.mean) / 0.25 - 0.1
        elif self.how == "functions":
            x = torch.sub(x, self.mean).subtract(1) + 2.5
        else:  # in place, on a copy
            x = x * 1.0
            x -= self.mean
            x.sub_(0.5)
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.fc(h - self.offset.view(1, 5))


HOWS = ["operator", "functions", "in_place"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_constants_subtracted_match_the_reference(how, rule, options):
    torch.manual_seed(0)
    model = Normalised(how).double().eval()
    plan = capture(model)
    assert not any(isinstance(s, Add) and len(s.inputs) > 1 for s in plan.steps)
    x = torch.rand(3, 3, 6, 7, dtype=torch.float64)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    torch.testing.assert_close(fast.logits, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-12)
    if rule == "rlrp":
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass,
                                   rtol=1e-10, atol=0)


class AddsTheNegatedOffset(Normalised):
    def forward(self, x):
        h = F.relu(self.conv((x - self.mean) / 0.25 + (-0.1))).mean((2, 3))
        return self.fc(h + self.offset.view(1, 5))


def test_a_subtracted_constant_is_the_negated_constant_added():
    """``x − m`` and ``x + (−m)`` are one function, so one explanation; and the constant's
    sign reaches the forward (subtracting is not adding)."""
    torch.manual_seed(1)
    minus = Normalised("operator").double().eval()
    plus = AddsTheNegatedOffset("operator").double().eval()
    plus.load_state_dict(minus.state_dict())
    with torch.no_grad():
        plus.offset.neg_()
    x = torch.rand(2, 3, 6, 7, dtype=torch.float64)
    a = rlrp_fast.Explainer(minus, backend="torch").explain(x, target=1)
    b = rlrp_fast.Explainer(plus, backend="torch").explain(x, target=1)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-10, atol=1e-14)
    plan = capture(minus)
    subtracted = [s for s in plan.steps if isinstance(s, Add) and s.subtracted]
    assert len(subtracted) == 2  # the buffer and the reshaped parameter
    numbers = [s.value.item() for s in plan.steps
               if isinstance(s, Constant) and s.value.dim() == 0 and s.name.endswith("_number")]
    assert numbers == [-0.1]


def test_float32_and_the_default_backend():
    torch.manual_seed(2)
    model = Normalised("functions").eval()
    x = torch.rand(4, 3, 6, 7)
    got = rlrp_fast.Explainer(model).explain(x)
    want = rlrp_fast.Explainer(model.double(), backend="torch").explain(x.double())
    torch.testing.assert_close(got.relevance.double(), want.relevance, rtol=1e-4, atol=1e-6)


class Subtracts(nn.Module):
    """Signals subtracted: ``x − y`` of two branches (PoolFormer's ``pool(x) − x``), a number
    or a buffer minus a signal, a signal minus itself in part."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc, self.fc2, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 2)
        self.register_buffer("m", torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        h = F.relu(self.fc(x))
        if self.how == "signals":
            h = h - self.fc2(x)
        elif self.how == "number_minus":
            h = 1 - h
        elif self.how == "buffer_minus":
            h = self.m[:3] - h
        elif self.how == "in_place":
            h = h * 1.0
            h -= F.relu(self.fc2(x))
        return self.out(h)


SUBTRACTS = ["signals", "number_minus", "buffer_minus", "in_place"]


@pytest.mark.parametrize("how", SUBTRACTS)
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_signals_subtracted_match_the_reference(how, rule, options):
    """A subtracted signal is an input of the sum with weight −1: ``R̃_y = −y ⊙ R`` (R-LRP's
    ``a ⊙ Wᵀ R``), ``−y ⊙ R / stab(z)`` under the classic rules."""
    torch.manual_seed(4)
    model = Subtracts(how).double().eval()
    plan = capture(model)
    assert [s.negated for s in plan.steps if isinstance(s, Add)] == \
        [(1,)] if how in ("signals", "in_place") else [(0,)]
    x = torch.randn(5, 4, dtype=torch.float64)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    torch.testing.assert_close(fast.logits, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-12)
    if rule == "rlrp" and options.get("skip") != "ratio":  # (u / y) R is not renormalised
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass,
                                   rtol=1e-10, atol=0)


def test_the_subtrahend_gets_the_negated_contribution():
    """``out = w · (a − b)`` (``w`` all ones): R-LRP gives ``z = a − b`` the relevance
    ``z ⊙ R`` and the sum ``a ⊙ R_z`` and ``−b ⊙ R_z`` (one linear step with weights ±1; as a
    sum of ``a`` and a scaled ``b`` it would square ``b``), renormalised to the logit."""

    class Difference(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1, bias=False)
            nn.init.ones_(self.fc.weight)

        def forward(self, x):
            return self.fc(x[:, :3] - x[:, 3:])

    x = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.25, -1.0]], dtype=torch.float64)
    model = Difference().double().eval()
    e = rlrp_fast.Explainer(model, backend="torch").explain(x, target=0)
    z = x[:, :3] - x[:, 3:]
    terms = torch.cat([x[:, :3] * z, -x[:, 3:] * z], 1)
    want = terms * e.logits[0, 0] / terms.abs().sum()
    torch.testing.assert_close(e.relevance, want, rtol=1e-12, atol=1e-15)


class Refused(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4, 3)
        self.p = nn.Parameter(torch.ones(3))

    def forward(self, x):
        if self.how == "constants":  # constants broadcast to the batch: not folded
            n = x.shape[0]
            return self.fc(x) + (self.p.expand(n, 3) - self.p.expand(n, 3))
        return torch.sub(self.fc(x), 1, alpha=2)


@pytest.mark.parametrize("how, match", [("constants", "a difference of constants only"),
                                        ("alpha", "torch.sub with alpha")])
def test_differences_of_constants_and_alpha_are_refused_by_name(how, match):
    with pytest.raises(UnsupportedModelError, match=match):
        rlrp_fast.Explainer(Refused(how).eval())


class Folded(nn.Module):
    """Constants computed in ``forward`` from parameters and buffers only: a relative
    position bias looked up in a table (Swin, BEiT), a bias concatenated from pieces (BEiT's
    ``cat((q_bias, zeros, v_bias))`` in ``F.linear``), branch weights through a softmax."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(6, 18, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
        self.register_buffer("k_bias", torch.zeros(6), persistent=False)
        self.table = nn.Parameter(torch.randn(9))
        self.register_buffer("index", (torch.arange(5)[:, None] - torch.arange(5) + 4) % 9)
        self.alphas = nn.Parameter(torch.randn(2))
        self.head = nn.Linear(6, 3)

    def forward(self, x):                                      # (N, 5, 6)
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, -1)
        position = self.table[self.index.view(-1)].view(5, 5).unsqueeze(0)
        attn = torch.softmax(q @ k.transpose(-2, -1) + position, -1)
        w = torch.softmax(self.alphas, 0)
        h = w[0] * (attn @ v) + w[1] * x
        return self.head(h.mean(1))


@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_constants_computed_in_forward_are_folded(rule, options):
    torch.manual_seed(5)
    model = Folded().double().eval()
    plan = capture(model)
    qkv = next(s for s in plan.steps if isinstance(s, Affine))
    assert torch.equal(qkv.bias, torch.cat((model.q_bias, model.k_bias, model.v_bias)))
    values = [s.value for s in plan.steps if isinstance(s, Constant)]
    assert any(v.shape == (1, 5, 5) for v in values)  # the looked-up position bias
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    torch.testing.assert_close(fast.logits, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-12)
    if rule == "rlrp" and options.get("skip") != "ratio":
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass,
                                   rtol=1e-10, atol=0)


def test_a_folded_constant_follows_the_model_guard():
    """Folding reads the parameters once: changing one afterwards is caught, not explained
    with the stale value."""
    model = Folded().eval()
    explainer = rlrp_fast.Explainer(model)
    with torch.no_grad():
        model.table.add_(1.0)
    with pytest.raises(rlrp_fast.StaleModelError):
        explainer.explain(torch.randn(2, 5, 6))
