"""Pieces shared by the relevance kernels: tile ordering, the classic rules' prologue, the
per-sample L1 epilogue, and the choice between autotuning (GPU) and a fixed configuration
(``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton decides at decoration time whether a @triton.jit function is interpreted, so the
# kernel modules read the switch once, at import, exactly as Triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# fp32 operands on tensor cores: "tf32x3" splits each operand into a tf32 high and low part
# and keeps ~fp32 accuracy (plain "tf32" loses ~1e-3 relative, more than the float64
# reference tests allow). The interpreter ignores it.
DOT_PRECISION = "tf32x3"


def autotune_or_fixed(kernel, configs, key, interpret_meta, reset_to_zero=None):
    """``(launcher, meta)``: how the entry points launch ``kernel``.

    - GPU (default): autotuned over ``configs`` (benchmarked once per ``key``), ``meta`` {}.
    - GPU with ``RLRP_TRITON_AUTOTUNE=0``: the first config, fixed (no benchmarking: quick
      test runs, reproducible timings).
    - ``TRITON_INTERPRET=1``: ``interpret_meta``, fixed (the interpreter cannot time
      configurations, and big blocks mean few interpreted programs).
    """
    if INTERPRET:
        return kernel, dict(interpret_meta)
    if os.environ.get("RLRP_TRITON_AUTOTUNE", "1") == "0":
        first = configs[0]
        return kernel, dict(first.kwargs, num_warps=first.num_warps,
                            num_stages=first.num_stages)
    # reset_to_zero: every benchmarked run adds into the L1 buffer again.
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)(kernel), {}


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile ``(pid_m, pid_n)`` of program ``pid`` in grouped order (Triton tutorial 03):
    ``GROUP_M`` row tiles sweep the column tiles together so their operands stay in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def divide_by_stabilized(g, z, eps, HAS_EPS: tl.constexpr):
    """``g / stab(z)`` in fp32 with zennit's ``stab(z) = z + eps·(sign(z) + (z == 0))``.

    ``sign(z) + (z == 0)`` is -1 for negative ``z`` and +1 otherwise. Without ``HAS_EPS``
    the division is by ``z`` itself (LRP-0), which keeps the sign of a ``-0.0`` as torch
    does. ``div_rn``: IEEE division, as torch's (Triton's ``/`` is approximate)."""
    z = z.to(tl.float32)
    if HAS_EPS:
        z = z + tl.where(z < 0, -eps, eps)
    return tl.math.div_rn(g, z)


@triton.jit
def add_l1(l1_ptr, sample, row_l1, row_mask):
    """``l1[sample[r]] += row_l1[r]`` for the tile's valid rows.

    A tile usually lies inside one sample: then one atomic instead of one per row (all rows
    hitting one address would serialise). ``row_l1`` must be 0 on masked rows."""
    lo = tl.min(tl.where(row_mask, sample, 2147483647), axis=0)
    hi = tl.max(tl.where(row_mask, sample, -1), axis=0)
    if lo == hi:
        tl.atomic_add(l1_ptr + lo, tl.sum(row_l1, axis=0), sem="relaxed")
    else:
        tl.atomic_add(l1_ptr + sample, row_l1, mask=row_mask, sem="relaxed")
