"""Ops without a rule where no relevance passes (docs/RLRP_SPEC.md, "Ops without a rule"):
a rotary position embedding on the queries and keys (EVA-02's ``neg``/``cat`` on halves,
products with cos/sin tables) is computed as the model computes it; the same op where
relevance would pass through it is refused by name."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast import UnsupportedModelError
from rlrp_fast.capture import capture
from rlrp_fast.plan import Opaque
from rlrp_fast.reference import reference_explain

CASES = [("rlrp", {"norm": "layer"}), ("rlrp", {"norm": "neuron"}), ("epsilon", {"epsilon": 0.1}),
         ("EpsilonPlus", {})]


def rotate_half(x):
    x1, x2 = x.chunk(2, -1)
    return torch.cat((torch.neg(x2), x1), -1)


class Rotary(nn.Module):
    """Tokens through one attention with a rotary embedding on q and k (written out)."""

    def __init__(self, where: str = "qk", dim: int = 8, tokens: int = 6):
        super().__init__()
        self.where = where
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), \
            nn.Linear(dim, 3)
        angle = torch.arange(tokens)[:, None] * torch.linspace(0.1, 1.0, dim // 2)
        self.register_buffer("cos", torch.cat((angle.cos(), angle.cos()), -1))
        self.register_buffer("sin", torch.cat((angle.sin(), angle.sin()), -1))

    def forward(self, x):                                      # (N, tokens, dim)
        q, k, v = self.qkv(x).chunk(3, -1)
        q = q * self.cos + rotate_half(q) * self.sin
        k = k * self.cos + rotate_half(k) * self.sin
        if self.where == "v":  # the unknown op where relevance passes
            v = torch.cumsum(v, dim=1)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        h = x + self.proj(attn @ v)
        return self.head(F.relu(h).mean(1))


@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_ops_without_a_rule_on_the_query_side_are_computed(rule, options):
    torch.manual_seed(0)
    model = Rotary().double().eval()
    plan = capture(model)
    assert sum(isinstance(s, Opaque) for s in plan.steps) == 2  # neg of q's and k's halves
    x = torch.randn(3, 6, 8, dtype=torch.float64)
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


def test_an_op_without_a_rule_where_relevance_passes_is_refused():
    with pytest.raises(UnsupportedModelError, match="cannot explain cumsum .*where relevance "
                       "passes"):
        rlrp_fast.Explainer(Rotary("v").eval())


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        g = h.clone()
        g.exp_()
        return self.out(h * torch.sigmoid(g))


def test_an_in_place_op_without_a_rule_is_refused():
    with pytest.raises(UnsupportedModelError, match="cannot explain Tensor.exp_"):
        rlrp_fast.Explainer(InPlace().eval())
