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
from rlrp_fast.plan import Add, Constant
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
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4, 3)
        self.register_buffer("m", torch.ones(4))

    def forward(self, x):
        h = self.fc(x)
        if self.how == "signals":
            return h - self.fc(x * 2)
        if self.how == "number_minus":
            return 1 - h
        if self.how == "buffer_minus":
            return self.m[:3] - h
        return torch.sub(h, 1, alpha=2)


@pytest.mark.parametrize("how, match", [
    ("signals", "subtracting a signal"), ("number_minus", "subtracting a signal"),
    ("buffer_minus", "subtracting a signal"), ("alpha", "torch.sub with alpha")])
def test_subtracting_a_signal_is_refused_by_name(how, match):
    with pytest.raises(UnsupportedModelError, match=match):
        rlrp_fast.Explainer(Subtracts(how).eval())
