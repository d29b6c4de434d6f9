"""The convolution kernel of both affine relevance primitives (entry points in
:mod:`.affine_relevance`): relevance through a Conv1d/Conv2d in one Triton launch, an
implicit-GEMM transposed convolution (the convolution's input gradient) with the relevance
prologue and epilogue.

For ``z = conv(a, W) + b`` with ``W`` ``[C_out, C_in/G, KH, KW]``, relevance ``g`` at the
output ``[N, C_out, OH, OW]`` and the input ``a`` ``[N, C_in, H, W]``:

    R̃[n, c, ih, iw] = scale[n] · a[n, c, ih, iw]
                      · Σ_{co, kh, kw} g'[n, co, oh, ow] · W[co, c, kh, kw]

over the output positions that read ``(ih, iw)``: ``oh·s = ih + p − kh·d`` (same for w),
divisible and in range, and ``co`` in ``c``'s group; ``g' = g`` or ``g / stab(z)``.

Design. A program computes a ``[BLOCK_P positions, BLOCK_C input channels]`` tile of one group
and one *phase*: with stride ``s``, the input rows ``ih ≡ ph (mod s)`` all read the same kernel
taps (``kh·d ≡ ph + p (mod s)``), so each phase loops over its valid taps only — no wasted
multiply on a stride-2 layer — and the tap test leaves the inner loop. The reduction is one
flat loop over (valid tap, block of ``C_out/G``), which Triton can pipeline. Positions are
flattened over ``N × rows × cols`` of the phase so small images still fill a tile. Strides
are arguments, so NCHW and channels-last tensors (and expanded ones) are read in place.

Narrow groups (depthwise and grouped convolutions with ``C_in/G`` or ``C_out/G`` below
:data:`NARROW_GROUP`) take a second kernel: a ``tl.dot`` tile of one group would be mostly
padding there (a depthwise layer uses 1/16 × 1/16 of a 16×16 tile). Its tile is
``[BLOCK_P positions, BLOCK_C input channels]`` across groups (each lane finds its own group),
and it loops over the phase's taps and the group's ``C_out/G`` output channels with
elementwise FMAs; phases, prologue and epilogue are the GEMM kernel's. :func:`launch` picks
the kernel.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISION, add_l1, autotune_or_fixed, divide_by_stabilized, grouped_tile


@triton.jit
def _phase_positions(pid_p, ph, pw, QH, QW, MQ, SH, SW, H, W, BLOCK_P: tl.constexpr):
    """The input positions of one tile of stride phase ``(ph, pw)``: ``ih = qh·SH + ph``,
    ``iw = qw·SW + pw``, flattened over ``(n, qh, qw)``; ``n`` int64 (``n·stride_n`` may pass
    2³¹)."""
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qw = offs_p % QW
    rest = offs_p // QW
    qh = rest % QH
    n = (rest // QH).to(tl.int64)
    ih = qh * SH + ph
    iw = qw * SW + pw
    return n, qh, qw, ih, iw, (offs_p < MQ) & (ih < H) & (iw < W)


@triton.jit
def _epilogue(acc, n, ih, iw, chan_in, mask_p, mask_c, a_ptr, scale_ptr, out_ptr, l1_ptr,
              stride_an, stride_ac, stride_ah, stride_aw,
              stride_on, stride_oc, stride_oh, stride_ow,
              HAS_A: tl.constexpr, HAS_SCALE: tl.constexpr, COMPUTE_L1: tl.constexpr):
    """Both conv kernels' fused end on a (positions × input channels) tile of ``Wᵀg``: ⊙ a,
    ⊙ the per-sample scale, the per-sample L1, the store."""
    mask = mask_p[:, None] & mask_c[None, :]
    if HAS_A:
        a = tl.load(a_ptr + n[:, None] * stride_an + chan_in[None, :] * stride_ac
                    + (ih * stride_ah + iw * stride_aw)[:, None], mask=mask, other=0.0)
        acc = acc * a.to(tl.float32)
    if HAS_SCALE:
        s = tl.load(scale_ptr + n, mask=mask_p, other=0.0)
        acc = acc * s[:, None]
    if COMPUTE_L1:
        # where, not the masks' zeros: an inf·0 in a padded lane would be NaN.
        row_l1 = tl.sum(tl.where(mask, tl.abs(acc), 0.0), axis=1)
        add_l1(l1_ptr, n, row_l1, mask_p)
    tl.store(out_ptr + n[:, None] * stride_on + chan_in[None, :] * stride_oc
             + (ih * stride_oh + iw * stride_ow)[:, None], acc, mask=mask)


@triton.jit
def _first_tap(r, S, D, GCD, INV, K):
    """``(first, step, count)`` of the taps ``k`` in ``[0, K)`` with ``k·D ≡ r (mod S)``.

    ``GCD = gcd(D, S)``; ``INV`` is the inverse of ``D/GCD`` modulo ``S/GCD`` (0 when that
    modulus is 1). Solvable iff ``GCD | r``; then ``k ≡ (r/GCD)·INV (mod S/GCD)``."""
    step = S // GCD
    first = ((r // GCD) * INV) % step
    count = tl.where((r % GCD == 0) & (first < K), (K - first + step - 1) // step, 0)
    return first, step, count


# Geometry is not specialised on (== 1, divisible by 16): a network's many layer shapes then
# share a few compiled kernels; strides still are (unit strides vectorise loads).
@triton.jit(do_not_specialize=[
    "GROUPS", "CIN_G", "COUT_G", "H", "W", "OH", "OW", "KH", "KW", "QH", "QW", "MQ",
    "SH", "SW", "PAD_H", "PAD_W", "DIL_H", "DIL_W", "GCD_H", "INV_H", "GCD_W", "INV_W"])
def _affine_relevance_conv_kernel(
    g_ptr, z_ptr, w_ptr, a_ptr, scale_ptr, out_ptr, l1_ptr,
    GROUPS, CIN_G, COUT_G, H, W, OH, OW, KH, KW, QH, QW, MQ,
    SH, SW, PAD_H, PAD_W, DIL_H, DIL_W, GCD_H, INV_H, GCD_W, INV_W,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_zn, stride_zc, stride_zh, stride_zw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_an, stride_ac, stride_ah, stride_aw,
    stride_on, stride_oc, stride_oh, stride_ow,
    eps,
    HAS_Z: tl.constexpr, HAS_EPS: tl.constexpr, HAS_A: tl.constexpr,
    HAS_SCALE: tl.constexpr, COMPUTE_L1: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grid: (position tiles × channel tiles, phases × groups)."""
    pid_pg = tl.program_id(1)
    grp = pid_pg % GROUPS
    phase = pid_pg // GROUPS
    ph = phase // SW
    pw = phase % SW
    pid_p, pid_c = grouped_tile(tl.program_id(0), tl.cdiv(MQ, BLOCK_P), tl.cdiv(CIN_G, BLOCK_C),
                                GROUP_M)

    n, qh, qw, ih, iw, mask_p = _phase_positions(pid_p, ph, pw, QH, QW, MQ, SH, SW, H, W,
                                                 BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < CIN_G
    chan_in = grp * CIN_G + offs_c

    # the taps this phase reads, as two arithmetic progressions
    rh = ph + PAD_H
    rw = pw + PAD_W
    kh0, step_h, count_h = _first_tap(rh, SH, DIL_H, GCD_H, INV_H, KH)
    kw0, step_w, count_w = _first_tap(rw, SW, DIL_W, GCD_W, INV_W, KW)
    k_blocks = tl.cdiv(COUT_G, BLOCK_K)
    total = count_h * count_w * k_blocks

    g_rows = g_ptr + n * stride_gn
    z_rows = z_ptr + n * stride_zn
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for t in range(0, total):
        kb = t % k_blocks
        tap = t // k_blocks
        kh = kh0 + (tap // count_w) * step_h
        kw = kw0 + (tap % count_w) * step_w
        # exact divisions: the phase was chosen so that SH | (rh − kh·DIL_H)
        oh = qh + (rh - kh * DIL_H) // SH
        ow = qw + (rw - kw * DIL_W) // SW
        ok_p = mask_p & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < COUT_G
        chan_out = grp * COUT_G + offs_k
        mask_pk = ok_p[:, None] & mask_k[None, :]
        g = tl.load(g_rows[:, None] + chan_out[None, :] * stride_gc
                    + (oh * stride_gh + ow * stride_gw)[:, None],
                    mask=mask_pk, other=0.0).to(tl.float32)
        if HAS_Z:
            # other=1: padded lanes divide 0 by 1, never by 0.
            z = tl.load(z_rows[:, None] + chan_out[None, :] * stride_zc
                        + (oh * stride_zh + ow * stride_zw)[:, None],
                        mask=mask_pk, other=1.0)
            g = divide_by_stabilized(g, z, eps, HAS_EPS)
        w = tl.load(w_ptr + chan_out[:, None] * stride_wo + offs_c[None, :] * stride_wi
                    + kh * stride_wh + kw * stride_ww,
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)

    _epilogue(acc, n, ih, iw, chan_in, mask_p, mask_c, a_ptr, scale_ptr, out_ptr, l1_ptr,
              stride_an, stride_ac, stride_ah, stride_aw,
              stride_on, stride_oc, stride_oh, stride_ow, HAS_A, HAS_SCALE, COMPUTE_L1)


def _configs():
    # Hopper: fp32 operands (tf32x3). BLOCK_K 32 suits C_out/G of 64 and up; the 16-wide
    # channel tiles serve the first layer (C_in = 3) and narrow groups.
    shapes = [(128, 64, 32, 4, 4), (128, 128, 32, 3, 8), (64, 64, 32, 4, 4),
              (128, 32, 32, 4, 4), (64, 128, 32, 4, 4), (256, 64, 32, 3, 8),
              (128, 16, 32, 4, 4), (64, 32, 16, 4, 4)]
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c, "BLOCK_K": k, "GROUP_M": 8},
                          num_stages=s, num_warps=w) for p, c, k, s, w in shapes]


