"""The end-to-end demo: explain the embedded digits CNN and draw what it looked at.

Loads the shipped :func:`rlrp_fast.digits.load_pretrained` model and the fixed test split,
measures accuracy, explains one batch with :class:`rlrp_fast.Explainer`, times it, and writes a
PNG of inputs beside their relevance heatmaps.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .digits import evaluate_accuracy, load_digits_split, load_pretrained
from .viz import save_grid

__all__ = ["run_demo"]


def _sync(device: torch.device) -> None:
    # CUDA launches are asynchronous: without a sync the timer would stop before the work ends.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {str(device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use device='cpu'")
    return dev


def run_demo(
    out: str | Path = "rlrp_demo.png",
    rule: str = "rlrp",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    n_show: int = 16,
    **rule_options: Any,
) -> dict[str, Any]:
    """Explain ``batch_size`` test digits with ``rule`` and save a PNG of the first ``n_show``.

    rule_options are passed to ``rlrp_fast.Explainer(model, rule=rule, **rule_options)`` (e.g.
    ``backend="torch"``). The explained batch is the first ``batch_size`` images of the fixed
    test split; ``n_show`` is capped at ``batch_size``. Each panel title is
    ``true <label> / pred <class>``.

    Returns a dict:
      accuracy      fraction (0..1) of the whole test split the model classifies correctly
      images_per_s  explained images per second over one ``explain`` call on the batch, measured
                    after one warm-up call (model forward + relevance pass)
      seconds       wall time, in seconds, of that timed ``explain`` call
      png           absolute ``Path`` of the PNG written
    """
    from rlrp_fast import Explainer  # late import: the engine package imports nothing from here

    dev = _check_device(device)
    _, _, x_test, y_test = load_digits_split()
    if not 1 <= batch_size <= len(x_test):
        raise ValueError(
            f"batch_size must be between 1 and {len(x_test)} (the test split), got {batch_size}"
        )
    if n_show < 1:
        raise ValueError(f"n_show must be >= 1, got {n_show}")
    n_show = min(n_show, batch_size)

    model = load_pretrained().to(dev)
    accuracy = evaluate_accuracy(model, x_test, y_test)

    explainer = Explainer(model, rule=rule, **rule_options)
    x = x_test[:batch_size].to(dev)
    explainer.explain(x)  # warm-up: first-call costs (allocation, kernel compilation) are not speed
    _sync(dev)
    t0 = time.perf_counter()
    explanation = explainer.explain(x)
    _sync(dev)
    seconds = time.perf_counter() - t0

    predicted = explanation.logits.argmax(1).cpu()
    titles = [f"true {int(t)} / pred {int(p)}" for t, p in zip(y_test[:n_show], predicted[:n_show])]
    png = save_grid(x[:n_show].cpu(), explanation.relevance[:n_show].cpu(), out, titles=titles)
    return {
        "accuracy": accuracy,
        "images_per_s": batch_size / seconds if seconds > 0 else float("inf"),
        "png": Path(png).resolve(),
        "seconds": seconds,
    }
