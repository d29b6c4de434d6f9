"""Attention inside windows with a relative position bias — torchvision's Swin
shifted-window attention (V1 and V2) and MaxViT's relative-position attention — written once
for the plan's forward and the rules (:class:`~rlrp_fast.plan.WindowAttention`).

The layout maps are pure routing: :func:`to_windows` (zero padding to whole windows, the
cyclic shift, the window partition) and :func:`from_windows` (its adjoint: departition, the
shift undone, the padding cropped). The forward is ``from_windows(attention(to_windows(x)))``;
relevance at the output reaches the windows through ``to_windows`` and goes back to the
input through ``from_windows``. Everything mirrors ``torchvision.models.swin_transformer.
shifted_window_attention`` operation by operation (trace verification compares the two).
MaxViT's input is already laid out in windows ``(N, G, P, C)``: both maps are the identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .plan import WindowAttention


@dataclass(frozen=True)
class Geometry:
    """The input's ``height``/``width``, the padded ``padded_height``/``padded_width``
    (multiples of the window) and the shift in effect (0 along an axis the window covers)."""

    height: int
    width: int
    padded_height: int
    padded_width: int
    shift: tuple[int, int]

    @property
    def shifted(self) -> bool:
        return sum(self.shift) > 0  # torchvision's test


def geometry(step: WindowAttention, x: torch.Tensor) -> Geometry:
    if x.dim() != 4:
        raise ValueError(f"window attention needs (N, H, W, C) or (N, windows, tokens, C) "
                         f"input, got shape {tuple(x.shape)}")
    _, height, width, _ = x.shape
    if step.window_size is None:  # already windows
        return Geometry(height, width, height, width, (0, 0))
    wh, ww = step.window_size
    padded_height = height + (wh - height % wh) % wh
    padded_width = width + (ww - width % ww) % ww
    shift = (0 if wh >= padded_height else step.shift_size[0],
             0 if ww >= padded_width else step.shift_size[1])
    return Geometry(height, width, padded_height, padded_width, shift)


def to_windows(step: WindowAttention, t: torch.Tensor, g: Geometry) -> torch.Tensor:
    """``(N, H, W, C)`` → ``(N, windows, tokens per window, C)``: zero padding, shift by
    ``−shift``, partition (the identity for input already in windows)."""
    if step.window_size is None:
        return t
    wh, ww = step.window_size
    t = F.pad(t, (0, 0, 0, g.padded_width - g.width, 0, g.padded_height - g.height))
    if g.shifted:
        t = torch.roll(t, shifts=(-g.shift[0], -g.shift[1]), dims=(1, 2))
    n, c = t.shape[0], t.shape[-1]
    t = t.view(n, g.padded_height // wh, wh, g.padded_width // ww, ww, c)
    return t.permute(0, 1, 3, 2, 4, 5).reshape(n, -1, wh * ww, c)


def from_windows(step: WindowAttention, t: torch.Tensor, g: Geometry) -> torch.Tensor:
    """The adjoint of :func:`to_windows`: departition, shift by ``+shift``, crop."""
    if step.window_size is None:
        return t
    wh, ww = step.window_size
    n, c = t.shape[0], t.shape[-1]
    t = t.reshape(n, g.padded_height // wh, g.padded_width // ww, wh, ww, c)
    t = t.permute(0, 1, 3, 2, 4, 5).reshape(n, g.padded_height, g.padded_width, c)
    if g.shifted:
        t = torch.roll(t, shifts=g.shift, dims=(1, 2))
    return t[:, :g.height, :g.width, :].contiguous()


def position_bias(step: WindowAttention, dtype: torch.dtype) -> torch.Tensor:
    """The relative position bias ``(1, heads, tokens, tokens)``, from parameters alone."""
    if step.cpb_weights is None:
        table = step.bias_table.to(dtype)
    else:  # V2: the continuous position bias MLP on the log-spaced coordinates
        w1, b1, w2, b2 = (None if t is None else t.to(dtype) for t in step.cpb_weights)
        hidden = F.relu(F.linear(step.coords_table.to(dtype), w1, b1))
        table = F.linear(hidden, w2, b2).view(-1, step.num_heads)
    tokens = math.isqrt(step.bias_index.numel())
    bias = table[step.bias_index].view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)
    return 16 * torch.sigmoid(bias) if step.cpb_weights is not None else bias


def shift_mask(step: WindowAttention, g: Geometry, like: torch.Tensor) -> torch.Tensor:
    """``(windows, tokens, tokens)``: −100 between tokens that the shift brought together
    from different regions of the map, 0 elsewhere (torchvision's construction)."""
    wh, ww = step.window_size
    region = like.new_zeros((g.padded_height, g.padded_width))
    h_slices = ((0, -wh), (-wh, -g.shift[0]), (-g.shift[0], None))
    w_slices = ((0, -ww), (-ww, -g.shift[1]), (-g.shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            region[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    region = region.view(g.padded_height // wh, wh, g.padded_width // ww, ww)
    region = region.permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def value_weight(step: WindowAttention) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W_v`` and ``b_v``: the value rows of the packed ``qkv`` projection."""
    channels = step.proj_weight.shape[0]
    bias = None if step.qkv_bias is None else step.qkv_bias[2 * channels:]
    return step.qkv_weight[2 * channels:], bias


@dataclass(frozen=True)
class Terms:
    """What the relevance rules read: the windowed input ``xw`` ``(N, windows, L, C)``, the
    attention probabilities ``p`` ``(N, windows, heads, L, L)``, the values ``v`` (bias
    included) ``(N, windows, heads, L, d)`` and the geometry."""

    xw: torch.Tensor
    p: torch.Tensor
    v: torch.Tensor
    geometry: Geometry


def attention_terms(step: WindowAttention, x: torch.Tensor) -> Terms:
    g = geometry(step, x)
    xw = to_windows(step, x, g)
    n, windows, tokens, channels = xw.shape
    heads, dtype = step.num_heads, x.dtype
    qkv_bias = None if step.qkv_bias is None else step.qkv_bias.to(dtype)
    if step.logit_scale is not None and qkv_bias is not None:  # V2: no key bias
        qkv_bias = qkv_bias.clone()
        qkv_bias[channels:2 * channels] = 0
    qkv = F.linear(xw, step.qkv_weight.to(dtype), qkv_bias)
    qkv = qkv.reshape(n, windows, tokens, 3, heads, channels // heads)
    q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)
    if step.logit_scale is not None:  # V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(step.logit_scale.to(dtype), max=math.log(100.0)).exp()
    else:
        scale = step.scale if step.scale is not None else (channels // heads) ** -0.5
        attn = (q * scale).matmul(k.transpose(-2, -1))
    attn = attn + position_bias(step, dtype)
    if g.shifted:
        attn = attn + shift_mask(step, g, x).unsqueeze(1)
    return Terms(xw, F.softmax(attn, dim=-1), v, g)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``(N, windows, heads, L, d)`` → ``(N, windows, L, heads·d)``."""
    return t.transpose(2, 3).flatten(3)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`merge_heads`."""
    return t.unflatten(-1, (heads, -1)).transpose(2, 3)


def window_attention_forward(step: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    terms = attention_terms(step, x)
    o = merge_heads(terms.p.matmul(terms.v))
    bias = None if step.proj_bias is None else step.proj_bias.to(x.dtype)
    return from_windows(step, F.linear(o, step.proj_weight.to(x.dtype), bias), terms.geometry)
