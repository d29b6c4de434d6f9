"""``z = W a + b`` and ``s = |W| |a|`` of a Linear/Conv1d/Conv2d from the same operand tiles, in
one Triton launch (R-LRP ``norm="neuron"`` divides each neuron's relevance by ``s``).

For a convolution with ``W`` ``[C_out, C_in/G, KH, KW]`` and input ``a`` ``[N, C_in, H, W]``:

    z[n, o, oh, ow] = b[o] + σ[o] · Σ_{c, kh, kw} W[o, c, kh, kw] · a[n, g·C_in/G + c, ih, iw]
    s[n, o, oh, ow] =       |σ[o]| · Σ_{c, kh, kw} |W[o, c, kh, kw]| · |a[n, g·C_in/G + c, ih, iw]|

with ``ih = oh·SH − PH + kh·DH`` (same for w), ``g = o // (C_out/G)``, out-of-range taps 0,
and ``σ`` an optional per-output-channel scale (a folded BatchNorm), 1 when absent.
A Linear is the 1×1 case over rows (``a`` ``[M, K]`` as ``[M, K, 1, 1]``).

Design. An implicit GEMM: a program owns a ``[BLOCK_P output positions, BLOCK_O output
channels]`` tile of one group and loops over (tap, block of ``C_in/G``); each loaded tile of
``a`` and ``W`` feeds two accumulators, the second through ``abs`` on the loaded registers —
so ``a`` and ``W`` are read once and no ``|W|`` or ``|a|`` copy exists in memory. Positions are
flattened over ``N × OH × OW`` so small images still fill a tile; strides are arguments, so
NCHW, channels-last and expanded inputs are read in place. ``z`` is written in ``a``'s dtype
(the forward's), ``s`` in float32 (the relevance's); either may be skipped.

Narrow groups (depthwise and grouped convolutions with ``C_in/G`` or ``C_out/G`` below
:data:`.affine_relevance_conv.NARROW_GROUP`) take a second kernel, as the relevance kernels
do: its tile is ``[BLOCK_P positions, BLOCK_O output channels]`` across groups (each lane reads
its own group's inputs) and it loops over the taps and the group's ``C_in/G`` input channels
with elementwise FMAs instead of ``tl.dot`` tiles that would be mostly padding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISION, autotune_or_fixed, grouped_tile
from .affine_relevance_conv import is_narrow_grouped


# Geometry is not specialised (one compiled kernel serves a network's many layer shapes).
@triton.jit
def _store(acc_z, acc_s, n, oh, ow, chan_out, mask_p, mask_o, scale_ptr, b_ptr, z_ptr, s_ptr,
           stride_zn, stride_zc, stride_zh, stride_zw, stride_sn, stride_sc, stride_sh,
           stride_sw, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
           STORE_Z: tl.constexpr, STORE_S: tl.constexpr):
    """Both kernels' end on a (positions × output channels) tile: the folded scale σ (|σ| on
    ``s``), the bias on ``z``, the stores."""
    mask = mask_p[:, None] & mask_o[None, :]
    if HAS_SCALE:
        sigma = tl.load(scale_ptr + chan_out, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        acc_z = acc_z * sigma
        acc_s = acc_s * tl.abs(sigma)
    if STORE_Z:
        if HAS_BIAS:
            acc_z += tl.load(b_ptr + chan_out, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        tl.store(z_ptr + n[:, None] * stride_zn + chan_out[None, :] * stride_zc
                 + (oh * stride_zh + ow * stride_zw)[:, None],
                 acc_z.to(z_ptr.dtype.element_ty), mask=mask)
    if STORE_S:
        tl.store(s_ptr + n[:, None] * stride_sn + chan_out[None, :] * stride_sc
                 + (oh * stride_sh + ow * stride_sw)[:, None], acc_s, mask=mask)


@triton.jit(do_not_specialize=[
    "CIN_G", "COUT_G", "H", "W", "OH", "OW", "KH", "KW", "MP",
    "SH", "SW", "PAD_H", "PAD_W", "DIL_H", "DIL_W"])
def _affine_forward_abs_kernel(
    a_ptr, w_ptr, b_ptr, scale_ptr, z_ptr, s_ptr,
    CIN_G, COUT_G, H, W, OH, OW, KH, KW, MP,
    SH, SW, PAD_H, PAD_W, DIL_H, DIL_W,
    stride_an, stride_ac, stride_ah, stride_aw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_zn, stride_zc, stride_zh, stride_zw,
    stride_sn, stride_sc, stride_sh, stride_sw,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, STORE_Z: tl.constexpr,
    STORE_S: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grid: (position tiles × output-channel tiles, groups)."""
    grp = tl.program_id(1)
    pid_p, pid_o = grouped_tile(tl.program_id(0), tl.cdiv(MP, BLOCK_P), tl.cdiv(COUT_G, BLOCK_O),
                                GROUP_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    ow = offs_p % OW
    rest = offs_p // OW
    oh = rest % OH
    n = (rest // OH).to(tl.int64)  # int64: n·stride_n may pass 2³¹
    mask_p = offs_p < MP
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < COUT_G
    chan_out = grp * COUT_G + offs_o

    a_rows = a_ptr + n * stride_an
    c_blocks = tl.cdiv(CIN_G, BLOCK_K)
    acc_z = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for t in range(0, KH * KW * c_blocks):
        cb = t % c_blocks
        tap = t // c_blocks
        kh = tap // KW
        kw = tap % KW
        ih = oh * SH - PAD_H + kh * DIL_H
        iw = ow * SW - PAD_W + kw * DIL_W
        ok_p = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_c = cb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_c = offs_c < CIN_G
        a = tl.load(a_rows[:, None] + (grp * CIN_G + offs_c)[None, :] * stride_ac
                    + (ih * stride_ah + iw * stride_aw)[:, None],
                    mask=ok_p[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + chan_out[None, :] * stride_wo + offs_c[:, None] * stride_wi
                    + kh * stride_wh + kw * stride_ww,
                    mask=mask_c[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
        if STORE_Z:
            acc_z = tl.dot(a, w, acc_z, input_precision=PRECISION)
        if STORE_S:
            acc_s = tl.dot(tl.abs(a), tl.abs(w), acc_s, input_precision=PRECISION)

    _store(acc_z, acc_s, n, oh, ow, chan_out, mask_p, mask_o, scale_ptr, b_ptr, z_ptr, s_ptr,
           stride_zn, stride_zc, stride_zh, stride_zw, stride_sn, stride_sc, stride_sh,
           stride_sw, HAS_SCALE, HAS_BIAS, STORE_Z, STORE_S)


def _configs():
    # Hopper, fp32 operands (tf32x3): two accumulators double the registers a tile needs, so
    # the tiles are a step smaller than the relevance kernels'. 16-wide channel blocks serve
    # the first layer (C_in = 3), depthwise groups and narrow heads.
    shapes = [(128, 64, 32, 3, 8), (64, 64, 32, 4, 4), (128, 32, 32, 4, 4),
              (64, 128, 32, 3, 8), (64, 32, 16, 4, 4), (128, 16, 16, 4, 4)]
    return [triton.Config({"BLOCK_P": p, "BLOCK_O": o, "BLOCK_K": k, "GROUP_M": 8},
                          num_stages=s, num_warps=w) for p, o, k, s, w in shapes]


_INTERPRET_META = {"BLOCK_P": 128, "BLOCK_O": 64, "BLOCK_K": 64, "GROUP_M": 8}
_launch, _launch_meta = autotune_or_fixed(
    _affine_forward_abs_kernel, _configs(),
    key=["MP", "CIN_G", "COUT_G", "KH", "KW", "SH", "SW", "HAS_BIAS", "HAS_SCALE", "STORE_Z",
         "STORE_S"],
    interpret_meta=_INTERPRET_META)


@triton.jit(do_not_specialize=[
    "C_OUT", "CIN_G", "COUT_G", "H", "W", "OH", "OW", "KH", "KW", "MP",
    "SH", "SW", "PAD_H", "PAD_W", "DIL_H", "DIL_W"])
def _affine_forward_abs_grouped_kernel(
    a_ptr, w_ptr, b_ptr, scale_ptr, z_ptr, s_ptr,
    C_OUT, CIN_G, COUT_G, H, W, OH, OW, KH, KW, MP,
    SH, SW, PAD_H, PAD_W, DIL_H, DIL_W,
    stride_an, stride_ac, stride_ah, stride_aw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_zn, stride_zc, stride_zh, stride_zw,
    stride_sn, stride_sc, stride_sh, stride_sw,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, STORE_Z: tl.constexpr,
    STORE_S: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid: (position tiles × output-channel tiles over all C_out,)."""
    pid_p, pid_o = grouped_tile(tl.program_id(0), tl.cdiv(MP, BLOCK_P), tl.cdiv(C_OUT, BLOCK_O),
                                GROUP_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    ow = offs_p % OW
    rest = offs_p // OW
    oh = rest % OH
    n = (rest // OH).to(tl.int64)  # int64: n·stride_n may pass 2³¹
    mask_p = offs_p < MP
    chan_out = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = chan_out < C_OUT
    # each lane's group: its input channels start at grp·CIN_G
    first_in = (chan_out // COUT_G) * CIN_G

    a_rows = a_ptr + n * stride_an
    acc_z = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for t in range(0, KH * KW * CIN_G):
        j = t % CIN_G
        tap = t // CIN_G
        kh = tap // KW
        kw = tap % KW
        ih = oh * SH - PAD_H + kh * DIL_H
        iw = ow * SW - PAD_W + kw * DIL_W
        ok_p = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(a_rows[:, None] + (first_in + j)[None, :] * stride_ac
                    + (ih * stride_ah + iw * stride_aw)[:, None],
                    mask=ok_p[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + chan_out * stride_wo + j * stride_wi + kh * stride_wh
                    + kw * stride_ww, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        if STORE_Z:
            acc_z += a * w
        if STORE_S:
            acc_s += tl.abs(a) * tl.abs(w)

    _store(acc_z, acc_s, n, oh, ow, chan_out, mask_p, mask_o, scale_ptr, b_ptr, z_ptr, s_ptr,
           stride_zn, stride_zc, stride_zh, stride_zw, stride_sn, stride_sc, stride_sh,
           stride_sw, HAS_SCALE, HAS_BIAS, STORE_Z, STORE_S)


def _grouped_configs():
    # Wide position tiles suit NCHW (positions contiguous), wide channel tiles channels-last.
    shapes = [(128, 32, 4), (64, 64, 4), (256, 16, 4), (32, 128, 4), (128, 64, 8)]
    return [triton.Config({"BLOCK_P": p, "BLOCK_O": o, "GROUP_M": 8}, num_stages=2,
                          num_warps=w) for p, o, w in shapes]


_GROUPED_INTERPRET_META = {"BLOCK_P": 128, "BLOCK_O": 32, "GROUP_M": 8}
_grouped_launch, _grouped_launch_meta = autotune_or_fixed(
    _affine_forward_abs_grouped_kernel, _grouped_configs(),
    key=["MP", "C_OUT", "CIN_G", "COUT_G", "KH", "KW", "SH", "SW", "stride_zc", "HAS_BIAS",
         "HAS_SCALE", "STORE_Z", "STORE_S"],
    interpret_meta=_GROUPED_INTERPRET_META)


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def affine_forward_abs(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       *, scale: torch.Tensor | None = None,
                       stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
                       store_z: bool = True, store_s: bool = True, config: dict | None = None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(z, s)``: the layer's output ``σ ⊙ (W a) + b`` (in ``a``'s dtype) and ``|σ ⊙ W| |a|``
    (float32),
    from one launch; ``store_z``/``store_s`` False skips one (None in its place).

    Args:
        a: the layer's input: ``[..., K]`` for a Linear (``weight`` ``[O, K]``), ``[N, C_in,
            (H,) W]`` for a Conv1d/Conv2d (``weight`` ``[C_out, C_in/groups, (KH,) KW]``);
            float32/bfloat16/float16, any strides.
        bias: ``[O]`` or None (only ``z`` reads it).
        scale: ``σ``, ``[O]`` or None: a per-output-channel factor (a folded BatchNorm).
        stride, padding, dilation, groups: the convolution's (per spatial dim); ignored for
            a Linear.
        config: fixed tile sizes (tests), else the autotuned/interpreter ones (the
            narrow-group kernel has no ``BLOCK_K``).
    """
    if not (store_z or store_s):
        raise ValueError("affine_forward_abs: nothing to compute (store_z and store_s off)")
    dims = weight.dim() - 2
    if dims < 0 or dims > 2:
        raise NotImplementedError(f"affine_forward_abs handles Linear/Conv1d/Conv2d, "
                                  f"not a {weight.dim()}-d weight")
    if dims == 0:  # a Linear: rows × features as a batch of 1×1 images
        lead = a.shape[:-1]
        a4 = a.reshape(-1, a.shape[-1])[:, :, None, None]
        w4 = weight[:, :, None, None]
        stride, padding, dilation = (1, 1), (0, 0), (1, 1)
        groups = 1
    elif dims == 1:
        a4, w4 = a.unsqueeze(2), weight.unsqueeze(2)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    else:
        a4, w4 = a, weight
    n, _, h, w_in = a4.shape
    c_out, cin_g, kh, kw = w4.shape
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w_in, kw, stride[1], padding[1], dilation[1])
    fmt = (torch.channels_last if dims == 2 and not a.is_contiguous()
           and a.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    shape4 = (n, c_out, oh, ow)
    z4 = torch.empty(shape4, dtype=a.dtype, device=a.device, memory_format=fmt) \
        if store_z else None
    s4 = torch.empty(shape4, dtype=torch.float32, device=a.device, memory_format=fmt) \
        if store_s else None
    mp = n * oh * ow
    if mp > 0 and c_out > 0:
        # Memory order (KH, KW, C_out, C_in/G): a tap's [C_in, C_out] tile is contiguous along
        # C_in (the PyTorch order strides it by KH·KW). The kernel reads it via strides.
        w4 = w4.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
        dummy = a4  # never read or written: its flag is off
        tensors = (a4, w4, bias if bias is not None else dummy,
                   scale if scale is not None else dummy, z4 if z4 is not None else dummy,
                   s4 if s4 is not None else dummy)
        geometry = (h, w_in, oh, ow, kh, kw, mp,
                    stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                    *a4.stride(), *w4.stride(),
                    *(z4.stride() if z4 is not None else (0, 0, 0, 0)),
                    *(s4.stride() if s4 is not None else (0, 0, 0, 0)))
        flags = dict(HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, STORE_Z=store_z,
                     STORE_S=store_s)
        cout_g = c_out // groups
        if is_narrow_grouped(groups, cin_g, cout_g):
            if config is None:
                launch, meta = _grouped_launch, _grouped_launch_meta
            else:  # the GEMM kernel's BLOCK_K has no meaning here
                launch, meta = _affine_forward_abs_grouped_kernel, dict(
                    _GROUPED_INTERPRET_META,
                    **{k: v for k, v in config.items() if k in _GROUPED_INTERPRET_META})
            grid = lambda META: (triton.cdiv(mp, META["BLOCK_P"])  # noqa: E731
                                 * triton.cdiv(c_out, META["BLOCK_O"]),)
            launch[grid](*tensors, c_out, cin_g, cout_g, *geometry, **flags, **meta)
        else:
            launch, meta = (_launch, _launch_meta) if config is None else (
                _affine_forward_abs_kernel, dict(_INTERPRET_META, **config))
            grid = lambda META: (triton.cdiv(mp, META["BLOCK_P"])  # noqa: E731
                                 * triton.cdiv(cout_g, META["BLOCK_O"]), groups)
            launch[grid](*tensors, cin_g, cout_g, *geometry, **flags,
                         PRECISION=DOT_PRECISION, **meta)

    def shaped(t4):
        if t4 is None:
            return None
        if dims == 0:
            return t4.view(*lead, c_out)
        return t4.squeeze(2) if dims == 1 else t4
    return shaped(z4), shaped(s4)
