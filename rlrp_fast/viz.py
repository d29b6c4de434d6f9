"""Pictures of explanations: inputs beside their relevance heatmaps, written as one PNG.

Uses matplotlib's object API (``matplotlib.figure.Figure`` with the Agg canvas) so that nothing
global is touched: no backend switch, no pyplot state, usable on headless machines.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["heatmap_limit", "save_grid"]

_PANEL_INCHES = 1.3  # side of one image panel
_DPI = 100
_HEATMAP_CMAP = "bwr"  # diverging: red = positive relevance, blue = negative, white = 0


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
) -> Path:
    """Write ONE PNG showing each input beside its relevance heatmap.

    images:    (N, C, H, W) inputs, C in {1, 3} (or (N, H, W)).
    relevance: (N, C, H, W) relevance of the same N inputs (or (N, H, W)); channels are summed,
               since relevance is additive over input dimensions.
    path:      where to write the PNG (parent folders are created).
    titles:    optional N strings, shown above each input panel.
    ncols:     pairs per row; default about sqrt(N), so the grid is roughly square.

    Sample ``i`` occupies row ``i // ncols``, columns ``2*(i % ncols)`` (input) and
    ``2*(i % ncols) + 1`` (heatmap). Each heatmap uses a diverging colormap centred on 0 with its
    own symmetric scale ``[-m, m]``, ``m = max|R|`` of that sample. Returns the path written.
    """
    FigureCanvasAgg, Figure = require_matplotlib()

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
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} images")
    ncols = math.ceil(math.sqrt(n)) if ncols is None else ncols
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = math.ceil(n / ncols)

    fig = Figure(figsize=(2 * ncols * _PANEL_INCHES, nrows * _PANEL_INCHES), dpi=_DPI)
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
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.99 if titles is None else 0.92,
                        wspace=0.05, hspace=0.25 if titles is not None else 0.05)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed dpi and no bbox_inches="tight": the pixel size is then a function of the grid shape.
    fig.savefig(path, format="png", dpi=_DPI)
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
