"""``python -m bench``: forward, gradient × input, rlrp_fast and its peers side by side.

For each model × batch, every method that passed the correctness gate (``bench/checks.py``)
is timed INTERLEAVED (round-robin: call 1 of every method, then call 2 of every method, …,
the starting method rotating each round) after one warm-up round; the table gives the median,
images/s and the ratio to gradient × input measured in the same rounds. Peak memory comes from
one fresh process per method (``python -m bench.memory``). One table is printed and the same
numbers are written as JSON.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .checks import check
from .methods import DEFAULT_METHODS, METHODS, QUICK_METHODS, _sync
from .models import MODELS, SPECS, build

ROOT = Path(__file__).resolve().parents[1]
CPU_BATCHES = (1, 8, 32)
CUDA_BATCHES = (1, 32, 256)


# -- the machine -----------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            # other jobs on the cores slow every row: a busy machine shows here
            "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f
                                if line.startswith("model name")), platform.processor())
    except OSError:
        info["cpu"] = platform.processor() or platform.machine()
    for name in ("zennit", "captum", "torchvision"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- timing ----------------------------------------------------------------------------------
def _libc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()
# Calls shorter than this work at sizes where the freed heap costs nothing to keep, and a
# gc pass between millisecond calls would only cool the caches they run in.
_RELEASE_AFTER_S = 0.5


def release_memory(fns: dict) -> None:
    """Between timed calls, outside the clock: drop what a method keeps from its last call
    (``fn.release``) and hand freed heap back to the system. One process holds every method
    of a cell; without this, each method's freed peak stays resident (glibc keeps freed
    blocks under 32 MB) and VGG16 at batch 32 — zennit 12.6 GB, Captum 8.8 GB peaks — ran
    the 24 GiB machine out of memory."""
    for fn in fns.values():
        if hasattr(fn, "release"):
            fn.release()
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def time_interleaved(fns: dict, x: torch.Tensor, reps: int, device: torch.device,
                     budget_s: float | None = None, min_reps: int = 3,
                     min_time_s: float = 1.0, max_reps: int = 50,
                     cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each ``fns[key](x)``, measured round-robin after warm-up.

    Runs ``reps`` rounds; rounds that take milliseconds continue until ``min_time_s`` has
    passed (at most ``max_reps``). With ``budget_s``, stops after the round that exhausts it
    (never before ``min_reps`` rounds). With ``cpu_times``, each call's process CPU seconds
    (``time.process_time``, all threads) go there too: on a shared machine they show what the
    wall time gained by waiting for a core."""
    keys = list(fns)
    start = time.perf_counter()
    warm = 0
    while warm < 1 or (warm < 5 and time.perf_counter() - start < min_time_s / 2):
        for key in keys:
            t0 = time.perf_counter()
            fns[key](x)
            if device.type == "cpu" and time.perf_counter() - t0 > _RELEASE_AFTER_S:
                release_memory(fns)
        _sync(device)
        warm += 1
    times: dict[str, list[float]] = {k: [] for k in keys}
    start = time.perf_counter()
    r = 0
    while r < reps or (r < max_reps and time.perf_counter() - start < min_time_s):
        for i in range(len(keys)):
            key = keys[(r + i) % len(keys)]
            _sync(device)
            c0 = time.process_time()
            t0 = time.perf_counter()
            out = fns[key](x)
            _sync(device)
            times[key].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(key, []).append(time.process_time() - c0)
            del out
            if device.type == "cpu" and times[key][-1] > _RELEASE_AFTER_S:
                release_memory(fns)
        r += 1
        if (budget_s is not None and r >= min_reps
                and time.perf_counter() - start > budget_s):
            break
    return times


