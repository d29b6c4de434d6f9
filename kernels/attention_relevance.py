"""Attention's value mixing and its relevance without the ``(L, S)`` attention matrix: the
``triton`` backend's ``attention_mix`` and ``attention_relevance`` (names as everywhere).

For queries ``q`` ``[N, H, L, d]``, keys ``k`` ``[N, H, S, d]``, values ``v`` ``[N, H, S, e]``
and an optional additive float ``bias`` broadcastable to ``[N, H, L, S]`` (it may hold -inf):

    P = softmax(q kᵀ · scale + bias)          (row-wise over the S keys)
    attention_mix:        o = P v,   o_abs = P |v| (optional),   lse = log Σ_s exp(scores)
    attention_relevance:  R̃_V = v ⊙ (Pᵀ g)   (the v factor optional), ‖R̃_V‖₁ per sample

``Pᵀ g`` is exactly ``dV`` of attention's backward. Design (flash-attention): the mixing runs
one program per (batch·head, block of queries) with an online softmax over blocks of keys, two
accumulators fed by the same ``P`` tile (``|v|`` taken on the loaded tile), and stores the row
log-sum-exp; the relevance runs one program per (batch·head, block of keys), loops over blocks
of queries and recomputes ``Pᵀ = exp(k qᵀ · scale + biasᵀ − lse)`` in registers; its epilogue
multiplies by ``v`` and adds each sample's L1 norm. No ``(L, S)`` tensor exists in memory.

Strides are arguments: ``q``/``k``/``v`` are usually transposed views ``[N, H, L, d]`` of
``[N, L, H·d]`` and are read in place, as is a bias expanded with 0 strides. The head dims are
padded to powers of two (masked). ``q``/``k``/``v``/``bias`` may be float32, bfloat16 or
float16 (upcast on load, fp32 accumulation); ``g`` and every result are float32.

A query row whose scores are all -inf (fully masked) attends to nothing: its ``P`` row is 0, so
``o`` is 0 there (as torch's attention computes it) and it sends no relevance to any key.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISION, INTERPRET, add_l1, autotune_or_fixed

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit(do_not_specialize=["H", "L", "S", "D", "E"])
def _attention_mix_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, o_abs_ptr, lse_ptr,
    H, L, S, D, E, scale,
    stride_qn, stride_qh, stride_ql, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vn, stride_vh, stride_vs, stride_ve,
    stride_bn, stride_bh, stride_bl, stride_bs,
    stride_on, stride_oh, stride_ol, stride_oe,
    HAS_BIAS: tl.constexpr, ABS_V: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Grid: (query blocks, N·H)."""
    bh = tl.program_id(1)
    n = (bh // H).to(tl.int64)  # int64: n·stride_n may pass 2³¹
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < L
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E

    q = tl.load(q_ptr + n * stride_qn + h * stride_qh + offs_m[:, None] * stride_ql
                + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
    k_base = k_ptr + n * stride_kn + h * stride_kh
    v_base = v_ptr + n * stride_vn + h * stride_vh
    bias_rows = bias_ptr + n * stride_bn + h * stride_bh + offs_m[:, None] * stride_bl

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    acc_abs = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < S
        k_t = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                      mask=mask_n[None, :] & (offs_d < D)[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, k_t, input_precision=PRECISION) * scale
        if HAS_BIAS:
            s += tl.load(bias_rows + offs_n[None, :] * stride_bs,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with only -inf so far: subtract 0, not -inf (exp(-inf - -inf) would be NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_e[None, :] * stride_ve,
                    mask=mask_n[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        if ABS_V:
            acc_abs = tl.dot(p, tl.abs(v), acc_abs * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # a fully masked row: l_i = 0 and acc = 0; divide by 1 (o = 0, torch's) and keep
    # lse = -inf, which the adjoint reads as "P row 0"
    out_offs = (n * stride_on + h * stride_oh + offs_m[:, None] * stride_ol
                + offs_e[None, :] * stride_oe)
    mask = mask_m[:, None] & mask_e[None, :]
    denominator = tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + out_offs, acc / denominator, mask=mask)
    if ABS_V:
        tl.store(o_abs_ptr + out_offs, acc_abs / denominator, mask=mask)
    tl.store(lse_ptr + bh.to(tl.int64) * L + offs_m, m_i + tl.log(l_i), mask=mask_m)


@triton.jit(do_not_specialize=["H", "L", "S", "D", "E"])
def _attention_relevance_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, g_ptr, lse_ptr, out_ptr, l1_ptr,
    H, L, S, D, E, scale,
    stride_qn, stride_qh, stride_ql, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vn, stride_vh, stride_vs, stride_ve,
    stride_bn, stride_bh, stride_bl, stride_bs,
    stride_gn, stride_gh, stride_gl, stride_ge,
    stride_on, stride_oh, stride_os, stride_oe,
    HAS_BIAS: tl.constexpr, MULTIPLY_V: tl.constexpr, COMPUTE_L1: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Grid: (key blocks, N·H)."""
    bh = tl.program_id(1)
    n = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < S
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E

    k = tl.load(k_ptr + n * stride_kn + h * stride_kh + offs_n[:, None] * stride_ks
                + offs_d[None, :] * stride_kd,
                mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
    q_base = q_ptr + n * stride_qn + h * stride_qh
    g_base = g_ptr + n * stride_gn + h * stride_gh
    bias_cols = bias_ptr + n * stride_bn + h * stride_bh + offs_n[:, None] * stride_bs
    lse_row = lse_ptr + bh.to(tl.int64) * L

    acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for start in range(0, L, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < L
        q_t = tl.load(q_base + offs_m[None, :] * stride_ql + offs_d[:, None] * stride_qd,
                      mask=mask_m[None, :] & (offs_d < D)[:, None], other=0.0).to(tl.float32)
        s_t = tl.dot(k, q_t, input_precision=PRECISION) * scale  # scoresᵀ [keys, queries]
        if HAS_BIAS:
            s_t += tl.load(bias_cols + offs_m[None, :] * stride_bl,
                           mask=mask_n[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
        lse = tl.load(lse_row + offs_m, mask=mask_m, other=0.0)
        # where, not a 0 on load: padded lanes and fully masked rows (lse = -inf, where
        # exp(-inf + inf) would be NaN) are 0
        live = mask_n[:, None] & (mask_m & (lse != float("-inf")))[None, :]
        p_t = tl.where(live, tl.exp(s_t - lse[None, :]), 0.0)
        g = tl.load(g_base + offs_m[:, None] * stride_gl + offs_e[None, :] * stride_ge,
                    mask=mask_m[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(p_t, g, acc, input_precision=PRECISION)

    mask = mask_n[:, None] & mask_e[None, :]
    if MULTIPLY_V:
        v = tl.load(v_ptr + n * stride_vn + h * stride_vh + offs_n[:, None] * stride_vs
                    + offs_e[None, :] * stride_ve, mask=mask, other=0.0)
        acc = acc * v.to(tl.float32)
    if COMPUTE_L1:
        row_l1 = tl.sum(tl.where(mask, tl.abs(acc), 0.0), axis=1)
        add_l1(l1_ptr, tl.zeros((BLOCK_N,), dtype=tl.int64) + n, row_l1, mask_n)
    tl.store(out_ptr + n * stride_on + h * stride_oh + offs_n[:, None] * stride_os
             + offs_e[None, :] * stride_oe, acc, mask=mask)


def _configs():
    # Hopper, fp32 operands (tf32x3): 64×64 tiles with head dims up to 128 fit the registers;
    # 128-row tiles for long sequences.
    shapes = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3), (128, 32, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": nb}, num_warps=w, num_stages=st)
            for m, nb, w, st in shapes]


# big blocks under the interpreter: few interpreted programs
_INTERPRET_META = {"BLOCK_M": 64, "BLOCK_N": 64}
_mix_launcher, _mix_meta = autotune_or_fixed(
    _attention_mix_kernel, _configs(), key=["L", "S", "BLOCK_D", "BLOCK_E", "HAS_BIAS", "ABS_V"],
    interpret_meta=_INTERPRET_META)
_relevance_launcher, _relevance_meta = autotune_or_fixed(
    _attention_relevance_kernel, _configs(),
    key=["L", "S", "BLOCK_D", "BLOCK_E", "HAS_BIAS", "MULTIPLY_V", "COMPUTE_L1"],
    interpret_meta=_INTERPRET_META, reset_to_zero=["l1_ptr"])


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor | None = None, g: torch.Tensor | None = None) -> str | None:
    """Why the kernels cannot take these tensors, or None when they can."""
    if not (q.is_cuda or (INTERPRET and q.device.type == "cpu")):
        return (f"they run on CUDA tensors (on CPU only under TRITON_INTERPRET=1), not on "
                f"{q.device}")
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in INPUT_DTYPES:
            return f"{name} must be float32, bfloat16 or float16, not {t.dtype}"
        if t.device != q.device:
            return f"{name} is on {t.device}, q on {q.device}"
    if g is not None and (g.dtype != torch.float32 or g.device != q.device):
        return f"the relevance must be float32 on {q.device}, not {g.dtype} on {g.device}"
    if q.dim() < 3:
        return f"q needs a batch dim, got shape {tuple(q.shape)}"
    return None


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """``[N, …, L, x]`` as ``[N, H, L, x]`` (the dims between the batch and the sequence as
    heads): a view for 3-d and 4-d tensors."""
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t if t.dim() == 4 else t.reshape(t.shape[0], -1, *t.shape[-2:])


def _check(q, k, v, bias, g, scale):
    """Raise ValueError naming what does not fit; the 4-d views, the bias broadcast to
    ``[N, H, L, S]`` (or None) and the scale as a float."""
    reason = unsupported(q, k, v, bias, g)
    if reason is not None:
        raise ValueError(f"rlrp_fast.kernels: {reason}")
    if k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"q, k, v need the same number of dims, got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    lead, length, source = q.shape[:-2], q.shape[-2], k.shape[-2]
    if (k.shape[:-2] != lead or v.shape[:-2] != lead or k.shape[-1] != q.shape[-1]
            or v.shape[-2] != source):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         f"fit [..., L, d], [..., S, d], [..., S, e]")
    if g is not None and g.shape != (*lead, length, v.shape[-1]):
        raise ValueError(f"g must have the shape of P v {(*lead, length, v.shape[-1])}, got "
                         f"{tuple(g.shape)}")
    if bias is not None:
        try:
            bias = bias.expand(*lead, length, source)
        except RuntimeError as exc:
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to "
                             f"{(*lead, length, source)}") from exc
        bias = _as_4d(bias)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _as_4d(q), _as_4d(k), _as_4d(v), bias, scale


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))  # tl.dot needs 16 along each dim


def attention_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor | None = None, scale: float | None = None,
                  abs_v: bool = False, config: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(P v, P |v| or None, lse)`` in one launch, all float32: ``P v`` and ``P |v|`` of
    ``q``'s leading shape ``[..., L, e]``, ``lse`` the rows' log-sum-exp ``[N, H, L]`` (what
    :func:`attention_relevance` recomputes ``P`` from). ``scale`` None is ``1/√d`` (torch's);
    ``config`` overrides the block sizes (tests)."""
    q4, k4, v4, bias4, scale = _check(q, k, v, bias, None, scale)
    n, h, length, d = q4.shape
    source, e = k4.shape[2], v4.shape[3]
    o = torch.empty((n, h, length, e), dtype=torch.float32, device=q.device)
    o_abs = torch.empty_like(o) if abs_v else None
    lse = torch.empty((n, h, length), dtype=torch.float32, device=q.device)
    if o.numel() and source:
        launcher, meta = (_mix_launcher, _mix_meta) if config is None else (
            _attention_mix_kernel, dict(_INTERPRET_META, **config))
        grid = lambda META: (triton.cdiv(length, META["BLOCK_M"]), n * h)  # noqa: E731
        launcher[grid](
            q4, k4, v4, bias4 if bias4 is not None else q4, o,
            o_abs if o_abs is not None else o, lse,
            h, length, source, d, e, scale,
            *q4.stride(), *k4.stride(), *v4.stride(),
            *(bias4.stride() if bias4 is not None else (0, 0, 0, 0)), *o.stride(),
            HAS_BIAS=bias4 is not None, ABS_V=abs_v, PRECISION=DOT_PRECISION,
            BLOCK_D=_block(d), BLOCK_E=_block(e), **meta)
    else:  # no keys: an empty P, so P v = 0 (the materialised product's zeros)
        o.zero_()
        lse.fill_(float("-inf"))
        if o_abs is not None:
            o_abs.zero_()
    shape = (*q.shape[:-1], e)
    return o.view(shape), None if o_abs is None else o_abs.view(shape), lse


def attention_relevance(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                        lse: torch.Tensor, bias: torch.Tensor | None = None,
                        scale: float | None = None, multiply_v: bool = True,
                        compute_l1: bool = True, config: dict | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(R̃_V, ‖R̃_V‖₁ per sample or None)`` with ``R̃_V = v ⊙ (Pᵀ g)`` (``multiply_v``
    False: ``Pᵀ g``) in one launch, ``P`` recomputed from ``lse`` (:func:`attention_mix`'s,
    same ``q``, ``k``, ``bias``, ``scale``). ``g`` float32 of ``P v``'s shape; ``R̃_V``
    float32 of ``v``'s shape, the norms float32 ``[N]``."""
    q4, k4, v4, bias4, scale = _check(q, k, v, bias, g, scale)
    n, h, length, d = q4.shape
    source, e = k4.shape[2], v4.shape[3]
    if lse.shape != (n, h, length) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 {(n, h, length)} (attention_mix's), got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    out = torch.empty((n, h, source, e), dtype=torch.float32, device=q.device)
    l1 = torch.zeros(n, dtype=torch.float32, device=q.device) if compute_l1 else None
    if out.numel():
        if length == 0:
            out.zero_()
        else:
            g4 = _as_4d(g)
            l1_arg = l1 if l1 is not None else torch.zeros(1, dtype=torch.float32,
                                                             device=q.device)
            launcher, meta = (_relevance_launcher, _relevance_meta) if config is None else (
                _attention_relevance_kernel, dict(_INTERPRET_META, **config))
            grid = lambda META: (triton.cdiv(source, META["BLOCK_N"]), n * h)  # noqa: E731
            launcher[grid](
                q4, k4, v4, bias4 if bias4 is not None else q4, g4, lse, out, l1_arg,
                h, length, source, d, e, scale,
                *q4.stride(), *k4.stride(), *v4.stride(),
                *(bias4.stride() if bias4 is not None else (0, 0, 0, 0)), *g4.stride(),
                *out.stride(),
                HAS_BIAS=bias4 is not None, MULTIPLY_V=multiply_v, COMPUTE_L1=compute_l1,
                PRECISION=DOT_PRECISION, BLOCK_D=_block(d), BLOCK_E=_block(e), **meta)
    return out.view(v.shape), l1
