"""``z = W a + b`` and ``s = |W| |a|`` (what ``norm="neuron"`` adds to a layer) four ways, side by
side on realistic layer shapes:

- ``two``: two ATen calls, ``W a + b`` and ``|W| |a|`` with a cached ``|W|`` (what the torch
  and cpp backends do; on CUDA, two cuDNN/cuBLAS calls),
- ``packed``: one ATen call with ``[W; |W|]`` stacked along the outputs, split after — valid
  only where ``a >= 0`` (after a ReLU, most layers), so the inputs here are ReLU outputs,
- ``triton-fused`` (CUDA): the ``affine_forward_abs`` kernel, both outputs from one launch,
- ``triton-s`` (CUDA): the same kernel writing ``s`` only (``abs`` on load, no copies).

Each way is checked against float64 before it is timed. Interleaved rounds, medians, ratios
to ``two`` in the same run; the load is printed. Not a test.

    python -m bench.affine_forward_abs --clock cpu --threads 1   # CPU, batch 1 and 8
    python -m bench.affine_forward_abs --device cuda --batches 1 32
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

# name: (C_in, C_out, kernel, stride, padding, spatial size[, groups]); kernel 0 is a Linear.
# The depthwise rows take the narrow-group kernel on CUDA.
SHAPES = {
    "resnet50 3x3 64->64 @56": (64, 64, 3, 1, 1, 56),
    "resnet50 1x1 256->64 @56": (256, 64, 1, 1, 0, 56),
    "resnet50 3x3 s2 256->256 @28": (256, 256, 3, 2, 1, 28),
    "resnet50 1x1 1024->256 @14": (1024, 256, 1, 1, 0, 14),
    "resnet50 3x3 512->512 @7": (512, 512, 3, 1, 1, 7),
    "vgg16 3x3 128->128 @112": (128, 128, 3, 1, 1, 112),
    "vgg16 dense 4096->4096": (4096, 4096, 0, 1, 0, 1),
    "efficientnet_b0 dw 3x3 s2 96 @112": (96, 96, 3, 2, 1, 112, 96),
    "mobilenet_v3_large dw 5x5 s2 72 @56": (72, 72, 5, 2, 2, 56, 72),
    "convnext_tiny dw 7x7 96 @56": (96, 96, 7, 1, 3, 56, 96),
}


def _layer(shape, batch, device, seed=0):
    cin, cout, k, stride, padding, size, *grouped = shape
    groups = grouped[0] if grouped else 1
    g = torch.Generator().manual_seed(seed)
    if k == 0:
        a = torch.randn(batch, cin, generator=g).relu()
        w = torch.randn(cout, cin, generator=g) / cin ** 0.5
        conv = None
    else:
        a = torch.randn(batch, cin, size, size, generator=g).relu()
        w = torch.randn(cout, cin // groups, k, k, generator=g) / (cin // groups * k * k) ** 0.5
        conv = dict(stride=stride, padding=padding, groups=groups)
    b = torch.randn(cout, generator=g)
    return a.to(device), w.to(device), b.to(device), conv


def _aten(a, w, b, conv):
    return F.linear(a, w, b) if conv is None else F.conv2d(a, w, b, **conv)


def _ways(a, w, b, conv, device):
    abs_w = w.abs()
    # [W; |W|] per group (a grouped conv's outputs are group-major), split after
    groups = 1 if conv is None else conv["groups"]
    c = w.shape[0]
    per_group = (groups, c // groups)
    packed_w = torch.cat([w.view(*per_group, *w.shape[1:]), abs_w.view(*per_group, *w.shape[1:])],
                         1).view(2 * c, *w.shape[1:])
    packed_b = torch.cat([b.view(per_group), torch.zeros(per_group, device=b.device)], 1).view(-1)

    def packed():
        out = _aten(a, packed_w, packed_b, conv)
        halves = out.unflatten(1, (groups, 2, c // groups))
        return halves[:, :, 0].flatten(1, 2), halves[:, :, 1].flatten(1, 2)

    ways = {
        "two": lambda: (_aten(a, w, b, conv), _aten(a.abs(), abs_w, None, conv)),
        "packed": packed,
    }
    if device.type == "cuda":
        from rlrp_fast.kernels.affine_forward_abs import affine_forward_abs
        geometry = {} if conv is None else dict(stride=(conv["stride"],) * 2,
                                                padding=(conv["padding"],) * 2,
                                                groups=conv["groups"])
        ways["triton-fused"] = lambda: affine_forward_abs(a, w, b, **geometry)
        ways["triton-s"] = lambda: (None, affine_forward_abs(a, w, b, store_z=False,
                                                             **geometry)[1])
    return ways


def _check(ways, a, w, b, conv):
    z64 = _aten(a.double(), w.double(), b.double(), conv)
    s64 = _aten(a.double().abs(), w.double().abs(), None, conv)
    for name, fn in ways.items():
        z, s = fn()
        for got, want, what in ((z, z64, "z"), (s, s64, "s")):
            if got is None:
                continue
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            if err > 1e-3:  # TF32 on CUDA allows ~1e-3; anything beyond is a wrong result
                raise AssertionError(f"{name}: {what} off by {err:.2e} (relative max)")


def _time(ways, device, reps, clock):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in ways.values():  # warm-up (compiles, autotunes)
        fn(), fn()
    sync()
    times = {k: [] for k in ways}
    for _ in range(reps):
        for name, fn in ways.items():
            sync()
            t0 = clock()
            fn()
            sync()
            times[name].append(clock() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the process's CPU time (all threads) — steadier than wall time "
                        "on a shared machine; CPU device only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        p.error("--clock cpu times CPU work only")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"clock {args.clock}, load {os.getloadavg()[0]:.1f}")
    print("| layer | batch | way | median ms | × two |\n| --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for batch in args.batches:
            for label in args.shapes:
                a, w, b, conv = _layer(SHAPES[label], batch, device)
                ways = _ways(a, w, b, conv, device)
                _check(ways, a, w, b, conv)
                med = _time(ways, device, args.reps, clock)
                for name, ms in med.items():
                    print(f"| {label} | {batch} | {name} | {ms:.3f} | {ms / med['two']:.2f} |")
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
