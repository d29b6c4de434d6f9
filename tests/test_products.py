"""Products of two signals (RLRP_SPEC.md, "Products of two signals"): ``x * y`` and
``x @ y`` where neither operand is a gate or a constant. R-LRP: both operands receive the same
contributions, jointly renormalised; the classic rules: LXT's uniform rule. The fast path
against the float64 reference, conservation, and what is refused."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast.capture import capture
from rlrp_fast.plan import Product
from rlrp_fast.reference import reference_explain


class Products(nn.Module):
    """Tokens (N, L, 3) through one product of two signals, chosen by ``how``."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        u, v = self.a(x), self.b(x)
        if self.how == "swiglu":  # the gated MLP of modern transformers: silu(a(x)) * b(x)
            h = F.silu(u) * v
        elif self.how == "square":  # the same tensor twice
            h = torch.relu(u) * torch.relu(u)
        elif self.how == "broadcast":  # (N, L, E) * (N, 1, E)
            h = u * torch.relu(v).mean(1, keepdim=True)
        elif self.how == "method":
            h = torch.mul(torch.tanh(u), v).mul(u)
        elif self.how == "matmul":  # (N, L, E) @ (N, E, L) @ (N, L, E)
            h = (u @ v.transpose(1, 2)) @ v / 4
        elif self.how == "bmm":
            h = torch.bmm(torch.relu(u), v.transpose(1, 2)).matmul(u)
        else:
            raise AssertionError(self.how)
        return self.head(h.mean(1))


HOWS = ["swiglu", "square", "broadcast", "method", "matmul", "bmm"]
CASES = [("rlrp", {"norm": "layer"}), ("rlrp", {"norm": "neuron"}),
         ("rlrp", {"skip": "ratio"}), ("epsilon", {"epsilon": 0.1}), ("EpsilonPlus", {})]


def _case(how: str):
    torch.manual_seed(11)
    model = Products(how).double().eval()
    return model, torch.randn(3, 5, 3, dtype=torch.float64)


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_products_of_two_signals_match_the_reference(how, rule, options):
    model, x = _case(how)
    plan = capture(model)
    products = [s for s in plan.steps if isinstance(s, Product)]
    assert products and all(len(s.inputs) == 2 for s in products)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(fast.relevance).all() and (fast.relevance != 0).any()
    if rule == "rlrp":
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10,
                                   atol=0)


def test_both_operands_get_the_same_contributions():
    """y = u ⊙ v with u, v two slices of the input: before the joint renormalisation each
    operand's relevance is c = u v R, so their maps are equal, and together they carry R's
    L1 mass (written out by hand)."""

    torch.manual_seed(2)
    x = torch.randn(2, 6, dtype=torch.float64)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            u, v = x.chunk(2, dim=1)
            return self.fc(u * v)

    model = Net().double().eval()
    e = rlrp_fast.Explainer(model, backend="torch").explain(x)
    u, v = x.chunk(2, dim=1)
    r_out = torch.zeros_like(e.logits).scatter(1, e.targets[:, None],
                                               e.logits.gather(1, e.targets[:, None]))
    h = u * v
    r_h = h * (r_out @ model.fc.weight)                      # the Linear's R-LRP step
    r_h = r_h * r_out.abs().sum(1, keepdim=True) / r_h.abs().sum(1, keepdim=True)
    c = u * v * r_h
    want = torch.cat([c, c], 1)
    want = want * r_h.abs().sum(1, keepdim=True) / want.abs().sum(1, keepdim=True)
    torch.testing.assert_close(e.relevance, want)
    torch.testing.assert_close(e.relevance[:, :3], e.relevance[:, 3:])


def test_classic_rules_split_a_product_in_half():
    """LXT's uniform rule: each operand of x * y receives R / 2 (zennit has no rule)."""

    class Net(nn.Module):
        def forward(self, x):
            u, v = x.chunk(2, dim=1)
            return u * v

    x = torch.randn(2, 6, dtype=torch.float64)
    r = torch.randn(2, 3, dtype=torch.float64)
    e = rlrp_fast.Explainer(Net().eval(), rule="epsilon", backend="torch").explain(
        x, output_relevance=r)
    torch.testing.assert_close(e.relevance, torch.cat([r / 2, r / 2], 1))


@pytest.mark.parametrize("norm", ["layer", "neuron"])
def test_products_are_batch_independent(norm):
    model, x = _case("matmul")
    explainer = rlrp_fast.Explainer(model, norm=norm, backend="torch")
    whole = explainer.explain(x)
    for i in range(x.shape[0]):
        torch.testing.assert_close(explainer.explain(x[i:i + 1]).relevance,
                                   whole.relevance[i:i + 1], rtol=1e-10, atol=1e-14)


class MatmulRefused(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        if self.how == "parameter":
            return x @ self.w
        return self.fc(x) @ x.transpose(0, 1)  # (N, 4) @ (4, N): mixes the samples


def test_a_matmul_with_a_parameter_is_refused_by_name():
    with pytest.raises(rlrp_fast.UnsupportedModelError, match="write it as nn.Linear"):
        rlrp_fast.Explainer(MatmulRefused("parameter").eval())


def test_a_matmul_that_mixes_samples_is_refused():
    explainer = rlrp_fast.Explainer(MatmulRefused("mixing").double().eval(), backend="torch")
    with pytest.raises(ValueError, match="mixes samples"):
        explainer.explain(torch.randn(4, 4, dtype=torch.float64))


def test_division_by_a_number_is_a_scale():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(torch.relu(x / 255.0).div(3))

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(2, 3, dtype=torch.float64) * 255
    plan = capture(model)
    for norm in ("layer", "neuron"):
        fast = rlrp_fast.Explainer(model, norm=norm, backend="torch").explain(x)
        torch.testing.assert_close(fast.relevance, reference_explain(plan, x, norm=norm)[0])


@pytest.mark.parametrize("expr", ["x / self.p", "x / x.shape[1]", "1.0 / x"])
def test_other_divisions_are_refused_by_name(expr):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.ones(3))

    namespace = {}  # the forward written from the expression (fx traces its source)
    exec(f"def forward(self, x):\n    return {expr}", {"torch": torch}, namespace)
    Net.forward = namespace["forward"]
    # the refusal names the node, the enclosing module (here the model itself) and why
    with pytest.raises(rlrp_fast.UnsupportedModelError,
                       match=r"in the model's own forward \(Net\)\): only a tensor divided by "
                             "a non-zero number"):
        rlrp_fast.Explainer(Net().eval())
