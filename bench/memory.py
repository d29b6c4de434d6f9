"""Peak memory of one method, in a fresh process: ``python -m bench.memory --model M
--method K --batch B [--device cpu|cuda] [--dtype float32|bfloat16]``.

Builds the model and the input batch, then measures from there: sets the method up (an
explainer's prepared weights, a peer's hooks count as the method's memory), runs it twice and
prints one JSON line ``{"peak_mb": …, "state_mb": …}``:

- ``peak_mb``: the peak above the memory held after the model and input were built.
  CPU: peak RSS (VmHWM, reset through ``/proc/self/clear_refs`` after the model is built;
  ``ru_maxrss`` where that is unavailable). CUDA: ``torch.cuda.max_memory_allocated`` delta.
  On CPU, run it with ``MALLOC_MMAP_THRESHOLD_=131072`` (``python -m bench`` does) so that
  glibc returns freed large blocks to the system and RSS follows the live tensors.
- ``state_mb``: what the set-up alone keeps (RSS, or allocated memory, after set-up).
"""
from __future__ import annotations

import argparse
import importlib
import json
import resource

import torch

from .methods import METHODS
from .models import SPECS, build

_MB = 2 ** 20


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(model_name: str, key: str, batch: int, device: str = "cpu",
            dtype: str = "float32") -> dict:
    device = torch.device(device)
    spec = SPECS[model_name]
    method = METHODS[key]
    ours_dtype = getattr(torch, dtype) if method.ours_dtype else torch.float32
    for module in method.imports:  # before the baseline: their code is not working memory
        importlib.import_module(module)
    model = build(model_name).to(device)
    x = spec.inputs(batch, seed=batch).to(device)
    with torch.inference_mode():  # lazy library initialisation is nobody's working memory
        model(x[:1])
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn = method.setup(model, spec, device, ours_dtype)
        state = torch.cuda.memory_allocated() - base
        for _ in range(2):
            r = fn(x)
            del r
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return {"peak_mb": peak / _MB, "state_mb": state / _MB, "how": "cuda allocated"}
    reset = _reset_peak()
    base_kb = _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = method.setup(model, spec, device, ours_dtype)
    state_kb = (_status_kb("VmRSS") or base_kb) - base_kb
    for _ in range(2):
        r = fn(x)
        del r
    peak_kb = (_status_kb("VmHWM") if reset else None) or \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": (peak_kb - base_kb) / 1024, "state_mb": state_kb / 1024,
            "how": "VmHWM after clear_refs" if reset else "ru_maxrss"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SPECS))
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--batch", required=True, type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    print(json.dumps(measure(a.model, a.method, a.batch, a.device, a.dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
