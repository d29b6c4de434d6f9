"""The dense (Linear) kernel of both affine relevance primitives (entry points in
:mod:`.affine_relevance`): relevance through ``z = W a + b`` in one Triton launch.

For ``weight`` ``[OUT, IN]``, relevance ``g`` ``[M, OUT]`` and input ``a`` ``[M, IN]`` (``M``
rows: ``N`` samples of ``L`` rows each, e.g. tokens):

    R̃[m, i] = scale[n(m)] · a[m, i] · Σ_j g'[m, j] · W[j, i]        n(m) = m // L

with ``g' = g`` (R-LRP) or ``g' = g / stab(z)`` (classic rules). One kernel: ``g'`` is formed
in registers as each ``g`` tile is loaded (no ``g / z`` tensor is written), the GEMM
accumulates in fp32, and the epilogue multiplies by ``a`` and the per-sample scale and adds
each sample's ``‖R̃‖₁`` into an fp32 ``[N]`` buffer before the single store of ``R̃``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISION, add_l1, autotune_or_fixed, divide_by_stabilized, grouped_tile


# Sizes that change per batch are not specialised on (== 1, divisible by 16): one compiled
# kernel serves every batch size.
@triton.jit(do_not_specialize=["M", "ROWS_PER_SAMPLE"])
def _affine_relevance_dense_kernel(
    g_ptr, z_ptr, w_ptr, a_ptr, scale_ptr, out_ptr, l1_ptr,
    M, IN, OUT, ROWS_PER_SAMPLE,
    stride_gm, stride_gj, stride_zm, stride_zj, stride_wj, stride_wi,
    stride_am, stride_ai, stride_om, stride_oi,
    eps,
    HAS_Z: tl.constexpr, HAS_EPS: tl.constexpr, HAS_A: tl.constexpr,
    HAS_SCALE: tl.constexpr, COMPUTE_L1: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One ``[BLOCK_M rows, BLOCK_N inputs]`` tile of ``R̃``; the reduction runs over OUT."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(IN, BLOCK_N),
                                GROUP_M)
    # int64 rows: M·IN may pass 2³¹ for long token sequences.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < IN

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, OUT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < OUT
        mask_mk = mask_m[:, None] & mask_k[None, :]
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_k[None, :] * stride_gj,
                    mask=mask_mk, other=0.0).to(tl.float32)
        if HAS_Z:
            # other=1: padded lanes divide 0 by 1, never by 0.
            z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_k[None, :] * stride_zj,
                        mask=mask_mk, other=1.0)
            g = divide_by_stabilized(g, z, eps, HAS_EPS)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wj + offs_n[None, :] * stride_wi,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_A:
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_ai,
                    mask=mask, other=0.0).to(tl.float32)
        acc = acc * a
    sample = offs_m // ROWS_PER_SAMPLE
    if HAS_SCALE:
        s = tl.load(scale_ptr + sample, mask=mask_m, other=0.0)
        acc = acc * s[:, None]
    if COMPUTE_L1:
        # where, not the masks' zeros: an inf·0 in a padded lane would be NaN.
        row_l1 = tl.sum(tl.where(mask, tl.abs(acc), 0.0), axis=1)
        add_l1(l1_ptr, sample, row_l1, mask_m)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_oi, acc, mask=mask)


def _configs():
    # Hopper: fp32 operands (tf32x3), 228 KB shared memory. 128×128×32 fp32 is 32 KB a stage.
    shapes = [(128, 128, 32, 4, 8), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
              (64, 64, 32, 4, 4), (128, 256, 32, 3, 8), (64, 32, 64, 4, 4),
              (32, 64, 64, 4, 4), (16, 128, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                          num_stages=s, num_warps=w) for m, n, k, s, w in shapes]


_INTERPRET_META = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}
_launcher, _launcher_meta = autotune_or_fixed(
    _affine_relevance_dense_kernel, _configs(),
    key=["M", "IN", "OUT", "HAS_Z", "HAS_EPS", "HAS_A", "HAS_SCALE", "COMPUTE_L1"],
    interpret_meta=_INTERPRET_META, reset_to_zero=["l1_ptr"])


def launch(g: torch.Tensor, weight: torch.Tensor, a: torch.Tensor | None = None,
           *, z: torch.Tensor | None = None, eps: float = 0.0,
           scale: torch.Tensor | None = None, compute_l1: bool = True,
           in_features: int | None = None, out: torch.Tensor | None = None,
           config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(R̃, ‖R̃‖₁ per sample or None)`` for a dense layer, in one launch.

    Args:
        g: relevance at the output, ``[N, ..., OUT]`` float32.
        weight: ``[OUT, IN]`` (float32, or a half type, upcast on load).
        a: the layer's input ``[N, ..., IN]`` (float32/bfloat16/float16); None: no ``a``
            factor (flat, w² rules), then ``in_features`` must be given.
        z: ``[N, ..., OUT]``; given, ``g`` is divided by ``stab(z)`` in the prologue.
        eps: zennit's stabiliser ε (0: plain ``z``).
        scale: ``[N]`` float32 per-sample factor applied in the epilogue.
        compute_l1: also return ``‖R̃‖₁`` per sample, ``[N]`` float32.
        out: optional preallocated result ``[N, ..., IN]`` float32 (tests poison it).
        config: meta-parameters overriding the fixed/autotuned ones (tests use tiny blocks
            to cover many tiles under the interpreter).

    Returns ``R̃`` float32 of the shape of ``a`` (``g.shape[:-1] + (IN,)``) and the L1 norms.
    """
    out_features = weight.shape[0]
    in_features = weight.shape[1] if in_features is None else in_features
    lead = g.shape[:-1]
    n = g.shape[0]
    g2 = g.reshape(-1, out_features)
    m = g2.shape[0]
    if out is None:
        out = torch.empty((*lead, in_features), dtype=torch.float32, device=g.device)
    out2 = out.view(-1, in_features)
    l1 = torch.zeros(n, dtype=torch.float32, device=g.device) if compute_l1 else None
    if m == 0 or in_features == 0:
        return out, l1
    a2 = a.reshape(-1, in_features) if a is not None else None
    z2 = z.reshape(-1, out_features) if z is not None else None
    if scale is not None:
        scale = scale.to(torch.float32).contiguous()
    dummy = g2  # never read: its flag is off
    # not ``dummy``: the autotuner zeroes l1_ptr before each trial run
    l1_arg = l1 if l1 is not None else torch.zeros(1, dtype=torch.float32, device=g.device)
    launcher, meta = (_launcher, _launcher_meta) if config is None else (
        _affine_relevance_dense_kernel, dict(_INTERPRET_META, **config))
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"])  # noqa: E731
                         * triton.cdiv(in_features, META["BLOCK_N"]),)
    launcher[grid](
        g2, z2 if z2 is not None else dummy, weight, a2 if a2 is not None else dummy,
        scale if scale is not None else dummy, out2, l1_arg,
        m, in_features, out_features, m // n,
        g2.stride(0), g2.stride(1),
        *(z2.stride() if z2 is not None else (0, 0)), weight.stride(0), weight.stride(1),
        *(a2.stride() if a2 is not None else (0, 0)), out2.stride(0), out2.stride(1),
        float(eps),
        HAS_Z=z is not None, HAS_EPS=eps != 0, HAS_A=a is not None,
        HAS_SCALE=scale is not None, COMPUTE_L1=compute_l1, PRECISION=DOT_PRECISION,
        **meta)
    return out, l1