_INTERPRET_META = {"BLOCK_P": 128, "BLOCK_C": 64, "BLOCK_K": 64, "GROUP_M": 8}
_launcher, _launcher_meta = autotune_or_fixed(
    _affine_relevance_conv_kernel, _configs(),
    key=["MQ", "CIN_G", "COUT_G", "KH", "KW", "SH", "SW", "HAS_Z", "HAS_EPS", "HAS_A",
         "HAS_SCALE", "COMPUTE_L1"],
    interpret_meta=_INTERPRET_META, reset_to_zero=["l1_ptr"])


# Below this many channels per group (in or out) a tl.dot tile of one group is mostly padding.
NARROW_GROUP = 16


def is_narrow_grouped(groups: int, cin_g: int, cout_g: int) -> bool:
    """Whether :func:`launch` takes the elementwise kernel for narrow groups."""
    return groups > 1 and min(cin_g, cout_g) < NARROW_GROUP


@triton.jit(do_not_specialize=[
    "C_IN", "CIN_G", "COUT_G", "H", "W", "OH", "OW", "KH", "KW", "QH", "QW", "MQ",
    "SH", "SW", "PAD_H", "PAD_W", "DIL_H", "DIL_W", "GCD_H", "INV_H", "GCD_W", "INV_W"])
