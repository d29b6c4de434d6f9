"""``Explainer(..., compile=True)``: the plan run through ``torch.compile`` gives the eager
result, recompiles for a new batch size, and keeps every clear error of the eager path."""
import pytest
import torch
from test_properties import chain_cnn, rel_err

import rlrp_fast
from rlrp_fast.backends import unavailable_reason

BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(
    unavailable_reason("cpp") is not None, reason="the cpp extension is not built"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_equals_eager(backend):
    model = chain_cnn(3, batchnorm=True)
    eager = rlrp_fast.Explainer(model, backend=backend)
    compiled = rlrp_fast.Explainer(model, backend=backend, compile=True)
    for n in (3, 5):  # a second batch size recompiles
        x = torch.rand(n, 3, 16, 16)
        want, got = eager.explain(x), compiled.explain(x)
        assert compiled._compiled is not None  # still compiled: nothing fell back to eager
        assert torch.equal(got.targets, want.targets)
        assert rel_err(got.relevance, want.relevance).max() < 1e-5
        assert torch.allclose(got.logits, want.logits, rtol=1e-5, atol=1e-6)


def test_compiled_keeps_the_clear_errors():
    model = chain_cnn(4)
    explainer = rlrp_fast.Explainer(model, compile=True)
    x = torch.rand(2, 3, 16, 16)
    explainer.explain(x)
    with pytest.raises(ValueError, match="out of range for 5 classes"):
        explainer.explain(x, target=7)
    with pytest.raises(ValueError, match="NaN or Inf"):
        explainer.explain(torch.full_like(x, float("nan")))
    assert explainer._compiled is not None


def test_compile_is_refused_where_it_means_nothing():
    with pytest.raises(TypeError, match="compile"):
        rlrp_fast.Explainer(chain_cnn(0), rule="gradient_x_input", compile=True)


def test_a_failing_compile_falls_back_to_eager_and_says_so():
    model = chain_cnn(5)
    explainer = rlrp_fast.Explainer(model, compile=True)

    def broken(*args):
        raise RuntimeError("inductor could not build this\nmore detail")
    explainer._compiled = broken
    x = torch.rand(2, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="inductor could not build this"):
        got = explainer.explain(x)
    assert explainer._compiled is None
    want = rlrp_fast.Explainer(model).explain(x)
    assert torch.equal(got.relevance, want.relevance)
