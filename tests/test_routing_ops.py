"""Routing ops that move elements (docs/RLRP_SPEC.md, "Ops that route relevance without changing
it"; "Routing ops added"): torch.roll, constant F.pad (its padded elements are constants and
take nothing), permute and swapaxes/swapdims, any dims, shifts and pads, against the float64
reference (which routes by tracking element positions)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast import UnsupportedModelError
from rlrp_fast.capture import capture
from rlrp_fast.engine import StepError
from rlrp_fast.plan import Pad, Reshape
from rlrp_fast.reference import reference_explain


def _route(how: str, h: torch.Tensor) -> torch.Tensor:
    if how == "pad":
        return F.pad(h, (1, 2, 0, 3))
    if how == "pad_crop":  # negative pads crop
        return F.pad(h, (-1, 2, 1, -2))
    if how == "pad_channels":
        return F.pad(h, (0, 0, 0, 0, 2, 1), "constant", 0.0)
    if how == "pad_value":  # a non-zero constant: it takes nothing either
        return F.pad(h, pad=(1, 1, 1, 1), value=0.5)
    if how == "pad_runtime":  # pads computed from the shape (Swin's patch merging)
        return F.pad(h, (0, h.shape[3] % 4, 0, h.shape[2] % 4))
    if how == "pad_pool":  # the padded constant wins windows: its share is dropped
        return F.max_pool2d(F.pad(h, (1, 1, 1, 1), value=0.75), 2)
    if how == "roll":
        return torch.roll(h, 2, 3)
    if how == "roll_dims":
        return h.roll((1, -2), (2, -1))
    if how == "roll_negative":
        return torch.roll(h, shifts=(-3,), dims=(-2,))
    if how == "permute":
        return h.permute(0, -1, -3, -2)
    if how == "permute_function":
        return torch.permute(h, (0, 2, 3, 1))
    if how == "swapaxes":
        return h.swapaxes(1, 3)
    if how == "swapdims":
        return torch.swapdims(h, -1, -2)
    raise AssertionError(how)


class Routed(nn.Module):
    """conv → ReLU → the routing op → a Linear over every element (distinct weights per
    position, so a misrouted element shows)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.LazyLinear(3)
        self.pad = {"zero_pad_module": nn.ZeroPad2d((2, 0, 1, 1)),
                    "constant_pad_module": nn.ConstantPad3d((0, 1, 1, 0, 1, 1), -0.5)
                    }.get(how, nn.Identity())

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.how.endswith("_module"):
            return self.fc(self.pad(h).flatten(1))
        return self.fc(_route(self.how, h).flatten(1))


HOWS = ["pad", "pad_crop", "pad_channels", "pad_value", "pad_runtime", "pad_pool",
        "zero_pad_module", "constant_pad_module", "roll", "roll_dims", "roll_negative", "permute",
        "permute_function", "swapaxes", "swapdims"]
CASES = [("rlrp", {"norm": "layer"}), ("rlrp", {"norm": "neuron"}), ("epsilon", {"epsilon": 0.1})]


def _model(how: str):
    torch.manual_seed(1)
    model = Routed(how).double().eval()
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    model(x)  # materialise the lazy layer
    return model, x


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_routing_matches_the_reference(how, rule, options):
    model, x = _model(how)
    plan = capture(model)
    kinds = (Pad,) if "pad" in how else (Reshape,)
    assert any(isinstance(s, kinds) for s in plan.steps)
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    torch.testing.assert_close(fast.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-13)
    assert (fast.relevance != 0).any()
    if rule == "rlrp":  # routing and dropped constants keep the mass
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10,
                                   atol=0)


def test_roll_routes_each_element_back():
    """Relevance through a roll alone is the output's relevance rolled back."""
    class Rolled(nn.Module):
        def forward(self, x):
            return torch.roll(x, shifts=(1, -2), dims=(1, 2)).flatten(1)

    x = torch.randn(2, 3, 4, dtype=torch.float64)
    r_out = torch.randn(2, 12, dtype=torch.float64)
    e = rlrp_fast.Explainer(Rolled().eval(), rule="epsilon", backend="torch").explain(
        x, output_relevance=r_out)
    want = torch.roll(r_out.view(2, 3, 4), shifts=(-1, 2), dims=(1, 2))
    torch.testing.assert_close(e.relevance, want, rtol=0, atol=0)


class Refused(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4, 2)

    def forward(self, x):  # (N, 3, 4)
        if self.how == "reflect":
            x = F.pad(x, (0, 0, 1, 1), mode="reflect")
        elif self.how == "roll_flat":
            x = torch.roll(x, 1)
        elif self.how == "roll_runtime":
            x = torch.roll(x, x.shape[1], 2)
        return self.fc(x).mean(1)


@pytest.mark.parametrize("how,match", [("reflect", "mode='reflect'"),
                                       ("roll_flat", "without dims"),
                                       ("roll_runtime", "computed at run time")])
def test_unsupported_routing_is_refused_by_name(how, match):
    with pytest.raises(UnsupportedModelError, match=match):
        rlrp_fast.Explainer(Refused(how).eval())


def test_rolling_the_batch_is_an_error():
    class BatchRoll(nn.Module):
        def forward(self, x):
            return torch.roll(x, 1, -3).flatten(1)

    with pytest.raises(StepError, match="batch dimension"):
        rlrp_fast.Explainer(BatchRoll().eval(), backend="torch").explain(torch.randn(2, 3, 4))
