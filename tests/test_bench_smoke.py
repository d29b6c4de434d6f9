"""The benchmark instruments must not silently rot: run each on the digits model at tiny
settings and check the structure and the guards — never the timings."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds bench/

import torch  # noqa: E402

import bench.cli_throughput as cli_throughput  # noqa: E402
import bench.multi_target as multi_target  # noqa: E402
from bench.methods import METHODS  # noqa: E402
from bench.run import memory_of, run, table  # noqa: E402

requires_zennit = pytest.mark.skipif(importlib.util.find_spec("zennit") is None,
                                     reason="zennit is not installed")

KEYS = ["forward", "gxi", "rlrp-torch", "rlrp-cpp", "rlrp-compiled", "neuron-torch",
        "neuron-cpp", "EpsilonPlus", "zennit-EpsilonPlus", "zennit-EpsilonGammaBox"]


@requires_zennit
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


def _markdown_rows(text: str) -> list[dict[str, str]]:
    """The Markdown table in ``text`` as one dict per row (header -> cell)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[2:]]


def test_multi_target_bench_on_digits(capsys):
    assert multi_target.main(["--models", "digits", "--ks", "1", "2", "--reps", "2",
                              "--batch", "8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch " + torch.__version__ in out and "load average" in out
    rows = _markdown_rows(out)
    assert [(r["model"], r["N"], r["K"]) for r in rows] == [("digits", "8", "1"),
                                                            ("digits", "8", "2")]
    for row in rows:
        assert int(row["n"]) >= 2
        for column in ("(a) R-LRP, 1 call ms", "(b) R-LRP, K calls ms", "(c) g×i, 1 call ms",
                       "(d) g×i, K calls ms", "(b)/(a)", "(d)/(c)", "(a)/(c)"):
            assert float(row[column]) > 0, (column, row)


def test_multi_target_check_refuses_a_wrong_fast_path(monkeypatch):
    model = multi_target.build_model("digits")
    assert multi_target.check("digits", model, 2)["R-LRP"] <= multi_target.CHECK_TOLERANCE
    right = multi_target.one_call

    def off_by_1e_8(explainer, targets):
        fn = right(explainer, targets)
        return lambda x: fn(x) * (1 + 1e-8)
    monkeypatch.setattr(multi_target, "one_call", off_by_1e_8)
    with pytest.raises(multi_target.MismatchError, match="K=2, R-LRP: one call with K targets "
                       "differs from K separate calls by 1.00e-08"):
        multi_target.check("digits", model, 2)


def test_cli_throughput_on_digits(capsys):
    assert cli_throughput.main(["--models", "digits", "--n-images", "8", "--top-k", "2",
                                "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "load average" in out
    rows = _markdown_rows(out)
    assert [r["--format"] for r in rows] == ["npy", "png,npy"]
    for row in rows:
        assert (row["model"], row["images"], row["K"]) == ("digits", "8", "2")
        wall, loop = float(row["CLI wall s"]), float(row["CLI loop s"])
        assert wall >= loop > 0 and float(row["explainer alone s"]) > 0
        assert float(row["CLI loop images/s"]) > 0 and float(row["explainer / CLI loop"]) > 0


def test_cli_throughput_output_check_catches_missing_outputs(tmp_path):
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    out = tmp_path / "out"
    out.mkdir()
    records = []
    for image in images:
        outputs = [f"{image.stem}.top{j}-c{j}.npy" for j in (1, 2)]
        for name in outputs:
            (out / name).write_bytes(b"x")
        records.append({"file": str(image), "outputs": outputs})
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cli_throughput.verify_outputs(out, images, "npy", top_k=2)
    with pytest.raises(cli_throughput.OutputError, match="0 .png outputs for top-2"):
        cli_throughput.verify_outputs(out, images, "png,npy", top_k=2)
    (out / "b.top2-c2.npy").unlink()
    with pytest.raises(cli_throughput.OutputError, match="output b.top2-c2.npy is missing"):
        cli_throughput.verify_outputs(out, images, "npy", top_k=2)
    (out / "b.top2-c2.npy").write_bytes(b"x")
    (out / "predictions.jsonl").write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(cli_throughput.OutputError, match="1 records for 2 images"):
        cli_throughput.verify_outputs(out, images, "npy", top_k=2)
