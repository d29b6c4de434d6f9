"""``python -m bench.cli_throughput``: ``rlrp-fast explain`` end to end against the explainer alone.

Per model, random PNG images (224×224 RGB for ResNet50, the digits model's 32×32 grey for
digits) are written to a temporary folder; then, in fresh processes with the same thread
setting:

- the explainer alone: the same files decoded and preprocessed by the CLI's own
  ``Preprocess`` into memory first (untimed), then explained batch by batch with the CLI's
  own call (``pipeline.explain_targets``) — what the CLI would cost with nothing else to do;
- ``rlrp-fast explain`` in a subprocess, once per output format (``npy``; ``png,npy``, the
  default: heatmap figures too), timed by the wall clock around the process (start-up,
  imports and model building included) and by the CLI's own summary line (its loop only:
  decoding in the DataLoader workers, explaining, writing on the writer thread).

Every CLI run must have written one file per image, target and format and one record per
image, without errors, before its times are reported.

The digits CNN is the CLI's ``--model digits`` (its own preprocessing: grey 32×32 in [0, 1]).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("digits", "resnet50")
DEFAULT_BATCH = {"digits": 64, "resnet50": 16}
FORMATS = ("npy", "png,npy")

# The CLI's options per model beyond IMAGES, --model and the run's own settings, written out
# (for digits they are --model digits' defaults: 32×32 grey in [0, 1]); the explainer-alone
# run preprocesses by them.
CLI_OPTIONS = {"digits": ["--size", "32", "--no-normalize"], "resnet50": ["--size", "224"]}
IMAGE_SHAPE = {"digits": (32, 32), "resnet50": (224, 224, 3)}  # as PIL writes them

SUMMARY = re.compile(r"explained (\d+) images \(top-(\d+)\), (\d+) errors, (\d+) already done, "
                     r"in ([\d.]+) s: ([\d.]+) images/s")


class OutputError(AssertionError):
    """A CLI run did not write what it should have: its time would mean nothing."""


# -- inputs ----------------------------------------------------------------------------------
def write_images(folder: Path, model: str, n: int, seed: int = 0) -> list[Path]:
    """``n`` random PNG files of the model's input size in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=IMAGE_SHAPE[model], dtype=np.uint8)
        path = folder / f"img{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def load_model(model: str):
    """The model exactly as the CLI run gets it (eval mode, CPU)."""
    from rlrp_fast import pipeline
    return pipeline.load_model(model)[0]


