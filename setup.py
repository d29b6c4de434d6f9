"""Build script. The package metadata lives in pyproject.toml; this file adds the compiled
CPU extension ``rlrp_fast._C`` (csrc/), which the ``cpp`` backend loads.

The extension compiles against the torch that is installed when this runs, so build with
``pip install --no-build-isolation -e .``. Without torch (e.g. a plain ``pip install .``, whose
isolated build environment has no torch, on purpose) or a C++ compiler the package still
installs, without the extension: the ``cpp`` backend then compiles the same sources (shipped as
``rlrp_fast/csrc``) on first use, or falls back to ``torch`` where that is impossible.
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))


def _skip(reason: str) -> dict:
    warnings.warn(f"rlrp_fast: building without the C++ extension ({reason}); the 'cpp' "
                  "backend will compile it on first use (needs ninja and a C++ compiler). To "
                  "build it now, install torch first and use `pip install --no-build-isolation`",
                  stacklevel=2)
    return {}


def _extension_kwargs() -> dict:
    """``ext_modules``/``cmdclass`` for setup(), or nothing when the extension cannot build."""
    if os.environ.get("RLRP_FAST_NO_EXTENSION"):
        return _skip("RLRP_FAST_NO_EXTENSION is set")
    if not SOURCES:
        return _skip("no sources in csrc/")
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        return _skip(f"torch is not importable at build time: {exc}; with pip, pass "
                     "--no-build-isolation")
    compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if shutil.which(compiler.split()[0]) is None:
        return _skip(f"no C++ compiler found ({compiler!r})")
    is_msvc = sys.platform == "win32"
    cflags = ["/O2", "/openmp"] if is_msvc else ["-O3", "-fopenmp"]
    ldflags = [] if is_msvc else ["-fopenmp"]  # libgomp: the copy torch already loaded
    ext = CppExtension("rlrp_fast._C", SOURCES, extra_compile_args=cflags,
                       extra_link_args=ldflags)
    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
