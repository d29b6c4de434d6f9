"""``python -m bench.multi_target``: K classes per sample in one call against K separate calls.

For each model and K, four ways to get K maps per sample for the same K classes (each
sample's K highest logits, fixed before timing) are timed INTERLEAVED after a warm-up round
(``bench.run.time_interleaved``):

(a) R-LRP, K targets in one call: ``explain(x, target=(N, K))`` — one forward, one batched
    relevance pass of N·K rows;
(b) R-LRP, K separate calls ``explain(x, target=targets[:, k])``;
(c) gradient × input, K targets in one call (one forward, autograd's batched gradients,
    ``is_grads_batched=True``);
(d) gradient × input, K separate calls.

Before any timing, (a) must equal (b) and (c) must equal (d) in float64 on a small batch
(relative error 1e-10), so that a wrong fast path cannot post a time. The table gives the
medians and the ratios (b)/(a), (d)/(c) and (a)/(c), all from the same rounds.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

import rlrp_fast

from .models import SPECS
from .run import time_interleaved

MODELS = ("digits", "resnet50")
DEFAULT_BATCH = {"digits": 8, "resnet50": 2}
DEFAULT_KS = (1, 5, 10)
CHECK_BATCH = 2
CHECK_TOLERANCE = 1e-10


class MismatchError(AssertionError):
    """A K-target call disagrees with the K separate calls: its time would mean nothing."""


def build_model(name: str) -> nn.Module:
    """The digits demo CNN (trained, shipped weights) or torchvision's ResNet50 as the CLI
    builds it (``weights=None``), in eval mode, float32, on CPU."""
    if name == "digits":
        from rlrp_fast.digits import load_pretrained
        return load_pretrained().eval()
    if name == "resnet50":
        import torchvision
        return torchvision.models.resnet50(weights=None).eval()
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def top_targets(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, K)``: each sample's K highest logits, the classes every method explains."""
    with torch.inference_mode():
        logits = model(x)
    if k > logits.shape[1]:
        raise ValueError(f"K={k} exceeds the model's {logits.shape[1]} classes")
    return logits.topk(k, dim=1).indices


def one_call(explainer: rlrp_fast.Explainer, targets: torch.Tensor):
    """K maps per sample from one call: ``(N, K, ...)``."""
    def fn(x):
        return explainer.explain(x, target=targets).relevance
    return fn


def separate_calls(explainer: rlrp_fast.Explainer, targets: torch.Tensor):
    """K maps per sample from K calls, stacked as ``(N, K, ...)``."""
    def fn(x):
        return torch.stack([explainer.explain(x, target=targets[:, k]).relevance
                            for k in range(targets.shape[1])], dim=1)
    return fn


def methods(model: nn.Module, targets: torch.Tensor) -> dict:
    """The four timed callables, keyed a, b, c, d (see the module docstring)."""
    rlrp = rlrp_fast.Explainer(model, rule="rlrp")
    gxi = rlrp_fast.Explainer(model, rule="gradient_x_input")
    return {"a": one_call(rlrp, targets), "b": separate_calls(rlrp, targets),
            "c": one_call(gxi, targets), "d": separate_calls(gxi, targets)}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def check(name: str, model: nn.Module, k: int, batch: int = CHECK_BATCH) -> dict[str, float]:
    """Raise :class:`MismatchError` unless one K-target call equals K separate calls, for
    R-LRP and for gradient × input, in float64; return the two relative errors."""
    model64 = copy.deepcopy(model).double()
    x = SPECS[name].inputs(batch, seed=7).double()
    targets = top_targets(model64, x, k)
    fns = methods(model64, targets)
    errors = {}
    for fast, slow, what in (("a", "b", "R-LRP"), ("c", "d", "gradient × input")):
        one, many = fns[fast](x), fns[slow](x)
        if one.shape != many.shape:
            raise MismatchError(f"{name}, K={k}, {what}: one call gave shape "
                                f"{tuple(one.shape)}, K separate calls {tuple(many.shape)}")
        err = relative_error(one, many)
        if not err <= CHECK_TOLERANCE:  # also catches NaN
            raise MismatchError(f"{name}, K={k}, {what}: one call with K targets differs "
                                f"from K separate calls by {err:.2e} (relative, float64; "
                                f"allowed {CHECK_TOLERANCE:.0e})")
        errors[what] = err
    return errors