# -- the explainer alone (in a fresh process) ------------------------------------------------
def explainer_alone(model: str, files: list[str], batch_size: int, top_k: int,
                    threads: int | None) -> dict:
    """Seconds to explain ``files`` (decoded and preprocessed into memory first, untimed)
    batch by batch as the CLI does, including the first call's trace verification."""
    import torch

    from rlrp_fast import Explainer, pipeline

    if threads is not None:
        torch.set_num_threads(threads)
    net = load_model(model)
    explainer = Explainer(net, rule="rlrp")
    options = CLI_OPTIONS[model]
    size = int(options[options.index("--size") + 1])
    shape = IMAGE_SHAPE[model]
    channels = shape[2] if len(shape) == 3 else 1
    if "--no-normalize" in options:
        preprocess = pipeline.Preprocess(size, None, None, channels)
    else:
        preprocess = pipeline.Preprocess(size, pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD,
                                         channels)
    images = torch.stack([preprocess(f) for f in files])
    t0 = time.perf_counter()
    for start in range(0, len(files), batch_size):
        logits, targets, relevance = pipeline.explain_targets(
            explainer, images[start:start + batch_size], top_k)
        if relevance.shape[:2] != (logits.shape[0], top_k):
            raise OutputError(f"explain_targets gave relevance {tuple(relevance.shape)} for "
                              f"{logits.shape[0]} images and top-{top_k}")
    return {"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}


def run_explainer_alone(model: str, files: list[str], batch_size: int, top_k: int,
                        threads: int | None) -> dict:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as the CLI gets
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(explainer_alone, model, files, batch_size, top_k, threads).result()


# -- the CLI (a subprocess) ------------------------------------------------------------------
def cli_command(model: str, images: Path, out: Path, formats: str, batch_size: int,
                workers: int, top_k: int) -> list[str]:
    args = ["explain", str(images), "--model", model, *CLI_OPTIONS[model], "--out", str(out),
            "--format", formats, "--batch-size", str(batch_size), "--workers", str(workers),
            "--top-k", str(top_k), "--quiet"]
    return [sys.executable, "-m", "rlrp_fast", *args]


def run_cli(cmd: list[str], threads: int | None, timeout: float) -> dict:
    """Wall seconds of the process and the numbers of its summary line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the CLI process
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise OutputError(f"the CLI exited with {done.returncode}: "
                          f"{done.stderr.strip()[-2000:]}")
    match = SUMMARY.search(done.stdout)
    if match is None:
        raise OutputError(f"no summary line in the CLI's output: {done.stdout[-500:]!r}")
    images, top_k, errors, skipped = (int(match.group(i)) for i in range(1, 5))
    return {"wall_s": wall, "images": images, "top_k": top_k, "errors": errors,
            "skipped": skipped, "summary_s": float(match.group(5)),
            "summary_images_per_s": float(match.group(6)), "stderr": done.stderr}


def verify_outputs(out: Path, files: list[Path], formats: str, top_k: int) -> None:
    """One record per image in ``predictions.jsonl`` naming ``top_k`` outputs per format,
    every one of them a non-empty file, and no other output file."""
    lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    records = {os.path.abspath(r["file"]): r for r in map(json.loads, lines)}
    missing = [f for f in files if os.path.abspath(f) not in records]
    if missing or len(lines) != len(files):
        raise OutputError(f"{out}/predictions.jsonl has {len(lines)} records for "
                          f"{len(files)} images ({len(missing)} images without one)")
    suffixes = ["." + f for f in formats.split(",")]
    for file, record in records.items():
        for suffix in suffixes:
            named = [p for p in record["outputs"] if p.endswith(suffix)]
            if len(named) != top_k:
                raise OutputError(f"{file}: {len(named)} {suffix} outputs for top-{top_k}")
        for p in record["outputs"]:
            if not (out / p).is_file() or (out / p).stat().st_size == 0:
                raise OutputError(f"{file}: output {p} is missing or empty")
    for suffix in suffixes:
        written = sum(1 for _ in out.rglob("*" + suffix))
        if written != len(files) * top_k:
            raise OutputError(f"{out} holds {written} {suffix} files for {len(files)} images "
                              f"× top-{top_k}")


# -- the run ---------------------------------------------------------------------------------
def run(models, n_images: int, top_k: int, workers: int, batch: int | None,
        threads: int | None, formats=FORMATS, timeout: float = 3600, log=print) -> list[dict]:
    """One row per model × output format, with the explainer alone beside it."""
    rows = []
    for model in models:
        batch_size = batch or DEFAULT_BATCH[model]
        with tempfile.TemporaryDirectory(prefix=f"rlrp-cli-{model}-") as tmp:
            images = Path(tmp) / "images"
            files = write_images(images, model, n_images)
            alone = run_explainer_alone(model, [str(f) for f in files], batch_size, top_k,
                                        threads)
            log(f"[{model}] explainer alone: {alone['seconds']:.1f} s")
            for fmt in formats:
                out = Path(tmp) / ("out-" + fmt.replace(",", "-"))
                cli = run_cli(cli_command(model, images, out, fmt, batch_size, workers, top_k),
                              threads, timeout)
                if (cli["images"], cli["top_k"], cli["errors"], cli["skipped"]) != \
                        (n_images, top_k, 0, 0):
                    raise OutputError(f"[{model} {fmt}] the CLI explained {cli['images']} "
                                      f"images (top-{cli['top_k']}) with {cli['errors']} "
                                      f"errors, {cli['skipped']} skipped; expected "
                                      f"{n_images} (top-{top_k}), none")
                verify_outputs(out, files, fmt, top_k)
                log(f"[{model} {fmt}] CLI: {cli['wall_s']:.1f} s wall, "
                    f"{cli['summary_s']:.1f} s its loop")
                rows.append({
                    "model": model, "images": n_images, "top_k": top_k,
                    "batch": batch_size, "workers": workers, "formats": fmt,
                    "threads": alone["threads"],
                    "wall_s": cli["wall_s"], "wall_images_per_s": n_images / cli["wall_s"],
                    "summary_s": cli["summary_s"],
                    "summary_images_per_s": cli["summary_images_per_s"],
                    "alone_s": alone["seconds"],
                    "alone_images_per_s": n_images / alone["seconds"],
                    # the CLI rounds its loop time to 0.1 s: a tiny run may read 0
                    "alone_share": (alone["seconds"] / cli["summary_s"]
                                    if cli["summary_s"] > 0 else math.nan)})
    return rows


COLUMNS = [("model", "model", "{}"), ("images", "images", "{}"), ("top_k", "K", "{}"),
           ("batch", "batch", "{}"), ("workers", "workers", "{}"),
           ("formats", "--format", "{}"),
           ("wall_s", "CLI wall s", "{:.2f}"),
           ("wall_images_per_s", "CLI wall images/s", "{:.1f}"),
           ("summary_s", "CLI loop s", "{:.2f}"),
           ("summary_images_per_s", "CLI loop images/s", "{:.1f}"),
           ("alone_s", "explainer alone s", "{:.2f}"),
           ("alone_images_per_s", "explainer alone images/s", "{:.1f}"),
           ("alone_share", "explainer / CLI loop", "{:.2f}")]


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if k in ("model", "formats") else "---:"
                            for k, _, _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(f.format(row[k]) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cli_throughput",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--n-images", type=_positive, default=512, help="(default: %(default)s)")
    p.add_argument("--top-k", type=_positive, default=1, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="CLI --batch-size and the explainer's batch (default: digits "
                        f"{DEFAULT_BATCH['digits']}, resnet50 {DEFAULT_BATCH['resnet50']})")
    p.add_argument("--workers", type=_non_negative, default=1,
                   help="CLI --workers, DataLoader processes decoding images (default: "
                        "%(default)s: one decoder beside the explaining process on 2 cores)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="one CLI run per value (default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch threads of the explaining processes (default: torch's own)")
    a = p.parse_args(argv)
    command = "python -m bench.cli_throughput " + " ".join(
        argv if argv is not None else sys.argv[1:])
    load_before = _load()
    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = run(a.models, a.n_images, a.top_k, a.workers, a.batch_size, a.threads,
               formats=a.formats, log=log)
    import torch
    print(f"command: `{command.strip()}`")
    print(f"torch {torch.__version__}, {rows[0]['threads']} torch threads in the explaining "
          f"process, {os.cpu_count()} cores; load average (1, 5, 15 min) before "
          f"{load_before}, after {_load()}; {time.perf_counter() - t0:.0f} s")
    print("random PNG images; CLI wall: the whole process (start-up, imports, model build); "
          "CLI loop: its own summary line (decode, explain, write); explainer alone: the same "
          "images preprocessed in memory, the same batches, a fresh process; rule rlrp")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
