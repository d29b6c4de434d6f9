"""Every documented command runs: each fenced ``bash``/``sh``/``python`` block of README.md and
docs/*.md is a test case, so a new snippet is tested the day it is written.

- Shell blocks run under ``bash -e`` in ``tmp_path``, where the checkout's top-level entries
  are linked, with the interpreter's ``bin/`` first on PATH: relative paths
  (``.venv/bin/python``, ``bench/``, the Makefile) resolve as in the repository, and what a
  command writes into its working directory lands in ``tmp_path``.
- Where a document gives a size too big for the test run, or a command writes into the
  repository by default (through a linked folder), :data:`SUBSTITUTIONS` rewrites it, each
  with its reason; a check asserts that no file of the checkout changed.
- Python blocks run in one namespace holding :func:`_python_names` (the ``model``, ``images``
  and ``one_hot`` the README's snippets take as given).
- A block that cannot run here is marked in its document on the line before it,
  ``<!-- doc-test: skip (needs CUDA) -->``, and is skipped with that reason.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh")


@dataclass(frozen=True)
class Substitution:
    documented: str   # text of a documented command
    tested: str       # what the test runs instead
    why: str
    creates: tuple[str, ...] = ()  # files (relative to tmp_path) the tested command must write


TINY_EVAL = "--archs resnet --n-images 20 --n-robust 10 --n-residual 5 --n-sanity 10"

SUBSTITUTIONS = (
    Substitution("make demo", "make -o .venv/.installed demo",
                 "a test never rebuilds the shared .venv"),
    Substitution("make test", "make -n test",
                 "this is the test suite: checked as a dry run, not run from inside itself"),
    Substitution("python -m rlrp_fast.zoo", "python -m rlrp_fast.zoo --arch plain_cnn "
                 "--epochs 1 --out-dir zoo",
                 "writes the shipped weights by default; 3 models x 8-10 epochs take 30-45 s",
                 creates=("zoo/zoo_plain_cnn.pt",)),
    Substitution("python -m rlrp_fast.evaluate --threads 1",
                 f"python -m rlrp_fast.evaluate --threads 1 {TINY_EVAL} --out-dir eval",
                 "writes docs/ by default; 3 models x 540 images take 3-5 minutes (the ResNet "
                 "is the one model that runs every study)",
                 creates=("eval/EVALUATION.md", "eval/eval_heatmaps.png", "eval/eval_curves.png")),
    Substitution("python -m rlrp_fast.evaluate --section modern --threads 1",
                 "python -m rlrp_fast.evaluate --section modern --threads 1 --n-images 8 "
                 "--n-robust 4 --n-sanity 4 --out-dir eval",
                 "writes docs/ by default; the ViT and SE-ConvNeXt on 540 images take ~20 min",
                 creates=("eval/EVALUATION.md", "eval/eval_modern_heatmaps.png",
                          "eval/eval_modern_curves.png")),
    Substitution("rlrp-fast evaluate", "rlrp-fast evaluate --n-images 20", "100 images by default"),
    Substitution("python -m bench --quick", "python -m bench --quick --models digits --json "
                 "bench.json", "writes bench/results.json; the 224x224 models take minutes",
                 creates=("bench.json",)),
)


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None  # the reason of a doc-test skip marker, if any

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^```(\w*)\s*$")
_SKIP = re.compile(r"^<!--\s*doc-test:\s*skip\s*\((.+)\)\s*-->$")


def extract_blocks(doc: Path) -> list[Block]:
    """The fenced shell and python blocks of ``doc``, in order."""
    blocks, lines = [], doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        lang = opening.group(1)
        if lang in SHELLS or lang == "python":
            before = [line.strip() for line in lines[:i] if line.strip()]
            marker = _SKIP.match(before[-1]) if before else None
            blocks.append(Block(doc, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n",
                                marker.group(1) if marker else None))
        i = end + 1
    return blocks


BLOCKS = [b for doc in DOCS for b in extract_blocks(doc)]


def substituted(code: str) -> tuple[str, list[Substitution]]:
    used = [s for s in SUBSTITUTIONS if s.documented in code]
    for s in used:
        code = code.replace(s.documented, s.tested)
    return code, used


def _snapshot() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file of the checkout outside .git, .venv and caches."""
    skip = {".git", ".venv", "__pycache__", ".pytest_cache"}
    out = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mtime_ns, st.st_size)
    return out


def _python_names() -> dict:
    """What README's snippets take as given: a trained model, a few images, a start relevance
    (random images: nothing to load)."""
    from rlrp_fast import digits

    return {"model": digits.load_pretrained(), "images": torch.rand(4, 1, 32, 32),
            "one_hot": torch.eye(10)[:4]}


def _run_shell(code: str, tmp_path: Path) -> None:
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".pytest_cache"):
            (tmp_path / entry.name).symlink_to(entry)
    # One thread: at these sizes a second one only adds overhead, and on a shared 2-core
    # machine it made `rlrp-fast evaluate` 5x slower.
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{code}\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_block(block: Block, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(block.skip)
    code, used = substituted(block.code)
    before = _snapshot()
    if block.lang == "python":
        exec(compile(code, block.id, "exec"), _python_names())
    else:
        _run_shell(code, tmp_path)
    for path in (p for s in used for p in s.creates):
        assert (tmp_path / path).is_file(), f"{block.id} did not write {path}"
    assert _snapshot() == before, f"{block.id} changed files of the checkout"


def test_every_substitution_is_used() -> None:
    """A substitution that no longer matches any documented command would test nothing."""
    documented = "".join(b.code for b in BLOCKS if not b.skip)
    assert [s.documented for s in SUBSTITUTIONS if s.documented not in documented] == []


def test_zoo_training_is_bitwise_reproducible_whatever_the_thread_count() -> None:
    """docs/EVALUATION.md: `python -m rlrp_fast.zoo` gives the same bits on one machine, with
    any thread count (training pins itself to one thread)."""
    from rlrp_fast import zoo

    threads = torch.get_num_threads()
    states = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            states.append(zoo.train("plain_cnn", seed=3, epochs=1)[0].state_dict())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_robustness_tables_do_not_depend_on_the_thread_count() -> None:
    """docs/EVALUATION.md: the robustness studies pin themselves to one thread (unpinned, two
    threads changed every image's residual-study statistics by up to ~1e-8)."""
    from rlrp_fast import evaluate, zoo

    model = zoo.load_pretrained("resnet")
    x = zoo.load_eval_split()[2][:2]
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(evaluate.residual_cancellation_study(model, model.layer2, x, 0.26,
                                                             methods=("rlrp", "lrp0")))
    finally:
        torch.set_num_threads(threads)
    for key, stats in runs[0].items():
        for name, value in stats.items():
            other = runs[1][key][name]
            assert torch.equal(value.nan_to_num(-1), other.nan_to_num(-1)), (key, name)