def memory_of(model: str, key: str, batch: int, device: torch.device, dtype: str,
              timeout: float = 1800) -> dict:
    """``bench.memory`` in a fresh process; ``{"error": ...}`` when it fails."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "bench.memory", "--model", model, "--method", key,
           "--batch", str(batch), "--device", device.type, "--dtype", dtype]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the run ---------------------------------------------------------------------------------
def run(models, batches, keys, reps, device, dtype, memory=True, check_size=None,
        budget_s=None, log=print) -> list[dict]:
    """All rows of the table (one per model × batch × method)."""
    dtype_t = getattr(torch, dtype)
    rows = []
    for name in models:
        spec = SPECS[name]
        model = build(name).to(device)
        available, skipped = [], {}
        for key in keys:
            reason = METHODS[key].skip_reason(device)
            if reason is None:
                available.append(key)
            else:
                skipped[key] = f"skipped: {reason}"
        size = check_size if check_size and name != "digits" else None
        x_check = spec.inputs(2, seed=123, size=size).to(device)
        t0 = time.perf_counter()
        statuses = check(model, spec, available, x_check, dtype_t)
        log(f"[{name}] checked {len(available)} methods on {tuple(x_check.shape)} in "
            f"{time.perf_counter() - t0:.0f}s: " + ", ".join(
                f"{k}={s}" for k, (s, _) in statuses.items()))
        timed = [k for k in available if statuses[k][0] == "ok"]
        for batch in batches:
            x = spec.inputs(batch, seed=batch).to(device)
            fns = {}
            for key in timed:
                m = METHODS[key]
                # peers hook (and Captum edits) the model they get: each gets its own copy;
                # our engine and the floor only read it
                own = copy.deepcopy(model) if m.family in ("zennit", "captum") else model
                fns[key] = m.setup(own, spec, device,
                                   dtype_t if m.ours_dtype else torch.float32)
            t0 = time.perf_counter()
            cpu: dict[str, list[float]] = {}
            times = time_interleaved(fns, x, reps, device, budget_s, cpu_times=cpu)
            for fn in fns.values():
                if hasattr(fn, "attributor"):
                    fn.attributor.__exit__(None, None, None)
            del fns
            release_memory({})
            log(f"[{name} b={batch}] timed {len(timed)} methods × {len(times[timed[0]]) if timed else 0} "
                f"rounds in {time.perf_counter() - t0:.0f}s")
            mems = {}
            if memory:
                for key in timed:
                    mems[key] = memory_of(name, key, batch, device, dtype)
                log(f"[{name} b={batch}] memory measured")
            gxi_t = statistics.median(times["gxi"]) if "gxi" in times else None
            gxi_m = mems.get("gxi", {}).get("peak_mb")
            for key in keys:
                status = skipped.get(key) or statuses[key][0]
                row = {"model": name, "batch": batch, "method": key,
                       "label": METHODS[key].label, "status": status,
                       "error": statuses.get(key, (None, None))[1],
                       "dtype": dtype if METHODS[key].ours_dtype else "float32"}
                if key in times:
                    med = statistics.median(times[key])
                    row.update(median_ms=med * 1e3, reps=len(times[key]),
                               times_ms=[t * 1e3 for t in times[key]],
                               images_per_s=batch / med,
                               x_gxi=med / gxi_t if gxi_t else None)
                    if key in cpu:
                        row["cpu_ms"] = statistics.median(cpu[key]) * 1e3
                mem = mems.get(key, {})
                if "peak_mb" in mem:
                    row.update(peak_mb=mem["peak_mb"], state_mb=mem["state_mb"],
                               x_gxi_mem=mem["peak_mb"] / gxi_m if gxi_m else None)
                elif "error" in mem:
                    row["memory_error"] = mem["error"]
                rows.append(row)
    return rows


# -- output ----------------------------------------------------------------------------------
COLUMNS = [("model", "model", "{}"), ("batch", "batch", "{}"), ("label", "method", "{}"),
           ("status", "status", "{}"), ("median_ms", "median ms", "{:.1f}"),
           ("cpu_ms", "CPU ms", "{:.1f}"), ("reps", "n", "{}"), ("images_per_s", "images/s", "{:.2f}"),
           ("x_gxi", "× g×i", "{:.2f}"), ("peak_mb", "peak MB", "{:.0f}"),
           ("state_mb", "of it state MB", "{:.0f}"), ("x_gxi_mem", "× g×i mem", "{:.2f}")]


def table(rows: list[dict]) -> str:
    """The rows as a text table; a column no row has a value for (memory, in --quick or with
    --no-memory) is left out."""
    columns = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows)]
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([("" if row.get(k) is None else f.format(row[k])[:70])
                      for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = []
    for j, c in enumerate(cells):
        lines.append(" | ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        if j == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def header(info: dict, device: torch.device, dtype: str, command: str,
           memory: bool = True) -> str:
    lines = [f"machine: {info['cpu']}, {info['cores']} cores, torch threads {info['threads']}"
             + (f", load average {info['load']:.1f} at start" if info["load"] is not None
                else "")
             + (f", GPU {info['gpu']}" if "gpu" in info else ""),
             f"versions: python {info['python']}, torch {info['torch']}, torchvision "
             f"{info['torchvision']}, zennit {info['zennit']}, captum {info['captum']}",
             f"device: {device}, our methods in {dtype} (the others float32)",
             f"command: {command}",
             "median of n interleaved calls after a warm-up round; × g×i: time ratio to "
             "gradient × input in the same rounds; CPU ms: the median call's process CPU time "
             "(time.process_time)"
             + ("; peak MB: peak above model+input, one fresh process per method (state: what "
                "set-up keeps)" if memory else "")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="input dtype of our methods (the peers and the floor stay float32)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int,
                   help="default: 1 8 32 on CPU, 1 32 256 on CUDA")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: " +
                   " ".join(DEFAULT_METHODS))
    p.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per model × batch: stop after the round that exhausts it "
                        "(at least 3 rounds)")
    p.add_argument("--check-size", type=int, default=None,
                   help="image side for the correctness check of the 224×224 models "
                        "(default: 224)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    p.add_argument("--quick", action="store_true",
                   help="reduced set, about a minute on an idle 2-core CPU (several "
                        "minutes when other jobs share the cores): batch 1 "
                        "(digits 1 and 8), 3 rounds, the floor + R-LRP + zennit EpsilonPlus, "
                        "check at 64×64, no memory processes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for this process (default: torch's own)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    keys = a.methods or list(QUICK_METHODS if a.quick else DEFAULT_METHODS)
    for required in ("gxi",):
        if required not in keys:
            keys.insert(0, required)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine(device)
    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if a.quick:
        rows = []
        for name in a.models:
            batches = a.batches or ([1, 8] if name == "digits" else [1])
            rows += run([name], batches, keys, min(a.reps, 3), device, a.dtype,
                        memory=False, check_size=a.check_size or 64,
                        budget_s=a.budget, log=log)
    else:
        batches = a.batches or list(CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES)
        rows = run(a.models, batches, keys, a.reps, device, a.dtype, memory=not a.no_memory,
                   check_size=a.check_size, budget_s=a.budget, log=log)
    elapsed = time.perf_counter() - t0
    print(header(info, device, a.dtype, command,
                 memory=any(row.get("peak_mb") is not None for row in rows)))
    print(table(rows))
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"({elapsed:.0f} s" + (f"; load average {load_end:.1f} at the end" if load_end
                                 is not None else "") + ")")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"machine": info, "device": str(device), "dtype": a.dtype,
                   "command": command, "elapsed_s": elapsed, "load_end": load_end,
                   "rows": rows}, f, indent=1)
    return 0
