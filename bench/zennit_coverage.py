"""``python -m bench.zennit_coverage``: where zennit's EpsilonPlus composite has no rule.

zennit hooks modules by type (Convolution, Linear, BatchNorm, AvgPool, activations, its own
``Sum``); whatever else the model computes (a module of another type, or a function or tensor
method in ``forward``: ``x * scale``, ``x + residual``, ``layer_norm``, attention's matmuls)
gets the plain gradient, silently. For each model this lists, on the model as the benchmark
hands it to zennit (``bench.methods.zennit_canonizers`` applied):

- the modules with a rule that never run as modules (their ``forward`` is bypassed, e.g.
  ``MultiheadAttention.out_proj``, whose weight ``F.multi_head_attention_forward`` reads
  directly): their hook never fires;
- the leaf modules without a rule (those with parameters first);
- the ops outside modules in the ``torch.fx`` graph, by target, with counts;
- conservation of the maps: ``sum R / logit`` and ``‖R‖₁ / |logit|`` per image for zennit
  EpsilonPlus, our R-LRP and gradient × input (the arg-max logit as the start relevance).
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import sys
import time

import torch
import torch.fx as fx
import torch.nn as nn

from .methods import METHODS, zennit_canonizers, zennit_composite
from .models import MODELS, SPECS, build

# ops that move or select elements only (no mixing of values): the plain gradient is exact
_SHAPE_ONLY = {"flatten", "reshape", "view", "permute", "transpose", "contiguous", "size",
               "getitem", "getattr", "expand", "_assert", "dim", "chunk", "split", "squeeze",
               "unsqueeze", "cat", "stack"}


def _name(target) -> str:
    return getattr(target, "__name__", str(target))


def _fx_ops(model: nn.Module) -> dict[str, int]:
    """call_function / call_method targets in the traced forward (leaf modules not entered),
    shape-only ones left out."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001
        return {f"(not traceable: {type(exc).__name__})": 1}
    ops: collections.Counter[str] = collections.Counter()
    for node in graph.nodes:
        if node.op in ("call_function", "call_method"):
            name = _name(node.target)
            if name not in _SHAPE_ONLY:
                ops[name] += 1
    return dict(ops)


def _timed(fn, x, reps: int = 3) -> dict:
    """Median wall and process-CPU milliseconds of ``fn(x)`` after one warm-up call."""
    fn(x)
    wall, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn(x)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": round(statistics.median(wall) * 1e3, 1),
            "cpu": round(statistics.median(cpu) * 1e3, 1)}


def coverage(name: str, batch: int = 2) -> dict:
    spec = SPECS[name]
    model = build(name)
    x = spec.inputs(batch, seed=123)
    out: dict = {"model": name}
    # gradient × input and R-LRP, for the conservation columns
    xg = x.detach().requires_grad_(True)
    logits = model(xg)
    target = logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    (grad,) = torch.autograd.grad(target.sum(), xg)
    maps = {"gxi": (grad * x).detach()}
    maps["rlrp"] = METHODS["rlrp-torch"].setup(model, spec, x.device, torch.float32)(x).detach()

    zmodel = copy.deepcopy(model)
    composite = zennit_composite("EpsilonPlus", spec, zennit_canonizers(zmodel, spec))
    ran: set[str] = set()
    handles = []
    for mname, module in zmodel.named_modules():
        handles.append(module.register_forward_hook(
            lambda m, i, o, mname=mname: ran.add(mname)))
    rules: dict[str, str | None] = {}
    try:
        from zennit.attribution import Gradient

        from .methods import _target_logit
        with Gradient(model=zmodel, composite=composite) as attributor:
            rules = {}
            for mname, module in zmodel.named_modules():
                rule = composite.module_map({}, mname, module)
                rules[mname] = None if rule is None else type(rule).__name__
            _, relevance = attributor(x, _target_logit)
            maps["zennit"] = relevance.detach()
            out["zennit"] = "runs"
            # one call each, warm, for scale only (the gate in bench/checks.py keeps a
            # zennit map that disagrees with ours out of the timed table)
            out["ms_per_call"] = {k: _timed(f, x) for k, f in (
                ("zennit", lambda x: attributor(x, _target_logit)[1]),
                ("gxi", METHODS["gxi"].setup(model, spec, x.device, torch.float32)))}
    except Exception as exc:  # noqa: BLE001
        out["zennit"] = f"crashes: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    for h in handles:
        h.remove()

    unruled: collections.Counter[str] = collections.Counter()
    unruled_params: collections.Counter[str] = collections.Counter()
    ruled_not_run: list[str] = []
    own_params: list[str] = []
    for mname, module in zmodel.named_modules():
        if rules.get(mname) is not None and mname not in ran:
            ruled_not_run.append(f"{mname} ({type(module).__name__})")
        if any(True for _ in module.parameters(recurse=False)) and list(module.children()):
            own_params.append(f"{mname or '<model>'}.{next(n for n, _ in module.named_parameters(recurse=False))} "
                              f"({type(module).__name__})")
        if list(module.children()) or rules.get(mname) is not None:
            continue
        kind = type(module).__name__
        if any(True for _ in module.parameters(recurse=False)):
            unruled_params[kind] += 1
        else:
            unruled[kind] += 1
    out.update(ruled_not_run=ruled_not_run, unruled_with_params=dict(unruled_params),
               unruled_no_params=dict(unruled), params_on_containers=own_params,
               fx_ops=_fx_ops(model))
    t = target.detach().double()
    out["conservation"] = {
        key: {"sum_R/logit": [float(f"{v:.3g}") for v in (m.double().flatten(1).sum(1) / t).tolist()],
              "L1_R/|logit|": [float(f"{v:.3g}") for v in
                               (m.double().flatten(1).abs().sum(1) / t.abs()).tolist()]}
        for key, m in maps.items()}
    out["logit"] = [float(f"{v:.4g}") for v in t.tolist()]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.zennit_coverage",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS,
                   default=["vit_b_16", "convnext_tiny", "efficientnet_b0",
                            "mobilenet_v3_large"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    for name in a.models:
        print(json.dumps(coverage(name, a.batch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