def run(models, ks, reps: int, batch: int | None = None, log=print) -> list[dict]:
    """One row per model × K: medians (ms) of a, b, c, d and their ratios."""
    rows = []
    cpu = torch.device("cpu")
    for name in models:
        model = build_model(name)
        n = batch or DEFAULT_BATCH[name]
        for k in ks:  # every K before any time: K = 1 and K > 1 take different paths
            t0 = time.perf_counter()
            errors = check(name, model, k)
            log(f"[{name} K={k}] one call == K calls in float64 (R-LRP "
                f"{errors['R-LRP']:.1e}, gradient × input {errors['gradient × input']:.1e}) "
                f"in {time.perf_counter() - t0:.0f} s")
        x = SPECS[name].inputs(n, seed=n)
        for k in ks:
            fns = methods(model, top_targets(model, x, k))
            t0 = time.perf_counter()
            times = time_interleaved(fns, x, reps, cpu)
            med = {key: statistics.median(t) * 1e3 for key, t in times.items()}
            rows.append({"model": name, "batch": n, "k": k, "rounds": len(times["a"]),
                         **{f"{key}_ms": v for key, v in med.items()},
                         "b_over_a": med["b"] / med["a"], "d_over_c": med["d"] / med["c"],
                         "a_over_c": med["a"] / med["c"],
                         "maps_per_s": n * k / (med["a"] / 1e3)})
            log(f"[{name} N={n} K={k}] {len(times['a'])} rounds in "
                f"{time.perf_counter() - t0:.0f} s")
    return rows


COLUMNS = [("model", "model", "{}"), ("batch", "N", "{}"), ("k", "K", "{}"),
           ("a_ms", "(a) R-LRP, 1 call ms", "{:.1f}"),
           ("b_ms", "(b) R-LRP, K calls ms", "{:.1f}"),
           ("b_over_a", "(b)/(a)", "{:.2f}"),
           ("c_ms", "(c) g×i, 1 call ms", "{:.1f}"),
           ("d_ms", "(d) g×i, K calls ms", "{:.1f}"),
           ("d_over_c", "(d)/(c)", "{:.2f}"),
           ("a_over_c", "(a)/(c)", "{:.2f}"),
           ("maps_per_s", "(a) maps/s", "{:.1f}"),
           ("rounds", "n", "{}")]


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if k in ("model",) else "---:" for k, _, _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(f.format(row[k]) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.multi_target",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--batch", type=int, default=None,
                   help="samples per batch for every model (default: digits "
                        f"{DEFAULT_BATCH['digits']}, resnet50 {DEFAULT_BATCH['resnet50']})")
    p.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS),
                   help="classes per sample (default: 1 5 10)")
    p.add_argument("--reps", type=int, default=5,
                   help="timed rounds at least (calls of milliseconds run on to 1 s, at most "
                        "50 rounds; default 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own choice)")
    a = p.parse_args(argv)
    if a.batch is not None and a.batch < 1:
        p.error(f"--batch must be positive, got {a.batch}")
    if any(k < 1 for k in a.ks):
        p.error(f"--ks must be positive, got {a.ks}")
    if a.reps < 1:
        p.error(f"--reps must be positive, got {a.reps}")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be positive, got {a.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads or threads)
    try:
        return _report(a, argv)
    finally:  # main may run inside another program (the smoke test): leave its threads be
        torch.set_num_threads(threads)


def _report(a: argparse.Namespace, argv: list[str] | None) -> int:
    command = "python -m bench.multi_target " + " ".join(
        argv if argv is not None else sys.argv[1:])
    load_before = _load()
    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = run(a.models, a.ks, a.reps, a.batch, log=log)
    elapsed = time.perf_counter() - t0
    print(f"command: `{command.strip()}`")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores; load average (1, 5, 15 min) before {load_before}, "
          f"after {_load()}; {elapsed:.0f} s")
    print("medians of n interleaved rounds after a warm-up round; the same K classes per "
          "sample (its K highest logits) in every column; (a) == (b) and (c) == (d) checked "
          f"in float64 (relative {CHECK_TOLERANCE:.0e}) before timing")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
