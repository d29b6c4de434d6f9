"""Explainer pickles and deep-copies: the model and the arguments travel, the rest is rebuilt."""
import copy
import multiprocessing as mp
import pickle

import pytest
import torch

import rlrp_fast
from rlrp_fast.digits import DigitsCNN


def _model() -> DigitsCNN:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("rule, options", [("rlrp", {}), ("rlrp", {"skip": "ratio"}),
                                           ("epsilon", {"epsilon": 0.25}),
                                           ("gradient_x_input", {})])
def test_pickle_round_trip_gives_identical_maps(rule, options):
    explainer = rlrp_fast.Explainer(_model(), rule=rule, verify=False, **options)
    x = _images()
    expected = explainer.explain(x)
    clone = pickle.loads(pickle.dumps(explainer))
    assert clone is not explainer and clone.model is not explainer.model
    assert clone.rule_name == rule and clone._args == explainer._args
    assert clone._verify is False
    got = clone.explain(x)
    torch.testing.assert_close(got.relevance, expected.relevance, rtol=0, atol=0)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    assert torch.equal(got.targets, expected.targets)


def test_deepcopy_rebuilds_lock_and_plan():
    model = _model()
    explainer = rlrp_fast.Explainer(model)
    x = _images()
    expected = explainer.explain(x, target=3)
    clone = copy.deepcopy(explainer)
    assert clone.model is not model
    assert clone._lock is not explainer._lock and clone._plan is not explainer._plan
    assert clone._verified == set()  # rebuilt: the copy verifies its own trace again
    torch.testing.assert_close(clone.explain(x, target=3).relevance, expected.relevance,
                               rtol=0, atol=0)
    # the copy follows its own model: editing the original does not make it stale
    with torch.no_grad():
        model.classifier[-1].bias.add_(1.0)
    torch.testing.assert_close(clone.explain(x, target=3).relevance, expected.relevance,
                               rtol=0, atol=0)


def test_shallow_copy_shares_the_model():
    explainer = rlrp_fast.Explainer(_model())
    clone = copy.copy(explainer)
    assert clone.model is explainer.model and clone._lock is not explainer._lock
    x = _images(2)
    torch.testing.assert_close(clone.explain(x).relevance, explainer.explain(x).relevance,
                               rtol=0, atol=0)


def test_options_still_checked_when_loading():
    explainer = rlrp_fast.Explainer(_model(), rule="epsilon", epsilon=0.5)
    clone = pickle.loads(pickle.dumps(explainer))
    assert clone._args.options == {"epsilon": 0.5}


def _explain_in_worker(args):
    explainer, x = args
    return torch.get_num_threads(), explainer.explain(x).relevance


def test_spawn_pool_gives_the_parents_maps():
    explainer = rlrp_fast.Explainer(_model())
    batches = [_images(3), _images(5)]
    expected = [explainer.explain(x).relevance for x in batches]
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_explain_in_worker, [(explainer, x) for x in batches], chunksize=1)
    for (_, got), want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


class _Explained(torch.utils.data.Dataset):
    """A dataset whose items are explained inside the (spawned) DataLoader worker."""

    def __init__(self, explainer, x):
        self.explainer, self.x = explainer, x

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.explainer.explain(self.x[i:i + 1]).relevance[0]


def test_spawn_dataloader_workers():
    explainer = rlrp_fast.Explainer(_model())
    x = _images(4)
    expected = explainer.explain(x).relevance
    loader = torch.utils.data.DataLoader(_Explained(explainer, x), batch_size=2, num_workers=2,
                                         multiprocessing_context="spawn")
    got = torch.cat(list(loader))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# -- ExplainedModel -------------------------------------------------------------------------

def test_explained_model_pickles_and_deep_copies():
    model = _model()
    x = _images(3)
    em = rlrp_fast.ExplainedModel(model, rule="rlrp", top_k=2, norm="layer", example_input=x)
    want = em(x)
    for clone in (pickle.loads(pickle.dumps(em)), copy.deepcopy(em)):
        assert clone.model is not model and clone.top_k == 2
        assert clone._explainer._lock is not em._explainer._lock
        assert clone._explainer._plan is not em._explainer._plan
        got = clone(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # a copy follows its own model: editing the original makes only the original stale
    clone = copy.deepcopy(em)
    with torch.no_grad():
        model.classifier[-1].bias.add_(1.0)
    assert torch.equal(clone(x)[1], want[1])
    with pytest.raises(rlrp_fast.StaleModelError):
        em(x)


def _explained_in_worker(args):
    em, x = args
    return em(x)[1]


def test_explained_model_in_a_spawn_pool():
    em = rlrp_fast.ExplainedModel(_model(), top_k=2)
    batches = [_images(3), _images(2)]
    want = [em(x)[1] for x in batches]
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.map(_explained_in_worker, [(em, x) for x in batches], chunksize=1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