def _affine_relevance_grouped_kernel(
    g_ptr, z_ptr, w_ptr, a_ptr, scale_ptr, out_ptr, l1_ptr,
    C_IN, CIN_G, COUT_G, H, W, OH, OW, KH, KW, QH, QW, MQ,
    SH, SW, PAD_H, PAD_W, DIL_H, DIL_W, GCD_H, INV_H, GCD_W, INV_W,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_zn, stride_zc, stride_zh, stride_zw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_an, stride_ac, stride_ah, stride_aw,
    stride_on, stride_oc, stride_oh, stride_ow,
    eps,
    HAS_Z: tl.constexpr, HAS_EPS: tl.constexpr, HAS_A: tl.constexpr,
    HAS_SCALE: tl.constexpr, COMPUTE_L1: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid: (position tiles × channel tiles over all C_in, phases)."""
    phase = tl.program_id(1)
    ph = phase // SW
    pw = phase % SW
    pid_p, pid_c = grouped_tile(tl.program_id(0), tl.cdiv(MQ, BLOCK_P), tl.cdiv(C_IN, BLOCK_C),
                                GROUP_M)

    n, qh, qw, ih, iw, mask_p = _phase_positions(pid_p, ph, pw, QH, QW, MQ, SH, SW, H, W,
                                                 BLOCK_P)
    chan_in = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = chan_in < C_IN
    # each lane's group: its output channels start at grp·COUT_G
    grp = chan_in // CIN_G
    c_in_grp = chan_in - grp * CIN_G

    rh = ph + PAD_H
    rw = pw + PAD_W
    kh0, step_h, count_h = _first_tap(rh, SH, DIL_H, GCD_H, INV_H, KH)
    kw0, step_w, count_w = _first_tap(rw, SW, DIL_W, GCD_W, INV_W, KW)
    total = count_h * count_w * COUT_G

    g_rows = g_ptr + n * stride_gn
    z_rows = z_ptr + n * stride_zn
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for t in range(0, total):
        j = t % COUT_G
        tap = t // COUT_G
        kh = kh0 + (tap // count_w) * step_h
        kw = kw0 + (tap % count_w) * step_w
        oh = qh + (rh - kh * DIL_H) // SH
        ow = qw + (rw - kw * DIL_W) // SW
        ok_p = mask_p & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        chan_out = grp * COUT_G + j
        mask_pc = ok_p[:, None] & mask_c[None, :]
        g = tl.load(g_rows[:, None] + chan_out[None, :] * stride_gc
                    + (oh * stride_gh + ow * stride_gw)[:, None],
                    mask=mask_pc, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_rows[:, None] + chan_out[None, :] * stride_zc
                        + (oh * stride_zh + ow * stride_zw)[:, None],
                        mask=mask_pc, other=1.0)
            g = divide_by_stabilized(g, z, eps, HAS_EPS)
        w = tl.load(w_ptr + chan_out * stride_wo + c_in_grp * stride_wi + kh * stride_wh
                    + kw * stride_ww, mask=mask_c, other=0.0).to(tl.float32)
        acc += g * w[None, :]

    _epilogue(acc, n, ih, iw, chan_in, mask_p, mask_c, a_ptr, scale_ptr, out_ptr, l1_ptr,
              stride_an, stride_ac, stride_ah, stride_aw,
              stride_on, stride_oc, stride_oh, stride_ow, HAS_A, HAS_SCALE, COMPUTE_L1)


def _grouped_configs():
    # Wide position tiles suit NCHW (positions contiguous), wide channel tiles channels-last.
    shapes = [(128, 32, 4), (64, 64, 4), (256, 16, 4), (32, 128, 4), (128, 64, 8),
              (512, 8, 4)]
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c, "GROUP_M": 8}, num_stages=2,
                          num_warps=w) for p, c, w in shapes]


_GROUPED_INTERPRET_META = {"BLOCK_P": 128, "BLOCK_C": 32, "GROUP_M": 8}
_grouped_launcher, _grouped_launcher_meta = autotune_or_fixed(
    _affine_relevance_grouped_kernel, _grouped_configs(),
    key=["MQ", "C_IN", "CIN_G", "COUT_G", "KH", "KW", "SH", "SW", "stride_oc", "HAS_Z",
         "HAS_EPS", "HAS_A", "HAS_SCALE", "COMPUTE_L1"],
    interpret_meta=_GROUPED_INTERPRET_META, reset_to_zero=["l1_ptr"])


def _tap_progression(stride: int, dilation: int) -> tuple[int, int]:
    """``(gcd(d, s), inverse of d/gcd modulo s/gcd)`` for :func:`_first_tap`."""
    gcd = math.gcd(dilation, stride)
    modulus = stride // gcd
    return gcd, (pow(dilation // gcd, -1, modulus) if modulus > 1 else 0)


def _as_2d(t: torch.Tensor | None) -> torch.Tensor | None:
    """A Conv1d tensor ``[N, C, L]`` as a height-1 image (a view)."""
    return None if t is None else t.unsqueeze(2)


def launch(g: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size,
           stride, padding, dilation, groups: int, a: torch.Tensor | None = None,
           *, z: torch.Tensor | None = None, eps: float = 0.0,
           scale: torch.Tensor | None = None, compute_l1: bool = True,
           out: torch.Tensor | None = None, config: dict | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(R̃, ‖R̃‖₁ per sample or None)`` for a Conv1d/Conv2d, in one launch (of the
    narrow-group kernel when :func:`is_narrow_grouped`, else of the implicit GEMM).

    Args:
        g: relevance at the output ``[N, C_out, (OH,) OW]`` float32, any strides.
        weight: ``[C_out, C_in/groups, (KH,) KW]``.
        input_shape: ``[N, C_in, (H,) W]``, the shape of ``R̃`` (a strided convolution maps
            several input sizes to one output size).
        stride, padding, dilation: per spatial dim (sequences of 1 or 2 ints).
        a: the layer's input (float32/bfloat16/float16, any strides) or None (no factor).
        z, eps, scale, compute_l1, out, config: as in :func:`.affine_relevance_dense.launch`
            (``config`` overrides the chosen kernel's meta-parameters; the narrow-group
            kernel has no ``BLOCK_K``).

    Returns ``R̃`` float32 ``input_shape`` (channels-last when ``a`` is) and the L1 norms.
    """
    dims = weight.dim() - 2
    if dims not in (1, 2):
        raise NotImplementedError(f"the Triton convolution kernel handles Conv1d/Conv2d, "
                                  f"not Conv{dims}d")
    n = input_shape[0]
    if out is None:
        fmt = (torch.channels_last if a is not None and dims == 2 and not a.is_contiguous()
               and a.is_contiguous(memory_format=torch.channels_last)
               else torch.contiguous_format)
        out = torch.empty(input_shape, dtype=torch.float32, device=g.device,
                          memory_format=fmt)
    l1 = torch.zeros(n, dtype=torch.float32, device=g.device) if compute_l1 else None
    if out.numel() == 0:
        return out, l1
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if dims == 1:
        g, z, a, out4 = _as_2d(g), _as_2d(z), _as_2d(a), _as_2d(out)
        weight = weight.unsqueeze(2)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    else:
        out4 = out
    c_out, cin_g, kh, kw = weight.shape
    # Memory order (KH, KW, C_out, C_in/G): a tap's [C_out, C_in] tile is then contiguous
    # along C_in (the PyTorch order strides it by KH·KW). The kernel reads it via strides.
    weight = weight.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    h, w_in = out4.shape[2], out4.shape[3]
    oh, ow = g.shape[2], g.shape[3]
    sh, sw = stride
    qh, qw = triton.cdiv(h, sh), triton.cdiv(w_in, sw)
    mq = n * qh * qw
    gcd_h, inv_h = _tap_progression(sh, dilation[0])
    gcd_w, inv_w = _tap_progression(sw, dilation[1])
    if scale is not None:
        scale = scale.to(torch.float32).contiguous()
    dummy = g  # never read: its flag is off
    # not ``dummy``: the autotuner zeroes l1_ptr before each trial run
    l1_arg = l1 if l1 is not None else torch.zeros(1, dtype=torch.float32, device=g.device)
    args = (g, z if z is not None else dummy, weight, a if a is not None else dummy,
            scale if scale is not None else dummy, out4, l1_arg)
    geometry = (h, w_in, oh, ow, kh, kw, qh, qw, mq, sh, sw, padding[0], padding[1],
                dilation[0], dilation[1], gcd_h, inv_h, gcd_w, inv_w,
                *g.stride(), *(z.stride() if z is not None else (0, 0, 0, 0)),
                *weight.stride(), *(a.stride() if a is not None else (0, 0, 0, 0)),
                *out4.stride(), float(eps))
    flags = dict(HAS_Z=z is not None, HAS_EPS=eps != 0, HAS_A=a is not None,
                 HAS_SCALE=scale is not None, COMPUTE_L1=compute_l1)
    cout_g = c_out // groups
    if is_narrow_grouped(groups, cin_g, cout_g):
        c_in = groups * cin_g
        if config is None:
            launcher, meta = _grouped_launcher, _grouped_launcher_meta
        else:  # the GEMM kernel's BLOCK_K has no meaning here
            launcher, meta = _affine_relevance_grouped_kernel, dict(
                _GROUPED_INTERPRET_META,
                **{k: v for k, v in config.items() if k in _GROUPED_INTERPRET_META})
        grid = lambda META: (triton.cdiv(mq, META["BLOCK_P"])  # noqa: E731
                             * triton.cdiv(c_in, META["BLOCK_C"]), sh * sw)
        launcher[grid](*args, c_in, cin_g, cout_g, *geometry, **flags, **meta)
        return out, l1
    launcher, meta = (_launcher, _launcher_meta) if config is None else (
        _affine_relevance_conv_kernel, dict(_INTERPRET_META, **config))
    grid = lambda META: (triton.cdiv(mq, META["BLOCK_P"])  # noqa: E731
                         * triton.cdiv(cin_g, META["BLOCK_C"]), sh * sw * groups)
    launcher[grid](*args, groups, cin_g, cout_g, *geometry, **flags, PRECISION=DOT_PRECISION,
                   **meta)
    return out, l1
