"""The cost of the explainer's safety checks, as ratios to one explanation.

Per call: the model guard (training flags, module tree, storage/version/dtype/device of every
parameter and buffer, contents of the small tensors the plan derived from) and the finite/range
check of the relevance pass. Once per new (shape, dtype, device): trace verification (one
forward of the model). Interleaved medians on the same explainer, after warm-up.

    python -m bench.guards                       # digits and ResNet50, batch 1
    python -m bench.guards --models digits --batches 1 8 --reps 200
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import rlrp_fast

from .models import SPECS, build


def _time(fn, reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(name: str, batch: int, reps: int) -> dict[str, float]:
    model = build(name)
    x = SPECS[name].inputs(batch, seed=0)
    checked = rlrp_fast.Explainer(model)
    unchecked = rlrp_fast.Explainer(model, verify=False)
    checked.explain(x)
    unchecked.explain(x)
    times: dict[str, list[float]] = {"explain": [], "guard": [], "verify": []}
    for _ in range(reps):  # interleaved: one of each per round
        times["explain"].append(_time(lambda: unchecked.explain(x), 1))
        times["guard"].append(_time(checked._guard.check, 1))
        checked._verified.clear()
        start = time.perf_counter()
        checked.explain(x)  # a first call: explanation + verification
        times["verify"].append(time.perf_counter() - start - times["explain"][-1])
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "resnet50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--reps", type=int, default=0, help="default: 200 digits, 15 others")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | batch | explanation (ms) | per-call guard | first-call verification |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.models:
        for batch in args.batches:
            reps = args.reps or (200 if name == "digits" else 15)
            t = measure(name, batch, reps)
            print(f"| {name} | {batch} | {t['explain'] * 1e3:.2f} | "
                  f"{t['guard'] / t['explain']:.3f}x ({t['guard'] * 1e6:.0f} µs) | "
                  f"{t['verify'] / t['explain']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
