"""What the per-primitive benchmarks (``bench/affine_relevance.py``,
``bench/affine_relevance_l1.py``) share: realistic layer shapes, their inputs, and the
side-by-side timing of every backend of the device.

Each backend's result is first checked against the ``torch`` backend's (so a fast wrong kernel
cannot post a time); then all backends are timed interleaved, round-robin
(``bench.run.time_interleaved``), and the table gives each one's median and its speed-up over
``torch`` measured in the same rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlrp_fast.backends import get_backend, unavailable_reason
from rlrp_fast.backends.base import Backend
from rlrp_fast.plan import Affine

from .run import machine, time_interleaved

# the fused backend of each device; ``torch`` runs everywhere
FUSED = {"cpu": "cpp", "cuda": "triton"}


@dataclass(frozen=True)
class Layer:
    """A layer of a real network; ``kernel`` 0 is a Linear (``size`` unused)."""

    c_in: int
    c_out: int
    kernel: int = 0
    stride: int = 1
    padding: int = 0
    size: int = 0
    groups: int = 1


def depthwise(channels: int, kernel: int, stride: int, size: int) -> Layer:
    """A depthwise convolution with "same" padding, as MobileNets/EfficientNets/ConvNeXts
    have them."""
    return Layer(channels, channels, kernel, stride, kernel // 2, size, channels)


LAYERS = {
    "VGG16 fc7 4096→4096": Layer(4096, 4096),
    "VGG16 fc8 4096→1000": Layer(4096, 1000),
    "VGG16 conv1_2 64→64 3×3 @224": Layer(64, 64, 3, 1, 1, 224),
    "VGG16 conv4_2 512→512 3×3 @28": Layer(512, 512, 3, 1, 1, 28),
    "ResNet50 stem 3→64 7×7 s2 @224": Layer(3, 64, 7, 2, 3, 224),
    "ResNet50 layer1 64→64 3×3 @56": Layer(64, 64, 3, 1, 1, 56),
    "ResNet50 layer2 down 256→512 1×1 s2 @56": Layer(256, 512, 1, 2, 0, 56),
    "ResNet50 layer3 1024→256 1×1 @14": Layer(1024, 256, 1, 1, 0, 14),
}
# Depthwise and grouped layers, `--suite grouped`: depthwise and ResNeXt's 4-wide groups take
# the narrow-group Triton kernel, RegNet's 16-wide groups the implicit GEMM.
GROUPED_LAYERS = {
    "EfficientNet-B0 dw 32 3×3 @112": depthwise(32, 3, 1, 112),
    "EfficientNet-B0 dw 96 3×3 s2 @112": depthwise(96, 3, 2, 112),
    "EfficientNet-B0 dw 144 5×5 s2 @56": depthwise(144, 5, 2, 56),
    "EfficientNet-B0 dw 240 5×5 @28": depthwise(240, 5, 1, 28),
    "EfficientNet-B0 dw 480 3×3 @14": depthwise(480, 3, 1, 14),
    "EfficientNet-B0 dw 672 5×5 s2 @14": depthwise(672, 5, 2, 14),
    "EfficientNet-B0 dw 1152 5×5 @7": depthwise(1152, 5, 1, 7),
    "MobileNetV3-L dw 64 3×3 s2 @112": depthwise(64, 3, 2, 112),
    "MobileNetV3-L dw 72 5×5 s2 @56": depthwise(72, 5, 2, 56),
    "MobileNetV3-L dw 960 5×5 @7": depthwise(960, 5, 1, 7),
    "ConvNeXt-T dw 96 7×7 @56": depthwise(96, 7, 1, 56),
    "ConvNeXt-T dw 768 7×7 @7": depthwise(768, 7, 1, 7),
    "ResNeXt50-32x4d 128→128 3×3 g32 @56": Layer(128, 128, 3, 1, 1, 56, 32),
    "RegNetY-800MF 144→144 3×3 g9 s2 @56": Layer(144, 144, 3, 2, 1, 56, 9),
    "RegNetY-800MF 320→320 3×3 g20 @14": Layer(320, 320, 3, 1, 1, 14, 20),
}
SUITES = {"classic": LAYERS, "grouped": GROUPED_LAYERS, "all": {**LAYERS, **GROUPED_LAYERS}}


@dataclass
class Inputs:
    step: Affine
    weight: torch.Tensor
    g: torch.Tensor       # relevance at the output, float32
    a: torch.Tensor       # the layer's input (post-ReLU: half of it zeros), ``a_dtype``
    z: torch.Tensor       # the pre-activation W a, float32
    scale: torch.Tensor   # a per-sample factor


def inputs(layer: Layer, batch: int, device: torch.device, a_dtype: torch.dtype,
           memory_format: torch.memory_format = torch.contiguous_format) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    fan_in = layer.c_in // layer.groups * max(1, layer.kernel) ** 2
    if layer.kernel == 0:
        w = torch.randn(layer.c_out, layer.c_in, generator=gen) / fan_in ** 0.5
        step = Affine(name="fc", target="fc", inputs=(0,), output=1, weight=w, bias=None)
        a = torch.randn(batch, layer.c_in, generator=gen).relu_()
    else:
        w = torch.randn(layer.c_out, layer.c_in // layer.groups, layer.kernel, layer.kernel,
                        generator=gen) / fan_in ** 0.5
        step = Affine(name="conv", target="conv", inputs=(0,), output=1, weight=w, bias=None,
                      conv_dims=2, stride=(layer.stride,) * 2, padding=(layer.padding,) * 2,
                      dilation=(1, 1), groups=layer.groups)
        a = torch.randn(batch, layer.c_in, layer.size, layer.size, generator=gen).relu_()
        a = a.contiguous(memory_format=memory_format)
    w, a = w.to(device), a.to(device)
    z = get_backend("torch", device).affine_forward(step, w, None, a)
    g = torch.randn(z.shape, generator=gen).to(device)
    if layer.kernel:  # the relevance arrives in the layout of the layer's output
        g, z = g.contiguous(memory_format=memory_format), z.contiguous(memory_format=memory_format)
    scale = (torch.rand(batch, generator=gen) + 0.5).to(device)
    return Inputs(step, w, g, a.to(a_dtype), z, scale)


def backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(the backends to time on ``device``, {backend left out: why})."""
    fused = FUSED.get(device.type)
    if fused is None:
        return ["torch"], {}
    reason = unavailable_reason(fused)
    return (["torch"], {fused: reason}) if reason else (["torch", fused], {})


