"""The ``cpp`` backend (``torch.ops.rlrp_fast.*`` from ``csrc/``) around its ops: what happens
without the extension, and whole explanations on torchvision VGG16 / ResNet50 against the
``torch`` backend. The ops themselves are tested per primitive (test_affine_relevance.py,
test_affine_relevance_l1.py).

Skipped when the extension is not built, except under CI (``CI`` set), where the package is
installed with ``pip install --no-build-isolation -e ".[test]"`` and a missing extension is a
failure.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import rlrp_fast
from rlrp_fast.backends import unavailable_reason

REASON = unavailable_reason("cpp")
needs_cpp = pytest.mark.skipif(REASON is not None, reason=f"cpp backend: {REASON}")


def _rel_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).abs().sum() / ref.double().abs().sum()).item()


def test_extension_is_built_in_ci():
    """CI builds the extension; its absence there is a broken build, not a skip."""
    if REASON is not None and os.environ.get("CI"):
        pytest.fail(f"CI is set but the cpp backend is unavailable: {REASON}")


def test_import_works_without_extension():
    """Without rlrp_fast._C: the package imports, the backend says how to build it, 'auto'
    falls back to torch and asking for 'cpp' is an error that says the same."""
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['rlrp_fast._C'] = None\n"  # makes `import rlrp_fast._C` fail
        "import rlrp_fast\n"
        "from rlrp_fast.backends import get_backend, unavailable_reason\n"
        "reason = unavailable_reason('cpp')\n"
        "assert reason and '--no-build-isolation' in reason, reason\n"
        "with warnings.catch_warnings(record=True):\n"
        "    warnings.simplefilter('always')\n"
        "    assert get_backend('auto', torch.device('cpu')).name == 'torch'\n"
        "try:\n"
        "    get_backend('cpp', torch.device('cpu'))\n"
        "except ValueError as exc:\n"
        "    assert '--no-build-isolation' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "try:\n"
        "    import rlrp_fast.ops\n"
        "except ImportError as exc:\n"
        "    assert 'needs the compiled C++ extension' in str(exc), exc\n"
        "    assert '--no-build-isolation' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('rlrp_fast.ops imported without the extension')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RLRP_FAST_NO_JIT": "1"})
    assert done.returncode == 0, done.stderr


# -- end to end -----------------------------------------------------------------------------
# float64: the backends differ only in summation order, so any difference beyond rounding is
# a wiring bug. float32: both backends' per-sample norms are accurate to ~1e-7 (pairwise or
# float64-blocked sums), so the maps agree to float32 accuracy. float32 LRP-ε: both backends
# run the same ATen transposes on the same g / stab(z).
FP64_MODEL_TOL = 1e-10
FP32_MODEL_TOL = 1e-5
FP32_EPSILON_TOL = 1e-5


@pytest.fixture(scope="module", params=["vgg16", "resnet50"])
def tv_model(request):
    pytest.importorskip("torchvision")
    from tv_models import fold_batchnorm, randomized

    return fold_batchnorm(randomized(request.param, seed=2))


RULE_OPTIONS = {"rlrp": {"rule": "rlrp", "norm": "layer"},
                "rlrp-neuron": {"rule": "rlrp", "norm": "neuron"},
                "epsilon": {"rule": "epsilon"}}


@needs_cpp
@pytest.mark.parametrize("rule", list(RULE_OPTIONS))
def test_explainer_matches_torch_backend(tv_model, rule):
    x = torch.randn(2, 3, 64, 64)
    options = RULE_OPTIONS[rule]
    cpp = rlrp_fast.Explainer(tv_model, backend="cpp", **options)(x).relevance
    ref = rlrp_fast.Explainer(tv_model, backend="torch", **options)(x).relevance.double()
    assert torch.isfinite(cpp).all()
    if rule == "epsilon":
        assert _rel_l1(cpp, ref) <= FP32_EPSILON_TOL
        return
    assert _rel_l1(cpp, ref) <= FP32_MODEL_TOL
    model64 = copy.deepcopy(tv_model).double()
    cpp64 = rlrp_fast.Explainer(model64, backend="cpp", **options)(x.double()).relevance
    ref64 = rlrp_fast.Explainer(model64, backend="torch", **options)(x.double()).relevance
    assert _rel_l1(cpp64, ref64) <= FP64_MODEL_TOL
    assert _rel_l1(cpp, ref64) <= FP32_MODEL_TOL
