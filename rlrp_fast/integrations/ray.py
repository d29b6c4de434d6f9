"""Ray Data: explain a dataset of images with ``Dataset.map_batches``.

    import ray
    from rlrp_fast.integrations.ray import ExplainBatch

    ds = ray.data.from_items([{"image": x} for x in images])      # (C, H, W) float32 arrays
    ds = ds.map_batches(ExplainBatch, fn_constructor_args=(make_model,),
                        fn_constructor_kwargs={"top_k": 3}, batch_size=64, concurrency=4)
    ds.take(1)[0]["relevance"].shape                             # (3, C, H, W)

Each actor builds its model and :class:`rlrp_fast.Explainer` once (``make_model`` is a
zero-argument callable returning the ``nn.Module``, or the module itself, which Ray pickles),
then explains every batch it is given. Images must already be preprocessed model inputs
(for files, :class:`rlrp_fast.pipeline.Preprocess` does it). Install Ray with
``pip install "rlrp_fast[ray]"``; this module itself does not import Ray.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["ExplainBatch"]


class ExplainBatch:
    """A callable class for ``ray.data.Dataset.map_batches`` (numpy batch format).

    Args:
        model: an ``nn.Module`` or a zero-argument callable that returns one (called once per
            actor: the way to load weights inside the actor instead of shipping them).
        rule, backend, options: passed to :class:`rlrp_fast.Explainer`.
        top_k: explain the K highest-scoring classes of each image.
        column: the batch column holding the images, ``(N, C, H, W)`` or a sequence of
            ``(C, H, W)`` arrays.
        device: ``"cpu"`` or ``"cuda"`` (with ``map_batches(..., num_gpus=1)``).
        relevance_dtype: dtype of the returned relevance (e.g. ``np.float16`` to halve it).

    Returns, per batch, the input columns plus ``relevance`` ``(N, K, C, H, W)`` (``(N, C, H,
    W)`` when ``top_k == 1``), ``targets`` ``(N, K)``, ``logits`` ``(N, classes)`` and
    ``relevance_l1`` ``(N, K)``.
    """

    def __init__(self, model: torch.nn.Module | Callable[[], torch.nn.Module],
                 rule: str = "rlrp", top_k: int = 1, column: str = "image",
                 device: str = "cpu", backend: str = "auto",
                 relevance_dtype=np.float32, **options) -> None:
        from ..explainer import Explainer

        module = model if isinstance(model, torch.nn.Module) else model()
        self.device = torch.device(device)
        self.explainer = Explainer(module.eval().to(self.device), rule=rule, backend=backend,
                                   **options)
        self.top_k, self.column = int(top_k), column
        self.relevance_dtype = np.dtype(relevance_dtype)
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")

    def __call__(self, batch: dict) -> dict:
        from ..pipeline import explain_targets

        images = batch[self.column]
        x = torch.as_tensor(np.stack(list(images)) if not isinstance(images, np.ndarray)
                            or images.dtype == object else images)
        if not x.is_floating_point():
            raise TypeError(f"column {self.column!r} must hold float arrays (preprocessed "
                            f"model inputs), got {x.dtype}")
        x = x.to(self.device)
        logits, targets, relevance = explain_targets(self.explainer, x, self.top_k)
        rel = relevance.cpu()
        out = dict(batch)
        out["relevance"] = (rel[:, 0] if self.top_k == 1 else rel).numpy().astype(
            self.relevance_dtype)
        out["targets"] = targets.cpu().numpy()
        out["logits"] = logits.float().cpu().numpy()
        out["relevance_l1"] = rel.flatten(2).abs().sum(2).numpy()
        return out
