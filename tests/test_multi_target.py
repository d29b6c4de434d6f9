"""Several classes per pass: one forward, K relevance passes batched as N·K rows, each map
equal to what a separate call gives (float64: 1e-10)."""
import pytest
import torch
import torch.nn as nn

import rlrp_fast
from test_fast_vs_reference import random_model
from tv_models import randomized

CASES = [("rlrp", {}), ("rlrp", {"norm": "neuron"}), ("rlrp", {"skip": "ratio"}),
         ("epsilon", {"epsilon": 0.1}), ("EpsilonPlus", {}), ("gradient_x_input", {})]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_top_k_equals_separate_calls_on_a_resnet(rule, options):
    model = randomized("resnet18", seed=4).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    explainer = rlrp_fast.Explainer(model, rule=rule, **options)
    multi = explainer.explain(x, top_k=3)
    assert multi.relevance.shape == (3, 3, 3, 32, 32) and multi.targets.shape == (3, 3)
    assert torch.equal(multi.targets, multi.logits.topk(3, dim=1).indices)
    for k in range(3):
        single = explainer.explain(x, target=multi.targets[:, k])
        assert _rel_err(multi.relevance[:, k], single.relevance) < 1e-10, k


@pytest.mark.parametrize("seed", [0, 2, 5, 11])
def test_target_matrix_and_output_relevance_on_random_architectures(seed):
    model, shape = random_model(seed)
    model = model.double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    explainer = rlrp_fast.Explainer(model)
    classes = explainer.explain(x).logits.shape[1]
    targets = torch.randint(0, classes, (4, 2))
    multi = explainer.explain(x, target=targets)
    assert torch.equal(multi.targets, targets)
    start = torch.randn(4, 2, classes, dtype=torch.float64)
    by_relevance = explainer.explain(x, output_relevance=start)
    for k in range(2):
        single = explainer.explain(x, target=targets[:, k])
        assert _rel_err(multi.relevance[:, k], single.relevance) < 1e-10
        single = explainer.explain(x, output_relevance=start[:, k])
        assert _rel_err(by_relevance.relevance[:, k], single.relevance) < 1e-10
    assert multi.vanished.shape == (4, 2)


def test_one_map_keeps_the_single_shapes():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    e = rlrp_fast.explain(model, torch.randn(2, 4), top_k=1)
    assert e.relevance.shape == (2, 1, 4) and e.targets.shape == (2, 1)
    e = rlrp_fast.explain(model, torch.randn(2, 4))
    assert e.relevance.shape == (2, 4) and e.targets.shape == (2,)


@pytest.mark.parametrize("kwargs,match", [
    ({"top_k": 0}, "top_k must be a positive int"),
    ({"top_k": 4}, "top_k=4 exceeds the 3 classes"),
    ({"top_k": 2, "target": 1}, "at most one of"),
    ({"target": torch.zeros(2, 2, 2, dtype=torch.long)}, r"target must have shape \(2,\)"),
    ({"output_relevance": torch.zeros(2, 2, 2, 3)}, "output_relevance has shape"),
])
def test_bad_multi_target_requests(kwargs, match):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with pytest.raises((ValueError, TypeError), match=match):
        rlrp_fast.Explainer(model).explain(torch.randn(2, 4), **kwargs)


class BatchMerging(nn.Module):
    """Folds the batch into the rows of a matrix: per-sample rows cannot be repeated."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x.reshape(-1, 4)))
        return self.fc2(h.reshape(x.shape[0], 8))


@pytest.mark.parametrize("top_k", [None, 2])
def test_batch_merging_models_are_refused_clearly(top_k):
    explainer = rlrp_fast.Explainer(BatchMerging().eval())
    with pytest.raises(NotImplementedError, match="batch as the first dimension"):
        explainer.explain(torch.randn(3, 2, 4), top_k=top_k)
