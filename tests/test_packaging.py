"""Packaging: what a user gets from a plain ``pip install`` (no ahead-of-time extension, optional
extras missing).

- The ``cpp`` backend compiles its extension on first use when ``rlrp_fast._C`` is not
  importable, once (a second process loads that build), and its results match the ``torch``
  backend; without a working compiler, ``auto`` falls back to ``torch`` with the usual warning.
  Each case runs in a subprocess with ``rlrp_fast._C`` blocked and an empty temporary
  ``TORCH_EXTENSIONS_DIR``. The first-use build takes ~25 s on 2 cores.
- The package imports without matplotlib, and drawing says which extra to install.
- The runtime requirements do not pin torch.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import rlrp_fast
from rlrp_fast.backends import cpp_backend

ROOT = Path(__file__).resolve().parents[1]

# run with `python -c PRELUDE + code`: the ahead-of-time extension cannot be imported
BLOCK_C = "import sys\nsys.modules['rlrp_fast._C'] = None\n"

MODEL = """
import torch, rlrp_fast
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(6, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
    torch.nn.Linear(4 * 3 * 3, 5)).eval()
x = torch.randn(3, 3, 16, 16)
"""


def _run(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, from an empty folder (so ``rlrp_fast`` is the installed
    package), with the first-use build going to ``tmp_path/ext``."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("RLRP_FAST_NO_JIT", "CXX")}
    full_env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), **env)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=600)


def test_sources_ship_with_the_package():
    """The first-use build needs csrc/*.cpp: inside the installed package, or beside it."""
    names = [p.name for p in cpp_backend._sources()]
    assert "rlrp_ops.cpp" in names, names


def test_first_use_build(tmp_path):
    """No rlrp_fast._C: the cpp backend compiles itself once, with a one-line notice, registers
    the ops' fake implementations, works and matches the torch backend; a second process loads
    that build without compiling."""
    code = BLOCK_C + MODEL + """
from rlrp_fast.backends import unavailable_reason
import rlrp_fast.backends.cpp_backend as cb
assert unavailable_reason("cpp") is None, unavailable_reason("cpp")
assert "rlrp_fast._C" not in sys.modules or sys.modules["rlrp_fast._C"] is None
print("build dir:", cb.jit_build_dir())
# the fake implementations registered with the first-use build: the ops trace on fake tensors
from torch._subclasses.fake_tensor import FakeTensorMode
from rlrp_fast import ops
with FakeTensorMode():
    g, w, a = torch.empty(3, 5), torch.empty(5, 7), torch.empty(3, 7)
    geometry = dict(stride=[], padding=[], dilation=[], groups=1, conv_dims=0)
    assert ops.affine_relevance(g, w, a=a, input_shape=(3, 7), **geometry).shape == (3, 7)
    r, l1 = ops.affine_relevance_l1(g, w, a, **geometry)
    assert r.shape == (3, 7) and l1.shape == (3,)
for rule in ("rlrp", "EpsilonPlus"):
    r_cpp = rlrp_fast.Explainer(model, rule=rule, backend="cpp").explain(x).relevance
    r_ref = rlrp_fast.Explainer(model, rule=rule, backend="torch").explain(x).relevance
    err = ((r_cpp - r_ref).abs().sum() / r_ref.abs().sum()).item()
    assert err < 1e-5, (rule, err)
    assert rlrp_fast.Explainer(model, rule=rule).backend == "cpp"
"""
    first = _run(code, tmp_path)
    assert first.returncode == 0, first.stderr
    notices = [line for line in first.stderr.splitlines() if "compiling" in line]
    assert len(notices) == 1 and str(tmp_path / "ext") in notices[0], first.stderr
    assert "uses 'torch'" not in first.stderr, first.stderr
    assert len(list((tmp_path / "ext").glob("rlrp_fast_C-*/rlrp_fast_C.so"))) == 1

    again = _run(code, tmp_path, CXX="/bin/false")  # no compiler needed for the cached build
    assert again.returncode == 0, again.stderr
    assert "compiling" not in again.stderr, again.stderr


def test_no_compiler_falls_back_to_torch(tmp_path):
    """No rlrp_fast._C and no working compiler: 'auto' uses torch with the warning that says
    why, and asking for 'cpp' is an error."""
    code = BLOCK_C + MODEL + """
import warnings
from rlrp_fast.backends import get_backend
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    explainer = rlrp_fast.Explainer(model, backend="auto")
assert explainer.backend == "torch"
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert any("uses 'torch'" in m and "building it on first use failed" in m for m in messages), \\
    messages
explainer.explain(x)
try:
    get_backend("cpp", torch.device("cpu"))
except ValueError as exc:
    assert "--no-build-isolation" in str(exc), exc
else:
    raise AssertionError("no error")
"""
    done = _run(code, tmp_path, CXX="/bin/false")
    assert done.returncode == 0, done.stderr
    assert not list((tmp_path / "ext").glob("*/built")), "a failed build was marked as built"


def test_no_first_use_build_when_turned_off(tmp_path):
    done = _run(BLOCK_C + """
from rlrp_fast.backends import unavailable_reason
reason = unavailable_reason("cpp")
assert reason and "RLRP_FAST_NO_JIT" in reason, reason
""", tmp_path, RLRP_FAST_NO_JIT="1")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "ext").exists()


def test_works_without_matplotlib(tmp_path):
    """matplotlib is the optional [viz] extra: everything imports without it, and drawing says
    what to install."""
    done = _run("""
import sys
sys.modules["matplotlib"] = None
import numpy as np
import rlrp_fast, rlrp_fast.viz, rlrp_fast.demo, rlrp_fast.evaluate, rlrp_fast.cli
try:
    rlrp_fast.viz.save_grid(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), "unused.png")
except ImportError as exc:
    assert "rlrp_fast[viz]" in str(exc), exc
else:
    raise AssertionError("no ImportError")
""", tmp_path)
    assert done.returncode == 0, done.stderr


def test_runtime_requirements_do_not_pin_torch():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    torch_reqs = [d for d in deps if d.replace(" ", "").startswith("torch")]
    assert torch_reqs and all(">=" in d and "==" not in d and "<" not in d
                              for d in torch_reqs), deps
    assert not any(d.startswith(("matplotlib", "triton", "zennit", "captum")) for d in deps), deps
    extras = project["optional-dependencies"]
    assert "matplotlib" in extras["viz"] and "triton" in extras["gpu"]
    assert {"zennit==0.5.1", "captum==0.9.0"} <= set(extras["bench"])
    assert rlrp_fast.__version__ == project["version"]
