"""``norm="neuron"`` against its targets on CPU, by CPU time: R-LRP (both norms, cpp backend),
gradient × input and zennit EpsilonPlus on the same model and batch, interleaved, one thread,
each call timed by the process's CPU clock (``time.process_time``) — on a machine other jobs
share, wall time measures the neighbours; the CPU time a call burns does not (much).

    python -m bench.neuron_cpu --models resnet50 vgg16 --batches 1 8 --reps 3

Prints one Markdown row per model, batch and method: median CPU ms, × gradient × input, and
zennit's time over each method's (the "≥ 2× zennit EpsilonPlus" target reads there).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from .methods import METHODS
from .models import SPECS, build

WAYS = ("gxi", "rlrp-cpp", "neuron-cpp", "zennit-EpsilonPlus")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "vgg16"], choices=list(SPECS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, 1 thread, CPU clock, load {os.getloadavg()[0]:.1f}")
    print("| model | batch | method | median CPU ms | × g×i | zennit EpsilonPlus ÷ this |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        spec, model = SPECS[name], build(name)
        for batch in args.batches:
            x = spec.inputs(batch, seed=0)
            fns = {w: METHODS[w].setup(copy.deepcopy(model), spec, device, torch.float32)
                   for w in args.ways}
            for fn in fns.values():  # warm-up: caches, first-call verification
                fn(x)
            times = {w: [] for w in fns}
            for _ in range(args.reps):
                for w, fn in fns.items():
                    t0 = time.process_time()
                    fn(x)
                    times[w].append(time.process_time() - t0)
            med = {w: statistics.median(v) * 1e3 for w, v in times.items()}
            for w, ms in med.items():
                zen = med.get("zennit-EpsilonPlus")
                print(f"| {name} | {batch} | {METHODS[w].label} | {ms:.0f} | "
                      f"{ms / med['gxi']:.2f} | {'' if zen is None else f'{zen / ms:.2f}'} |",
                      flush=True)
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
