"""Pictures of explanations: inputs beside their relevance heatmaps, written as one image file.

Uses matplotlib's object API (``matplotlib.figure.Figure`` with the Agg canvas) so that nothing
global is touched: no backend switch, no pyplot state, usable on headless machines.
"""
from __future__ import annotations

import math
import os
import textwrap
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["FORMATS", "figure_format", "heatmap_limit", "save_grid"]

_PANEL_INCHES = 1.3  # side of one image panel
_DPI = 100
_HEATMAP_CMAP = "bwr"  # diverging: red = positive relevance, blue = negative, white = 0
_TITLE_POINTS, _CAPTION_POINTS = 10, 8  # font sizes of the figure title and colour-bar caption
_COLORBAR_INCHES = 0.6  # band under the grid for the colour bar and its ticks, without caption

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}
"""File extensions :func:`save_grid` writes, and the matplotlib format of each."""


def figure_format(path: str | Path) -> str:
    """The matplotlib format for ``path``'s extension (case-insensitive); ValueError if unsupported."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        what = f"extension {suffix!r}" if suffix else "no extension"
        raise ValueError(f"{str(path)!r} has {what}; use one of " + ", ".join(FORMATS))
    return FORMATS[suffix]


def _wrap(text: str, width_inches: float, points: float) -> list[str]:
    # Lines that fit the figure's width (DejaVu Sans averages ~0.6 em per character), so a
    # narrow grid gets a taller band instead of a clipped title.
    chars = max(10, int(width_inches * 72 / (0.6 * points)))
    return [wrapped for line in text.splitlines() for wrapped in textwrap.wrap(line, chars) or [""]]


def _line_inches(points: float) -> float:
    return 1.25 * points / 72  # matplotlib's default line spacing is 1.2


def heatmap_limit(relevance: np.ndarray) -> float:
    """Symmetric colour limit ``m = max|R|`` of one map, so that 0 is always the centre colour.

    Returns 1.0 for an all-zero (or non-finite-only) map, so the scale is never degenerate.
    """
    finite = np.abs(relevance[np.isfinite(relevance)])
    m = float(finite.max()) if finite.size else 0.0
    return m if m > 0.0 else 1.0


def _to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, np.float32)


def _as_images(t: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    # (N, C, H, W) -> (N, H, W) or (N, H, W, 3) numpy arrays that imshow understands.
    a = _to_numpy(t)
    if a.ndim == 3:  # (N, H, W): already single-channel
        return a
    if a.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W) or (N, H, W), got {tuple(a.shape)}")
    if a.shape[1] == 1:
        return a[:, 0]
    if a.shape[1] == 3:
        return np.moveaxis(a, 1, -1)
    raise ValueError(f"{name} must have 1 or 3 channels, got {a.shape[1]}")


def _input_for_display(img: np.ndarray) -> tuple[np.ndarray, dict]:
    if img.ndim == 2:
        return img, {"cmap": "gray"}
    # RGB inputs may be normalised (any range): stretch each image to [0, 1] for display.
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo if hi > lo else 1.0), {}


def save_grid(
    images: torch.Tensor | np.ndarray,
    relevance: torch.Tensor | np.ndarray,
    path: str | Path,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    *,
    heatmap_titles: Sequence[str] | None = None,
    title: str | None = None,
    colorbar: str | None = None,
) -> Path:
    """Write ONE image file showing each input beside its relevance heatmap.

    images:    (N, C, H, W) inputs, C in {1, 3} (or (N, H, W)).
    relevance: (N, C, H, W) relevance of the same N inputs (or (N, H, W)); channels are summed,
               since relevance is additive over input dimensions.
    path:      where to write; the extension picks the format (:data:`FORMATS`: .png, .jpg,
               .jpeg, .pdf, .svg). Parent folders are created. The file appears whole or not at
               all (written beside it, then renamed over it), and a symlink at ``path`` is
               replaced, not written through.
    titles:    optional N strings, shown above each input panel.
    ncols:     pairs per row; default about sqrt(N), so the grid is roughly square.
    heatmap_titles: optional N strings, shown above each heatmap panel.
    title:     optional figure title (may hold several lines), in a band above the grid.
    colorbar:  optional caption of a colour bar drawn in a band under the grid; its ends are
               labelled -max|R| and +max|R|, the per-map scale described below.

    Sample ``i`` occupies row ``i // ncols``, columns ``2*(i % ncols)`` (input) and
    ``2*(i % ncols) + 1`` (heatmap). Each heatmap uses a diverging colormap centred on 0 with its
    own symmetric scale ``[-m, m]``, ``m = max|R|`` of that sample. Returns the path written.
    """
    FigureCanvasAgg, Figure = require_matplotlib()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fmt = figure_format(path)
    imgs = _as_images(images, "images")
    rel = _to_numpy(relevance)
    if rel.ndim == 4:
        rel = rel.sum(axis=1)
    n = imgs.shape[0]
    if rel.ndim != 3 or rel.shape[0] != n or rel.shape[1:] != imgs.shape[1:3]:
        raise ValueError(
            f"relevance shape {tuple(np.shape(relevance))} does not match "
            f"images {tuple(np.shape(images))}"
        )
    if n == 0:
        raise ValueError("save_grid needs at least one image")
    for name, labels in (("titles", titles), ("heatmap_titles", heatmap_titles)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"got {len(labels)} {name} for {n} images")
    ncols = math.ceil(math.sqrt(n)) if ncols is None else ncols
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = math.ceil(n / ncols)
    labelled = titles is not None or heatmap_titles is not None

    # Bands for the title and the colour bar are added in inches, so the panels keep their size
    # and the figure without them is exactly the bare grid.
    grid_h = nrows * _PANEL_INCHES
    width = 2 * ncols * _PANEL_INCHES
    title_lines = [] if title is None else _wrap(title, width, _TITLE_POINTS)
    caption_lines = [] if colorbar is None else _wrap(colorbar, 0.95 * width, _CAPTION_POINTS)
    top_in = 0.0 if title is None else (len(title_lines) + 0.4) * _line_inches(_TITLE_POINTS)
    bottom_in = 0.0 if colorbar is None else (
        _COLORBAR_INCHES + len(caption_lines) * _line_inches(_CAPTION_POINTS))
    height = grid_h + top_in + bottom_in
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 2 * ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        r, c = divmod(i, ncols)
        shown, kw = _input_for_display(imgs[i])
        axes[r, 2 * c].imshow(shown, interpolation="nearest", **kw)
        m = heatmap_limit(rel[i])
        axes[r, 2 * c + 1].imshow(rel[i], cmap=_HEATMAP_CMAP, vmin=-m, vmax=m, interpolation="nearest")
        if titles is not None:
            axes[r, 2 * c].set_title(titles[i], fontsize=8)
        if heatmap_titles is not None:
            axes[r, 2 * c + 1].set_title(heatmap_titles[i], fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99,
                        bottom=(bottom_in + 0.01 * grid_h) / height,
                        top=1 - (top_in + (0.08 if labelled else 0.01) * grid_h) / height,
                        wspace=0.05, hspace=0.25 if labelled else 0.05)
    if title is not None:
        fig.text(0.5, 1 - 0.2 * _line_inches(_TITLE_POINTS) / height, "\n".join(title_lines),
                 ha="center", va="top", fontsize=_TITLE_POINTS)
    if colorbar is not None:
        bar_w = min(4.0, 0.6 * width)
        cax = fig.add_axes(((1 - bar_w / width) / 2, 0.25 / height, bar_w / width, 0.1 / height))
        # Every map has its own scale, so the bar is in units of that map's max |R|.
        bar = fig.colorbar(ScalarMappable(Normalize(-1.0, 1.0), _HEATMAP_CMAP), cax=cax,
                           orientation="horizontal", ticks=[-1.0, 0.0, 1.0])
        bar.ax.set_xticklabels(["\u2212max |R|", "0", "+max |R|"], fontsize=7)
        bar.ax.set_title("\n".join(caption_lines), fontsize=_CAPTION_POINTS)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        # Fixed dpi and no bbox_inches="tight": the pixel size is then a function of the grid shape.
        fig.savefig(tmp, format=fmt, dpi=_DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def require_matplotlib():
    """matplotlib's Agg canvas and Figure classes, imported on first use: matplotlib is the
    optional ``[viz]`` extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("rlrp_fast's figures need matplotlib, the optional 'viz' extra: "
                          "pip install 'rlrp_fast[viz]'") from err
    return FigureCanvasAgg, Figure