Call = Callable[[Backend, Inputs], object]


def _max_rel_error(out, ref) -> float:
    """Largest ``|out − ref| / max|ref|`` over the tensors of a result (float64)."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    return max(((o.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-300))
               .item() for o, r in zip(outs, refs))


def run(primitive: str, call: Call, layers: list[str], batch: int, device: torch.device,
        a_dtype: torch.dtype, reps: int, tol: float = 1e-4,
        memory_format: torch.memory_format = torch.contiguous_format) -> list[dict]:
    """One row per layer: each backend checked against ``torch``, then timed side by side
    (wall time; on CPU also the process's CPU time)."""
    names, left_out = backends(device)
    for name, why in left_out.items():
        print(f"{name}: not timed ({why})", file=sys.stderr)
    rows = []
    for layer in layers:
        x = inputs(SUITES["all"][layer], batch, device, a_dtype, memory_format)
        impls = {name: get_backend(name, device) for name in names}
        ref = call(impls["torch"], x)
        row = {"layer": layer}
        for name, impl in impls.items():
            err = _max_rel_error(call(impl, x), ref)
            if not err <= tol:
                raise AssertionError(f"{primitive} [{name}] on {layer}: max error {err:.1e} "
                                     f"relative to the torch backend's result (tolerance {tol})")
            row[f"{name} err"] = err
        del ref
        cpu_times: dict[str, list[float]] = {}
        times = time_interleaved({n: (lambda _, impl=impl: call(impl, x))
                                  for n, impl in impls.items()}, None, reps, device,
                                 min_time_s=0.5, cpu_times=cpu_times)
        for name in names:
            row[f"{name} ms"] = 1e3 * statistics.median(times[name])
            row[f"{name} cpu ms"] = 1e3 * statistics.median(cpu_times[name])
            row[f"{name} n"] = len(times[name])
        rows.append(row)
        print(f"{layer}: " + ", ".join(f"{n} {row[f'{n} ms']:.2f} ms" for n in names),
              file=sys.stderr)
    return rows


def table(rows: list[dict], device: torch.device) -> str:
    """A markdown table: each backend's median, and the fused backend's speed-up over torch
    (``torch ms / fused ms``, from the same rounds)."""
    names, _ = backends(device)
    cpu = device.type == "cpu"
    head = ["layer"] + [f"{n} ms" for n in names] + [f"{n}: × faster than torch"
                                                     for n in names[1:]]
    head += ([f"{n} cpu ms" for n in names] + [f"{n}: × less CPU" for n in names[1:]]
             if cpu else []) + ["n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["layer"]] + [f"{row[f'{n} ms']:.2f}" for n in names]
        cells += [f"{row['torch ms'] / row[f'{n} ms']:.2f}" for n in names[1:]]
        if cpu:
            cells += [f"{row[f'{n} cpu ms']:.2f}" for n in names]
            cells += [f"{row['torch cpu ms'] / row[f'{n} cpu ms']:.2f}" for n in names[1:]]
        cells.append(str(min(row[f"{n} n"] for n in names)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(primitive: str, call: Call, what: str, argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m bench.{primitive}",
                                description=f"Time {primitive} ({what}) on each backend of the "
                                            "device, side by side, on real layers' shapes.")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--a-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the activations a (relevance stays float32)")
    p.add_argument("--suite", default="all", choices=list(SUITES),
                   help="the layers: classic (VGG/ResNet), grouped (depthwise and grouped: "
                        "EfficientNet-B0, MobileNetV3-Large, ConvNeXt-T, RegNetY-800MF) or all")
    p.add_argument("--layers", nargs="+", choices=list(SUITES["all"]), metavar="LAYER",
                   help=f"instead of --suite, any of {list(SUITES['all'])}")
    p.add_argument("--channels-last", action="store_true",
                   help="convolutions' a, z and g channels-last (default NCHW)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--reps", type=int, default=5, help="timed rounds at least (default 5)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    rows = run(primitive, call, args.layers or list(SUITES[args.suite]), args.batch, device,
               getattr(torch, args.a_dtype), args.reps, memory_format=fmt)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{primitive}: {what}; batch {args.batch}, a {args.a_dtype}, relevance float32, "
          f"{'channels-last' if args.channels_last else 'NCHW'}, "
          f"{device}" + (f" ({info['gpu']})" if "gpu" in info else "")
          + f"; {info['cpu']}, {info['cores']} cores, torch {info['torch']} with "
          f"{info['threads']} threads; load average {info['load']:.1f} at start, "
          f"{load:.1f} at the end; median of n interleaved calls after a warm-up round")
    print(table(rows, device))
    return 0
