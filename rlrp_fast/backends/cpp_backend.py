"""The ``cpp`` backend: fused C++ CPU ops from ``csrc/`` (``torch.ops.rlrp_fast.*``, called
through their typed wrappers in ``rlrp_fast.ops``).

Each contraction is one op: ATen's GEMM / transposed convolution for ``Wᵀ g``, with the
elementwise work around it fused into a single parallel pass (the division by ``stab(z)``
before; the product with ``a``, the per-sample scale and the per-sample L1 norm after).

The ops live in the compiled extension ``rlrp_fast._C``, built by ``setup.py``. When the
package was installed without it (a wheel built in isolation, an sdist, no torch at build time),
the first use compiles the same sources with ``torch.utils.cpp_extension.load`` (needs ninja and
a C++ compiler; about a minute, once) into ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/rlrp_fast``, one folder per source/torch/Python combination, and later processes load
that build directly. ``RLRP_FAST_NO_JIT=1`` turns the first-use build off. Importing this module
never fails: when neither works, :func:`unavailable_reason` says why and how to build it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from .torch_backend import TorchBackend

_BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` from the source checkout "
               "(needs a C++ compiler and the installed torch)")


_log = logging.getLogger(__name__)
_JIT_NAME = "rlrp_fast_C"
# the flags setup.py compiles rlrp_fast._C with
_CFLAGS, _LDFLAGS = ((["/O2", "/openmp"], []) if sys.platform == "win32"
                     else (["-O3", "-fopenmp"], ["-fopenmp"]))


def _load() -> str | None:
    """Import the extension (or build it on first use); the reason on failure."""
    try:
        from .. import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except ImportError as exc:
        failed = _jit_load()
        if failed is not None:
            return (f"the compiled extension rlrp_fast._C is missing ({exc}) and {failed}; "
                    f"{_BUILD_HINT}")
    ops = torch.ops.rlrp_fast
    for name in ("affine_relevance_l1", "affine_relevance"):
        if not hasattr(ops, name):
            return (f"rlrp_fast._C does not register torch.ops.rlrp_fast.{name} (stale build?); "
                    f"{_BUILD_HINT}")
    return None


def _sources() -> list[Path]:
    """csrc/*.cpp: shipped inside the package (wheel, sdist) or beside it (source checkout)."""
    here = Path(__file__).resolve().parents[1]
    folders = [here / "csrc"]
    if (here.parent / "pyproject.toml").is_file():  # a source checkout (editable install)
        folders.append(here.parent / "csrc")
    for folder in folders:
        found = sorted(folder.glob("*.cpp"))
        if found:
            return found
    return []


def jit_build_dir(sources: list[Path] | None = None) -> Path:
    """Where the first-use build of the extension goes: one folder per sources, flags, torch and
    Python, under ``$TORCH_EXTENSIONS_DIR`` or ``$XDG_CACHE_HOME/rlrp_fast`` (~/.cache)."""
    key = hashlib.sha256()
    for src in _sources() if sources is None else sources:
        key.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    key.update(repr((_CFLAGS, _LDFLAGS, torch.__version__, sys.version,
                     torch.compiled_with_cxx11_abi())).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlrp_fast"
    return Path(root) / f"{_JIT_NAME}-torch{torch.__version__}-{sys.implementation.cache_tag}-" \
        f"{key.hexdigest()[:12]}"


def _jit_load() -> str | None:
    """Load the first-use build of the extension, compiling it if there is none yet; None on
    success, else why not (the end of a sentence)."""
    if os.environ.get("RLRP_FAST_NO_JIT"):
        return "building it on first use is turned off (RLRP_FAST_NO_JIT is set)"
    sources = _sources()
    if not sources:
        return "its C++ sources (csrc/*.cpp) are not in the installed package either"
    build_dir = jit_build_dir(sources)
    suffix = ".pyd" if sys.platform == "win32" else ".so"  # what cpp_extension.load writes
    library, done = build_dir / f"{_JIT_NAME}{suffix}", build_dir / "built"
    if library.is_file() and done.is_file():  # compiled by an earlier process
        try:
            torch.ops.load_library(str(library))
            return None
        except OSError as exc:  # a broken build: compile it again below
            _log.warning("rlrp_fast: could not load %s (%s); rebuilding it", library, exc)
    quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found", on import
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import is_ninja_available, load
    except ImportError as exc:
        return f"torch.utils.cpp_extension is not importable ({exc})"
    finally:
        quiet.setLevel(level)
    if not is_ninja_available():
        return "building it on first use needs ninja (`pip install ninja`)"
    compiler = os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")
    if shutil.which(compiler.split()[0]) is None:
        return f"building it on first use needs a C++ compiler ({compiler!r} not found)"
    _log.warning("rlrp_fast: compiling the cpp backend's C++ extension once, into %s "
                 "(about a minute)", build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        load(name=_JIT_NAME, sources=[str(s) for s in sources], extra_cflags=_CFLAGS,
             extra_ldflags=_LDFLAGS, build_directory=str(build_dir), is_python_module=False,
             verbose=False)
    except Exception as exc:  # compiler errors, a broken toolchain, a failed load
        lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        return f"building it on first use failed ({lines[0]})"
    done.touch()
    return None


_REASON: str | None = _load()
if _REASON is None:
    from .. import ops  # the typed wrappers; importing them registers their fake implementations


def unavailable_reason() -> str | None:
    """None when the compiled ops are usable, else what is missing and how to build it."""
    return _REASON


class CppBackend(TorchBackend):
    """Fused CPU contractions; forward and pooling adjoints are the torch backend's."""

    name = "cpp"

    def __init__(self) -> None:
        if _REASON is not None:
            raise RuntimeError(f"the cpp backend is unavailable: {_REASON}")

    def affine_relevance(self, step, weight, g, input_shape, a=None, z=None, eps=0.0):
        return ops.affine_relevance(g, weight, a=a, z=z, eps=eps, input_shape=input_shape,
                                    **step.geometry)

    def affine_relevance_l1(self, step, weight, g, a, g_scale=None):
        return ops.affine_relevance_l1(g, weight, a, g_scale=g_scale, **step.geometry)
