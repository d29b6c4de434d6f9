"""R-LRP on CPU: the ``cpp`` backend vs the ``torch`` backend vs gradient × input.

Times the three side by side (interleaved, one call of each per round, after warm-up) on
torchvision VGG16 and ResNet50 (random weights, eval) at 224×224, and prints medians and
ratios. ``--profile`` adds a torch.profiler table of one cpp call per model (where the time
goes). Not a test: numbers depend on the machine and its load, which is printed too.

    python bench/cpp_vs_torch.py                      # batch 1 and 8, both models
    python bench/cpp_vs_torch.py --batches 1 --reps 9 --profile
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torchvision

import rlrp_fast
from rlrp_fast.backends import unavailable_reason

METHODS = {  # label -> Explainer keyword arguments
    "rlrp-cpp": {"rule": "rlrp", "backend": "cpp"},
    "rlrp-torch": {"rule": "rlrp", "backend": "torch"},
    "grad×input": {"rule": "gradient_x_input"},
}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def bench_model(name: str, batch: int, reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per explain() call for each method."""
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    explainers = {k: rlrp_fast.Explainer(model, **kw) for k, kw in METHODS.items()}
    for _ in range(warmup):
        for e in explainers.values():
            e(x)
    times: dict[str, list[float]] = {k: [] for k in explainers}
    for _ in range(reps):  # interleaved: drifting machine load hits every method alike
        for k, e in explainers.items():
            start = time.perf_counter()
            e(x)
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def profile_model(name: str, batch: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    e = rlrp_fast.Explainer(model, rule="rlrp", backend="cpp")
    e(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        e(x)
    print(f"\n## profile: {name}, batch {batch}, rlrp-cpp (self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--reps", type=int, default=7, help="timed rounds at batch 1")
    parser.add_argument("--reps-large", type=int, default=5, help="timed rounds at batch > 1")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    reason = unavailable_reason("cpp")
    if reason is not None:
        raise SystemExit(f"the cpp backend is unavailable: {reason}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {_cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads; load average at start: {_load()}")
    print(f"{'model':<9} {'batch':>5} " + " ".join(f"{k:>12}" for k in METHODS)
          + f" {'cpp/torch':>10} {'cpp/gxi':>8}")
    for name in args.models:
        for batch in args.batches:
            reps = args.reps if batch == 1 else args.reps_large
            med = bench_model(name, batch, reps, args.warmup)
            cells = " ".join(f"{med[k] * 1e3:>9.1f} ms" for k in METHODS)
            print(f"{name:<9} {batch:>5} {cells} {med['rlrp-cpp'] / med['rlrp-torch']:>10.3f} "
                  f"{med['rlrp-cpp'] / med['grad×input']:>8.3f}", flush=True)
    print(f"# medians of interleaved rounds after {args.warmup} warm-up rounds; "
          f"load average at end: {_load()}")
    if args.profile:
        for name in args.models:
            profile_model(name, args.batches[0], rows=12)


if __name__ == "__main__":
    main()
