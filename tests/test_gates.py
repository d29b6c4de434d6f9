"""Products with a gate (squeeze-excitation, docs/RLRP_SPEC.md "Gates: the signal takes all"):
the fast path against the float64 reference, the gate getting nothing, x * sigmoid(x) as
SiLU, StochasticDepth as identity, and the torchvision families they unlock."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast import UnsupportedModelError
from rlrp_fast.capture import capture
from rlrp_fast.plan import Gate
from rlrp_fast.reference import reference_explain


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation as people write it: pooled gate times the input."""

    def __init__(self, channels: int, gate: nn.Module, flat: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, 3, 1), nn.Conv2d(3, channels, 1)
        self.lin1, self.lin2 = nn.Linear(channels, 3), nn.Linear(3, channels)
        self.gate, self.flat = gate, flat

    def forward(self, x):
        if self.flat:  # the gate through a reshape: (N, C) → (N, C, 1, 1)
            s = self.lin2(torch.relu(self.lin1(x.mean((2, 3)))))
            return x * self.gate(s).view(x.size(0), -1, 1, 1)
        s = self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return self.gate(s) * x


def se_net(gate: nn.Module, flat: bool) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), SqueezeExcite(5, gate, flat),
                         nn.Conv2d(5, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 6, 3)).eval()


CASES = [("rlrp", {"norm": "layer"}), ("rlrp", {"norm": "neuron"}), ("epsilon", {"epsilon": 0.1}),
         ("EpsilonPlus", {})]


@pytest.mark.parametrize("gate", [nn.Sigmoid(), nn.Hardsigmoid()], ids=["sigmoid", "hardsigmoid"])
@pytest.mark.parametrize("flat", [False, True], ids=["conv", "reshaped"])
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_gate_products_match_the_reference(gate, flat, rule, options):
    model = se_net(gate, flat).double()
    plan = capture(model)
    assert sum(isinstance(s, Gate) for s in plan.steps) == 1
    x = torch.randn(3, 2, 7, 8, dtype=torch.float64)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    torch.testing.assert_close(fast.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-12)
    if rule == "rlrp":  # every step and the fork before the gate keep the L1 mass
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10,
                                   atol=0)


class WrittenOutSiLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(h))


def test_x_times_sigmoid_x_is_silu():
    torch.manual_seed(0)
    model = WrittenOutSiLU().eval()
    plain = nn.Sequential(model.fc1, nn.SiLU(), model.fc2).eval()
    x = torch.randn(3, 4)
    e = rlrp_fast.explain(model, x)
    assert not any(isinstance(s, Gate) for s in capture(model).steps)
    torch.testing.assert_close(e.relevance, rlrp_fast.explain(plain, x).relevance)


class TwoGates(nn.Module):
    """A product of two gates: no signal to give the relevance to (a product of two signals
    is explained: tests/test_products.py)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.sigmoid(self.a(x)) * torch.sigmoid(self.b(x)))


class ScaledByShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) * x.size(1)


@pytest.mark.parametrize("cls,match", [(TwoGates, "both operands are gates"),
                                       (ScaledByShape, "a product with a shape value")])
def test_other_products_are_refused_by_name(cls, match):
    with pytest.raises(UnsupportedModelError, match=match):
        rlrp_fast.Explainer(cls().eval())


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small", "regnet_y_400mf"])
def test_squeeze_excitation_families_explain(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    e = rlrp_fast.Explainer(model).explain(x)  # trace verification: plan logits == model's
    assert torch.isfinite(e.relevance).all()
    mass = e.logits.double().gather(1, e.targets[:, None]).abs().view(-1)
    torch.testing.assert_close(e.relevance.double().abs().flatten(1).sum(1), mass, rtol=1e-4,
                               atol=0)
    one = rlrp_fast.Explainer(model).explain(x[1:])  # batch independence
    torch.testing.assert_close(one.relevance, e.relevance[1:], rtol=1e-4, atol=1e-7)


class SelectiveKernel(nn.Module):
    """SK-Net's branch selection: a softmax over the branches (dim 1) weighs two conv
    branches; and a token mixer ``x * x.softmax(-1)`` whose gate is computed from the signal
    itself (a gate, not an activation)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 4, 5, padding=2)
        self.squeeze = nn.Linear(4, 8)
        self.select = nn.Softmax(dim=1)
        self.head = nn.Linear(4 * 6 * 5, 3)

    def forward(self, x):
        a, b = F.relu(self.a(x)), F.relu(self.b(x))
        if self.how == "module":
            w = self.select(self.squeeze((a + b).mean((2, 3))).view(-1, 2, 4))
        elif self.how == "method":
            w = self.squeeze((a + b).mean((2, 3))).view(-1, 2, 4).softmax(1)
        else:
            w = F.softmax(self.squeeze((a + b).mean((2, 3))).view(-1, 2, 4), dim=-2)
        h = a * w[:, 0, :, None, None] + b * w[:, 1, :, None, None]
        h = h * torch.softmax(h, dim=-1)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("how", ["module", "method", "function"])
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_softmax_gates_match_the_reference(how, rule, options):
    torch.manual_seed(3)
    model = SelectiveKernel(how).double().eval()
    plan = capture(model)
    assert sum(isinstance(s, Gate) for s in plan.steps) == 3
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    torch.testing.assert_close(fast.logits, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-12)
    if rule == "rlrp":
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10,
                                   atol=0)
    one = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x[1:])
    torch.testing.assert_close(one.relevance, fast.relevance[1:], rtol=1e-10, atol=1e-14)


class SoftmaxAsSignal(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc(x)
        if self.how == "reshaped":  # a softmax read as a signal through a reshape
            return self.out(torch.softmax(h.view(-1, 2, 3), -1).flatten(1))
        if self.how == "batch":
            return self.out(h * torch.softmax(h, 0))
        return self.out(h * torch.softmax(h, -1, dtype=torch.float64).float())


@pytest.mark.parametrize("how, match", [
    ("reshaped", "its output is used as a signal"), ("batch", "other than the batch dim"),
    ("dtype", "softmax with dtype")])
def test_softmax_outside_a_gate_is_refused_by_name(how, match):
    with pytest.raises(UnsupportedModelError, match=match):
        rlrp_fast.Explainer(SoftmaxAsSignal(how).eval())
