"""The benchmark instrument must not silently rot: build its table on the digits model
(batch 1, 2 rounds, in-process) and check the structure — never the timings."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("zennit")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds bench/

import torch  # noqa: E402

from bench.methods import METHODS  # noqa: E402
from bench.run import memory_of, run, table  # noqa: E402

KEYS = ["forward", "gxi", "rlrp-torch", "rlrp-cpp", "rlrp-compiled", "neuron-torch",
        "neuron-cpp", "EpsilonPlus", "zennit-EpsilonPlus", "zennit-EpsilonGammaBox"]


def test_bench_table_on_digits():
    rows = run(["digits"], [1], KEYS, reps=2, device=torch.device("cpu"), dtype="float32",
               memory=False, log=lambda msg: None)
    assert [r["method"] for r in rows] == KEYS
    for row in rows:
        if METHODS[row["method"]].backend == "cpp" and row["status"].startswith("skipped:"):
            continue  # the compiled extension is optional
        assert row["status"] == "ok", row
        assert row["reps"] >= 2 and row["median_ms"] > 0 and row["x_gxi"] > 0
    text = table(rows)
    for key in KEYS:
        assert METHODS[key].label in text


def test_bench_memory_process():
    mem = memory_of("digits", "rlrp-torch", 1, torch.device("cpu"), "float32", timeout=300)
    assert "error" not in mem, mem
    assert mem["peak_mb"] >= mem["state_mb"] >= 0
