"""Selecting parts of a tensor (chunk, split, unbind, tensor_split, x[:, 0], slices): relevance
goes back to the selected elements only, checked against the float64 reference; ShuffleNetV2
(chunk + channel shuffle) explains."""
import pytest
import torch
import torch.nn as nn

import rlrp_fast
from rlrp_fast import UnsupportedModelError
from rlrp_fast.capture import capture
from rlrp_fast.plan import Select
from rlrp_fast.reference import reference_explain


class Parts(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.how == "chunk":
            u, v = h.chunk(2, dim=1)
        elif self.how == "split":
            u, v = torch.split(h, [3, 3], dim=1)
        elif self.how == "tensor_split":
            u, v = h.tensor_split(2, dim=1)
        elif self.how == "slice":
            u, v = h[:, :3], h[:, 3:]
        else:  # overlapping and strided slices of one tensor: a fork
            u, v = h[:, 1:4], h[:, ::2]
        out = torch.cat([torch.relu(self.a(u)), torch.relu(self.b(v))], 1)
        return self.fc(out[:, :, 1:-1].flatten(1))


HOWS = ["chunk", "split", "tensor_split", "slice", "strided"]


class Unbound(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, x):  # (N, 3, 5): unbind the middle dim, use two rows
        rows = x.unbind(1)
        return self.fc(torch.relu(rows[0]) + rows[2])


def test_unbind_matches_the_reference():
    torch.manual_seed(2)
    model = Unbound().double().eval()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    fast = rlrp_fast.Explainer(model, backend="torch").explain(x)
    ref, _ = reference_explain(capture(model), x)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-12)
    assert (fast.relevance[:, 1] == 0).all()
CASES = [("rlrp", {}), ("rlrp", {"norm": "neuron"}), ("epsilon", {"epsilon": 0.1})]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_selections_match_the_reference(how, rule, options):
    torch.manual_seed(1)
    model = Parts(how)
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    model(x.float())  # materialise the lazy layer
    model = model.double().eval()
    plan = capture(model)
    assert any(isinstance(s, Select) for s in plan.steps)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    torch.testing.assert_close(fast.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-12)


class ClassToken(nn.Module):
    """``x[:, 0]`` pooling: relevance reaches only the first position's features."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):  # (N, tokens, 4)
        return self.head(torch.relu(self.proj(x))[:, 0])


def test_indexing_sends_relevance_to_the_selected_elements_only():
    model = ClassToken().eval()
    e = rlrp_fast.explain(model, torch.randn(3, 6, 4))
    assert (e.relevance[:, 1:] == 0).all() and (e.relevance[:, 0] != 0).any()


class TensorIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x[:, [0, 2]])


def test_indexing_by_a_list_is_refused():
    with pytest.raises(UnsupportedModelError, match="indexing by a tensor or list"):
        rlrp_fast.Explainer(TensorIndex().eval())


def test_shufflenet_explains():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    e = rlrp_fast.Explainer(model).explain(x)
    assert torch.isfinite(e.relevance).all()
    mass = e.logits.double().gather(1, e.targets[:, None]).abs().view(-1)
    torch.testing.assert_close(e.relevance.double().abs().flatten(1).sum(1), mass, rtol=1e-4,
                               atol=0)
