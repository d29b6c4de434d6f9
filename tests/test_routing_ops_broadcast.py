"""Routing ops modern models use, beside tests/test_routing_ops.py (docs/RLRP_SPEC.md, "Routing ops added"): expand / expand_as /
broadcast_to / repeat of a signal (each element receives the sum of its copies' relevance,
rescaled to the arriving mass as at a fork), transpose on any dims, swapaxes, flatten /
unflatten, view_as / reshape_as. The fast path against the float64 reference, which routes
by element positions."""
import pytest
import torch
import torch.nn as nn

import rlrp_fast
from rlrp_fast.capture import capture
from rlrp_fast.plan import Broadcast, Reshape
from rlrp_fast.reference import reference_explain


class Routing(nn.Module):
    """Tokens (N, L=4, 3) through the routing op ``how``, a Linear on each side."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.fc(x))                             # (N, 4, 6)
        how = self.how
        if how == "expand":  # a pooled token broadcast back over the tokens
            pooled = h.mean(1, keepdim=True)
            h = h + pooled.expand(-1, h.shape[1], -1)
        elif how == "expand_as":
            h = self.fc2(h[:, :1].expand_as(h)) + h
        elif how == "broadcast_to":
            h = torch.broadcast_to(h[:, None], (h.shape[0], 2, 4, 6)).flatten(1, 2)
        elif how == "repeat":
            h = h.repeat(1, 2, 1)[:, 1:6]                       # tiles the tokens
        elif how == "repeat_new_dims":
            h = h.repeat(2, 1, 1, 1).permute(1, 0, 2, 3).flatten(1, 2)
        elif how == "transpose":
            h = self.fc2(h.transpose(-1, -2).transpose(1, 2).swapaxes(0, 0))
        elif how == "swapaxes":
            h = torch.swapaxes(h, 1, 2).reshape(h.shape[0], 4, 6)
        elif how == "unflatten":
            h = torch.unflatten(h, 2, (2, 3)).flatten(2).unflatten(1, (2, 2)).flatten(1, 2)
        elif how == "view_as":
            h = self.fc2(h.reshape(h.shape[0], 6, 4).transpose(1, 2).contiguous().view_as(h))
        elif how == "reshape_as":
            other = self.fc2(h)
            h = h.transpose(1, 2).reshape_as(other) * 1.5 + other
        else:
            raise AssertionError(how)
        return self.head(h.mean(1))


HOWS = ["expand", "expand_as", "broadcast_to", "repeat", "repeat_new_dims", "transpose",
        "swapaxes", "unflatten", "view_as", "reshape_as"]
CASES = [("rlrp", {"norm": "layer"}), ("rlrp", {"norm": "neuron"}),
         ("epsilon", {"epsilon": 0.1})]


def _case(how: str):
    torch.manual_seed(21)
    return Routing(how).double().eval(), torch.randn(3, 4, 3, dtype=torch.float64)


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_routing_ops_match_the_reference(how, rule, options):
    model, x = _case(how)
    plan = capture(model)
    assert any(isinstance(s, (Broadcast, Reshape)) for s in plan.steps)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-9, atol=1e-12)
    assert (fast.relevance != 0).any()
    if rule == "rlrp":
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10,
                                   atol=0)


@pytest.mark.parametrize("how", ["expand", "repeat", "broadcast_to", "repeat_new_dims"])
def test_copies_are_broadcast_steps_and_batch_independent(how):
    model, x = _case(how)
    assert any(isinstance(s, Broadcast) for s in capture(model).steps)
    explainer = rlrp_fast.Explainer(model, backend="torch")
    whole = explainer.explain(x)
    for i in range(x.shape[0]):
        torch.testing.assert_close(explainer.explain(x[i:i + 1]).relevance,
                                   whole.relevance[i:i + 1], rtol=1e-10, atol=1e-14)


def test_copies_sum_their_relevance():
    """x (N, 3) expanded to (N, 2, 3) and summed by a Linear over the copies: under a classic
    rule (no renormalisation), each element receives the sum of its two copies' relevance."""

    class Net(nn.Module):
        def forward(self, x):
            return x[:, None].expand(-1, 2, -1).flatten(1)

    x = torch.randn(2, 3, dtype=torch.float64)
    r = torch.randn(2, 6, dtype=torch.float64)
    e = rlrp_fast.Explainer(Net().eval(), rule="epsilon", backend="torch").explain(
        x, output_relevance=r)
    torch.testing.assert_close(e.relevance, r[:, :3] + r[:, 3:])


def test_repeating_the_batch_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.repeat(2, 1))

    with pytest.raises(NotImplementedError, match="mix samples"):
        rlrp_fast.Explainer(Net().double().eval(), backend="torch").explain(
            torch.randn(2, 3, dtype=torch.float64))
