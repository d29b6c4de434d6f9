"""rlrp_fast.integrations.ray.ExplainBatch: called directly (no Ray needed), and through Ray
Data when Ray is installed (skipped otherwise)."""
import numpy as np
import pytest
import torch

import rlrp_fast
from rlrp_fast.digits import DigitsCNN
from rlrp_fast.integrations.ray import ExplainBatch


def _make_model() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN().eval()


def _images(n=5) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 32, 32), dtype=np.float32)


def test_explain_batch_without_ray_matches_the_explainer():
    batch = {"image": _images(), "id": np.arange(5)}
    fn = ExplainBatch(_make_model, top_k=2)
    out = fn(batch)
    assert out["relevance"].shape == (5, 2, 1, 32, 32) and out["targets"].shape == (5, 2)
    assert np.array_equal(out["id"], batch["id"])
    explainer = rlrp_fast.Explainer(_make_model())
    x = torch.from_numpy(batch["image"])
    for j in range(2):
        want = explainer.explain(x, target=torch.from_numpy(out["targets"][:, j])).relevance
        np.testing.assert_allclose(out["relevance"][:, j], want.numpy(), rtol=1e-5, atol=1e-7)
    one = ExplainBatch(_make_model(), relevance_dtype=np.float16)(
        {"image": list(batch["image"])})  # a list of (C, H, W) arrays, a module given directly
    assert one["relevance"].shape == (5, 1, 32, 32) and one["relevance"].dtype == np.float16


def test_ray_data_map_batches():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        images = _images(6)
        ds = ray.data.from_items([{"image": x, "i": i} for i, x in enumerate(images)])
        # the module itself (its class is importable in the workers), not a test-local function
        rows = sorted(ds.map_batches(ExplainBatch, fn_constructor_args=(_make_model(),),
                                     batch_size=3, concurrency=1).take_all(),
                      key=lambda r: r["i"])
        want = rlrp_fast.Explainer(_make_model()).explain(torch.from_numpy(images)).relevance
        got = np.stack([r["relevance"] for r in rows])
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-7)
    finally:
        ray.shutdown()
