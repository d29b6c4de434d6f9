"""Attention's value mixing and its relevance (``attention_mix`` + ``attention_relevance``: ``o = P v``,
then ``R̃_V = v ⊙ (Pᵀ g)``, what R-LRP runs at every attention layer) three ways, side by side:

- ``materialised``: the ``torch`` backend — ``P = softmax(q kᵀ·scale)`` as an ``(N, H, L, S)``
  tensor, then ``P v`` and ``Pᵀ g`` (two batched GEMMs),
- ``sdpa-backward``: torch's own fused attention — ``F.scaled_dot_product_attention`` forward
  and ``torch.autograd.grad(o, v, g)`` (its flash backward: ``P`` recomputed blockwise, but
  ``dq`` and ``dk`` computed too), times ``v``,
- ``triton`` (CUDA): the ``attention_relevance`` kernels (flash-style, ``P`` never stored).

Shapes: ViT-B/16 (H=12, L=S=197, d=64, batch 1 and 8) and long sequences (batch 1, L=S=1024
and 4096); ``q``/``k``/``v`` are transposed views of ``(N, L, H·d)`` as in a ViT. Each way is
checked against float64 first. Interleaved rounds, medians, ratios to ``materialised`` in the
same run; on CUDA the peak memory above the inputs (``torch.cuda.max_memory_allocated``), on
CPU the size of the ``P`` the materialised way allocates. Not a test.

    python -m bench.attention_relevance --device cpu --threads 1 --clock cpu
    python -m bench.attention_relevance --device cuda
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from rlrp_fast.backends.torch_backend import TorchBackend

# name: (batch, heads, length, head dim)
SHAPES = {"vit_b_16 b1": (1, 12, 197, 64), "vit_b_16 b8": (8, 12, 197, 64),
          "L=1024 b1": (1, 12, 1024, 64), "L=4096 b1": (1, 12, 4096, 64)}


def _operands(shape, device, seed=0):
    n, h, length, d = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(n, length, h * d, generator=gen).to(device)
                  .unflatten(-1, (h, d)).transpose(1, 2) for _ in range(4))
    return q, k, v, g


def _ways(q, k, v, g, device):
    torch_backend = TorchBackend()

    def materialised():
        o, _, p = torch_backend.attention_mix(q, k, v, None, None, False)
        return o, torch_backend.attention_relevance(q, k, v, g, None, None, p, False)[0]

    def sdpa_backward():
        with torch.enable_grad():
            v_req = v.detach().requires_grad_()
            o = F.scaled_dot_product_attention(q, k, v_req)
            (pt_g,) = torch.autograd.grad(o, v_req, g)
        return o.detach(), v * pt_g

    ways = {"materialised": materialised, "sdpa-backward": sdpa_backward}
    if device.type == "cuda":
        from rlrp_fast.kernels import attention_relevance as kernels

        def triton():
            o, _, lse = kernels.attention_mix(q, k, v)
            return o, kernels.attention_relevance(q, k, v, g, lse, compute_l1=False)[0]
        ways["triton"] = triton
    return ways


def _check(ways, q, k, v, g):
    q64, k64, v64, g64 = (t.double() for t in (q, k, v, g))
    p = torch.softmax(q64 @ k64.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    want = (p @ v64, v64 * (p.transpose(-2, -1) @ g64))
    for name, fn in ways.items():
        for got, expected, what in zip(fn(), want, ("P v", "v ⊙ Pᵀg")):
            err = ((got.double() - expected).abs().max() / expected.abs().max()).item()
            if err > 1e-3:  # TF32 on CUDA allows ~1e-3; anything beyond is a wrong result
                raise AssertionError(f"{name}: {what} off by {err:.2e} (relative max)")


def _time(ways, device, reps, clock):
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for fn in ways.values():  # warm-up (compiles, autotunes)
        fn(), fn()
    sync()
    times = {k: [] for k in ways}
    peaks = {}
    for _ in range(reps):
        for name, fn in ways.items():
            sync()
            if cuda:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = clock()
            fn()
            sync()
            times[name].append(clock() - t0)
            if cuda:
                peaks[name] = torch.cuda.max_memory_allocated() - base
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}, peaks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the process's CPU time (all threads), CPU device only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        p.error("--clock cpu times CPU work only")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"clock {args.clock}, load {os.getloadavg()[0]:.1f}")
    memory = "peak MiB above inputs" if device.type == "cuda" else "P MiB (materialised)"
    print(f"| shape | way | median ms | × materialised | {memory} |\n"
          f"| --- | --- | --- | --- | --- |", flush=True)
    for label in args.shapes:
        q, k, v, g = _operands(SHAPES[label], device)
        ways = _ways(q, k, v, g, device)
        with torch.no_grad():
            _check(ways, q, k, v, g)
            med, peaks = _time(ways, device, args.reps, clock)
        n, h, length, _ = SHAPES[label]
        p_mib = n * h * length * length * 4 / 2 ** 20
        for name, ms in med.items():
            mem = (f"{peaks[name] / 2 ** 20:.1f}" if name in peaks
                   else f"{p_mib:.1f}" if name == "materialised" else "—")
            print(f"| {label} | {name} | {ms:.3f} | {ms / med['materialised']:.2f} | {mem} |",
                  flush=True)
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
