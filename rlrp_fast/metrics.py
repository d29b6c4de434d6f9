"""Faithfulness, robustness and sanity metrics for relevance maps, batched.

Every metric works on a whole batch at once, on the explanation's device: the perturbation
curves make **one model call per step for the whole batch** (optionally chunked with
``batch_size``), never a Python loop per image. Nothing here prints; long runs can show a
progress bar on stderr with ``progress=True`` (tqdm when installed, a minimal bar otherwise).

Faithfulness
    :func:`region_perturbation` MoRF / LeRF curves of the target score as patches are replaced
    by a baseline, their AUCs and ABPC = AUC(LeRF) - AUC(MoRF) (higher is better).
    :func:`insertion_deletion` insertion (start from the baseline, put the most relevant
    patches back first; higher AUC is better) and deletion (remove the most relevant first;
    lower is better).
Sanity
    :func:`randomize_top_layers`, :func:`randomization_check`: Spearman rank correlation of the
    maps before and after re-initialising the top layers' weights (a method that is faithful
    to the model must change: low correlation).
Map statistics
    :func:`gini` (sparseness), :func:`concentration` (max|R| / ‖R‖₁),
    :func:`nonfinite_count`, :func:`map_shift` (relative L1 distance of two maps),
    :func:`spearman` (per sample, average ranks for ties), :func:`layer_diagnostics`
    (per-layer conservation and L1 mass of an explanation).
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "InsertionDeletion",
    "LayerDiagnostic",
    "RegionPerturbation",
    "auc",
    "concentration",
    "gini",
    "insertion_deletion",
    "layer_diagnostics",
    "make_baseline",
    "map_shift",
    "nonfinite_count",
    "patch_order",
    "patch_relevance",
    "perturbation_curve",
    "progress_bar",
    "randomization_check",
    "randomize_top_layers",
    "region_perturbation",
    "spearman",
    "summarize",
]

Baseline = str | float | torch.Tensor


# =============================================================================================
# Progress bar
# =============================================================================================
class _StderrBar:
    """A minimal text progress bar on stderr (used when tqdm is not installed)."""

    def __init__(self, iterable: Iterable, total: int | None, desc: str) -> None:
        self.iterable, self.desc = iterable, desc
        self.total = total if total is not None else (
            len(iterable) if hasattr(iterable, "__len__") else None)

    def _draw(self, done: int) -> None:
        if self.total:
            filled = int(30 * done / self.total)
            text = f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}"
        else:
            text = f"\r{self.desc} {done}"
        sys.stderr.write(text)
        sys.stderr.flush()

    def __iter__(self) -> Iterator:
        done = 0
        self._draw(done)
        for item in self.iterable:
            yield item
            done += 1
            self._draw(done)
        sys.stderr.write("\n")
        sys.stderr.flush()


def progress_bar(iterable: Iterable, enabled: bool, desc: str = "",
                 total: int | None = None) -> Iterable:
    """``iterable`` itself when not ``enabled``; else wrapped in a progress bar on stderr."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _StderrBar(iterable, total, desc)
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


# =============================================================================================
# Patches, orders, baselines
# =============================================================================================
def _patch_ids(height: int, width: int, patch_size: int, device) -> tuple[torch.Tensor, int]:
    """``(H*W,)`` patch index of every pixel (row-major patches; edge patches may be smaller)
    and the number of patches."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    rows = torch.arange(height, device=device) // patch_size
    cols = torch.arange(width, device=device) // patch_size
    per_row = math.ceil(width / patch_size)
    ids = (rows[:, None] * per_row + cols[None, :]).reshape(-1)
    return ids, math.ceil(height / patch_size) * per_row


def _check_images(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be an image batch (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def patch_relevance(relevance: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Relevance summed over channels and over each ``patch_size`` x ``patch_size`` patch:
    ``(N, C, H, W)`` -> ``(N, P)``, patches in row-major order."""
    _check_images(relevance, "relevance")
    n, _, h, w = relevance.shape
    ids, num = _patch_ids(h, w, patch_size, relevance.device)
    per_pixel = relevance.sum(dim=1).reshape(n, -1).to(torch.float64)
    out = per_pixel.new_zeros(n, num)
    return out.index_add_(1, ids, per_pixel)


def patch_order(relevance: torch.Tensor, patch_size: int, most_relevant_first: bool = True,
                seed: int = 0) -> torch.Tensor:
    """``(N, P)`` patch indices sorted by patch relevance (descending for MoRF, ascending for
    LeRF). Ties are broken by a seeded random permutation (not by position, which would
    favour one corner of the image)."""
    scores = patch_relevance(relevance, patch_size)
    if not torch.isfinite(scores).all():
        # NaN/Inf maps: treat non-finite patches as the least informative (0)
        scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
    n, num = scores.shape
    gen = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(n, num, generator=gen), dim=1).to(scores.device)
    shuffled = scores.gather(1, perm)
    idx = torch.argsort(shuffled, dim=1, descending=most_relevant_first, stable=True)
    return perm.gather(1, idx)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    out = x
    for kernel, pad in ((k.view(1, 1, 1, -1), (radius, radius, 0, 0)),
                        (k.view(1, 1, -1, 1), (0, 0, radius, radius))):
        out = F.conv2d(F.pad(out, pad, mode="replicate"), kernel.expand(c, 1, *kernel.shape[2:]),
                       groups=c)
    return out


def make_baseline(x: torch.Tensor, baseline: Baseline = "zeros",
                  blur_sigma: float | None = None) -> torch.Tensor:
    """The image every perturbed patch takes its values from, ``x``'s shape.

    ``baseline``: ``"zeros"``; ``"mean"`` (per-channel mean of the batch ``x``; pass a tensor
    for a data set's mean); ``"blur"`` (a Gaussian-blurred copy of each image, sigma
    ``blur_sigma``, default an eighth of the image side); a number; or a tensor that
    broadcasts to ``x`` (e.g. a ``(C, 1, 1)`` data set mean)."""
    _check_images(x)
    if isinstance(baseline, torch.Tensor):
        return baseline.to(device=x.device, dtype=x.dtype).expand_as(x).clone()
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=(0, 2, 3), keepdim=True).expand_as(x).clone()
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else max(x.shape[-1], x.shape[-2]) / 8
        return _gaussian_blur(x, float(sigma))
    raise ValueError(f"baseline must be 'zeros', 'mean', 'blur', a number or a tensor, "
                     f"got {baseline!r}")


# =============================================================================================
# Perturbation curves
# =============================================================================================
def _scores(model: nn.Module, x: torch.Tensor, target: torch.Tensor, score: str,
            batch_size: int | None) -> torch.Tensor:
    chunks = [x] if batch_size is None else torch.split(x, batch_size)
    outs = [model(c) for c in chunks]
    logits = torch.cat(outs) if len(outs) > 1 else outs[0]
    if score == "prob":
        values = logits.float().softmax(dim=1)
    elif score == "logit":
        values = logits.float()
    else:
        raise ValueError(f"score must be 'prob' or 'logit', got {score!r}")
    return values.gather(1, target.view(-1, 1)).squeeze(1).to(torch.float64)


def _steps_counts(num_patches: int, steps: int) -> list[int]:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [round(k * num_patches / steps) for k in range(steps + 1)]


def _target_tensor(model: nn.Module, x: torch.Tensor, target, score_batch: int | None
                   ) -> torch.Tensor:
    n = x.shape[0]
    if target is None:
        with torch.inference_mode():
            chunks = [x] if score_batch is None else torch.split(x, score_batch)
            return torch.cat([model(c).argmax(dim=1) for c in chunks])
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=x.device)
    target = torch.as_tensor(target, device=x.device).long()
    if target.shape != (n,):
        raise ValueError(f"target must be None, an int or shape ({n},), got {tuple(target.shape)}")
    return target


def perturbation_curve(model: nn.Module, x: torch.Tensor, order: torch.Tensor,
                       target: torch.Tensor | int | None = None, patch_size: int = 4,
                       steps: int = 16, baseline: Baseline = "zeros", insertion: bool = False,
                       score: str = "prob", batch_size: int | None = None,
                       progress: bool = False, desc: str = "perturbation") -> torch.Tensor:
    """The target score after each step of perturbing patches in ``order``.

    Args:
        model: the classifier (eval mode), on ``x``'s device.
        x: ``(N, C, H, W)`` images.
        order: ``(N, P)`` patch indices in the order they are perturbed (:func:`patch_order`).
        target: class whose score is tracked (None: the model's prediction on ``x``).
        patch_size, steps: patches of ``patch_size`` pixels square; after step ``k`` the first
            ``round(k·P/steps)`` patches of ``order`` are perturbed.
        baseline: see :func:`make_baseline`.
        insertion: False (deletion: the perturbed patches take the baseline's values) or True
            (insertion: start from the baseline; the perturbed patches take ``x``'s values).
        score: ``"prob"`` (softmax probability of the target) or ``"logit"``.
        batch_size: chunk each step's model call (None: the whole batch in one call).

    Returns: ``(N, steps + 1)`` float64, column 0 before any perturbation.
    """
    _check_images(x)
    n, _, h, w = x.shape
    ids, num = _patch_ids(h, w, patch_size, x.device)
    if order.shape != (n, num):
        raise ValueError(f"order must have shape ({n}, {num}) for {patch_size}-pixel patches "
                         f"of {h}x{w} images, got {tuple(order.shape)}")
    target = _target_tensor(model, x, target, batch_size)
    base = make_baseline(x, baseline)
    # rank[n, p] = position of patch p in sample n's order
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num, device=x.device).expand(n, num))
    pixel_rank = rank[:, ids].view(n, 1, h, w)
    counts = _steps_counts(num, steps)
    curve = torch.empty(n, steps + 1, dtype=torch.float64, device=x.device)
    with torch.inference_mode():
        for k in progress_bar(range(steps + 1), progress, desc):
            changed = pixel_rank < counts[k]
            xk = torch.where(changed, x, base) if insertion else torch.where(changed, base, x)
            curve[:, k] = _scores(model, xk, target, score, batch_size)
    return curve


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area under ``(N, K+1)`` curves sampled at evenly spaced fractions
    ``0, 1/K, ..., 1`` of the perturbed patches: ``(N,)``."""
    if curve.dim() != 2 or curve.shape[1] < 2:
        raise ValueError(f"curve must be (N, K+1) with K >= 1, got {tuple(curve.shape)}")
    k = curve.shape[1] - 1
    return (curve[:, 1:] + curve[:, :-1]).sum(dim=1) / (2 * k)


@dataclass(frozen=True)
class RegionPerturbation:
    """Per-sample results of :func:`region_perturbation` (float64 tensors).

    ``morf``/``lerf`` ``(N, steps+1)`` curves, ``fractions`` ``(steps+1,)`` fraction of patches
    perturbed at each step, ``auc_morf``/``auc_lerf``/``abpc`` ``(N,)``."""

    morf: torch.Tensor
    lerf: torch.Tensor
    fractions: torch.Tensor
    auc_morf: torch.Tensor
    auc_lerf: torch.Tensor
    abpc: torch.Tensor


def region_perturbation(model: nn.Module, x: torch.Tensor, relevance: torch.Tensor,
                        target: torch.Tensor | int | None = None, patch_size: int = 4,
                        steps: int = 16, baseline: Baseline = "zeros", score: str = "prob",
                        batch_size: int | None = None, seed: int = 0,
                        progress: bool = False) -> RegionPerturbation:
    """Pixel-flipping / region perturbation: the target score as patches are replaced by the
    baseline most-relevant-first (MoRF) and least-relevant-first (LeRF); ABPC = AUC(LeRF) −
    AUC(MoRF). A faithful map makes MoRF drop fast and LeRF stay high (large ABPC).

    ``relevance`` has ``x``'s shape (channels are summed); other arguments as in
    :func:`perturbation_curve`. Ties in patch relevance are broken by a ``seed``-ed permutation.
    """
    if relevance.shape != x.shape:
        raise ValueError(f"relevance {tuple(relevance.shape)} and x {tuple(x.shape)} differ")
    target = _target_tensor(model, x, target, batch_size)
    curves = []
    for most_first, name in ((True, "MoRF"), (False, "LeRF")):
        order = patch_order(relevance, patch_size, most_relevant_first=most_first, seed=seed)
        curves.append(perturbation_curve(model, x, order, target, patch_size, steps, baseline,
                                         insertion=False, score=score, batch_size=batch_size,
                                         progress=progress, desc=name))
    morf, lerf = curves
    fractions = torch.tensor(_steps_counts(order.shape[1], steps), dtype=torch.float64,
                             device=x.device) / order.shape[1]
    a_morf, a_lerf = auc(morf), auc(lerf)
    return RegionPerturbation(morf, lerf, fractions, a_morf, a_lerf, a_lerf - a_morf)


@dataclass(frozen=True)
class InsertionDeletion:
    """Per-sample results of :func:`insertion_deletion` (float64 tensors)."""

    insertion: torch.Tensor
    deletion: torch.Tensor
    auc_insertion: torch.Tensor
    auc_deletion: torch.Tensor


def insertion_deletion(model: nn.Module, x: torch.Tensor, relevance: torch.Tensor,
                       target: torch.Tensor | int | None = None, patch_size: int = 4,
                       steps: int = 16, insertion_baseline: Baseline = "blur",
                       deletion_baseline: Baseline = "zeros", score: str = "prob",
                       batch_size: int | None = None, seed: int = 0,
                       progress: bool = False) -> InsertionDeletion:
    """Insertion / deletion (Petsiuk et al., RISE): deletion replaces the most relevant patches
    first by ``deletion_baseline`` (lower AUC is better); insertion starts from
    ``insertion_baseline`` (a blurred copy by default) and puts the most relevant patches of
    ``x`` back first (higher AUC is better)."""
    if relevance.shape != x.shape:
        raise ValueError(f"relevance {tuple(relevance.shape)} and x {tuple(x.shape)} differ")
    target = _target_tensor(model, x, target, batch_size)
    order = patch_order(relevance, patch_size, most_relevant_first=True, seed=seed)
    ins = perturbation_curve(model, x, order, target, patch_size, steps, insertion_baseline,
                             insertion=True, score=score, batch_size=batch_size,
                             progress=progress, desc="insertion")
    dele = perturbation_curve(model, x, order, target, patch_size, steps, deletion_baseline,
                              insertion=False, score=score, batch_size=batch_size,
                              progress=progress, desc="deletion")
    return InsertionDeletion(ins, dele, auc(ins), auc(dele))


# =============================================================================================
# Rank correlation and randomisation
# =============================================================================================
def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Per-row ranks 1..M with ties given their average rank (as scipy's ``rankdata``)."""
    n, m = v.shape
    sorted_v, idx = torch.sort(v, dim=1, stable=True)
    new_group = torch.ones_like(sorted_v, dtype=torch.bool)
    new_group[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    group = torch.cumsum(new_group.to(torch.long), dim=1) - 1          # 0.. per row
    group = group + torch.arange(n, device=v.device).view(-1, 1) * m   # unique across rows
    pos = torch.arange(1, m + 1, dtype=torch.float64, device=v.device).expand(n, m)
    total = torch.zeros(n * m, dtype=torch.float64, device=v.device)
    count = torch.zeros(n * m, dtype=torch.float64, device=v.device)
    total.index_add_(0, group.reshape(-1), pos.reshape(-1))
    count.index_add_(0, group.reshape(-1), torch.ones_like(pos).reshape(-1))
    avg_sorted = (total / count.clamp_min(1))[group]
    ranks = torch.empty_like(avg_sorted)
    ranks.scatter_(1, idx, avg_sorted)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of ``a[i]`` and ``b[i]`` for every sample, ``(N,)`` float64
    (average ranks for ties; NaN where a map is constant)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    ra = _average_ranks(a.reshape(a.shape[0], -1).to(torch.float64))
    rb = _average_ranks(b.reshape(b.shape[0], -1).to(torch.float64))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    den = ra.norm(dim=1) * rb.norm(dim=1)
    num = (ra * rb).sum(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))


_PARAMETRIC = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def randomize_top_layers(model: nn.Module, n_layers: int, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose top ``n_layers`` Linear/Conv layers (in registration
    order, counted from the output) have freshly initialised weights and biases (their
    ``reset_parameters``, under a private ``seed``-ed RNG). The copy keeps ``model``'s mode;
    ``model`` itself is untouched (cascading randomisation, Adebayo et al. 2018)."""
    layers = [m for m in model.modules() if isinstance(m, _PARAMETRIC)]
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"n_layers must be between 1 and {len(layers)} (the Linear/Conv "
                         f"layers of the model), got {n_layers}")
    clone = copy.deepcopy(model)
    clone_layers = [m for m in clone.modules() if isinstance(m, _PARAMETRIC)]
    devices = [p.device for p in clone.parameters() if p.device.type != "cpu"]
    with torch.random.fork_rng(devices=devices[:1]):
        torch.manual_seed(seed)
        for layer in clone_layers[len(clone_layers) - n_layers:]:
            layer.reset_parameters()
            if layer.bias is not None:  # default init is tiny; make biases matter (as weights)
                with torch.no_grad():
                    layer.bias.normal_(0.0, float(layer.weight.std()))
    return clone


def randomization_check(make_explainer: Callable[[nn.Module], object], model: nn.Module,
                        x: torch.Tensor, n_layers: int = 1, target=None, seed: int = 0,
                        absolute: bool = False) -> torch.Tensor:
    """Spearman correlation, per sample, of the map of ``model`` and the map of a copy whose
    top ``n_layers`` layers are re-initialised (:func:`randomize_top_layers`), for the same
    targets (the original model's prediction by default). A method passes the sanity check
    when this is low; a method blind to the model's weights stays near 1.

    ``make_explainer(model)`` returns an object with ``.explain(x, target=...)`` (e.g.
    ``lambda m: rlrp_fast.Explainer(m, rule="rlrp")``). ``absolute``: correlate ``|R|``."""
    before = make_explainer(model).explain(x, target=target)
    targets = before.targets
    after = make_explainer(randomize_top_layers(model, n_layers, seed)).explain(x, target=targets)
    ra, rb = before.relevance, after.relevance
    if absolute:
        ra, rb = ra.abs(), rb.abs()
    return spearman(ra, rb)


# =============================================================================================
# Map statistics
# =============================================================================================
def _flat(r: torch.Tensor) -> torch.Tensor:
    return r.reshape(r.shape[0], -1).to(torch.float64)


def gini(relevance: torch.Tensor) -> torch.Tensor:
    """Gini index of ``|R|`` per sample (Hurley & Rickard's sparseness): 0 for a uniform map,
    → 1 for a map with one non-zero element; 0 for an all-zero map. ``(N,)`` float64."""
    c = torch.sort(_flat(relevance).abs(), dim=1).values
    m = c.shape[1]
    total = c.sum(dim=1)
    k = torch.arange(1, m + 1, dtype=torch.float64, device=c.device)
    weights = (m - k + 0.5) / m
    g = 1 - 2 * (c * weights).sum(dim=1) / total.clamp_min(1e-300)
    return torch.where(total > 0, g, torch.zeros_like(g))


def concentration(relevance: torch.Tensor) -> torch.Tensor:
    """``max|R| / ‖R‖₁`` per sample (1 when one element holds all the relevance; NaN/Inf
    propagate). ``(N,)`` float64."""
    r = _flat(relevance).abs()
    return r.amax(dim=1) / r.sum(dim=1)


def nonfinite_count(relevance: torch.Tensor) -> torch.Tensor:
    """Number of NaN/Inf elements per sample, ``(N,)`` long."""
    return (~torch.isfinite(relevance.reshape(relevance.shape[0], -1))).sum(dim=1)


def map_shift(before: torch.Tensor, after: torch.Tensor, normalize: bool = True
              ) -> torch.Tensor:
    """How far a map moved: ``‖R₁/‖R₁‖₁ − R₂/‖R₂‖₁‖₁`` per sample (``normalize``, in [0, 2],
    insensitive to a positive rescaling) or the raw ``‖R₁ − R₂‖₁ / ‖R₁‖₁``. ``(N,)`` float64;
    NaN when a map is non-finite."""
    a, b = _flat(before), _flat(after)
    if normalize:
        a = a / a.abs().sum(dim=1, keepdim=True).clamp_min(1e-300)
        b = b / b.abs().sum(dim=1, keepdim=True).clamp_min(1e-300)
        return (a - b).abs().sum(dim=1)
    return (a - b).abs().sum(dim=1) / a.abs().sum(dim=1).clamp_min(1e-300)


# =============================================================================================
# Per-layer diagnostics
# =============================================================================================
@dataclass(frozen=True)
class LayerDiagnostic:
    """One relevance-propagating step of an explanation (backward order), per sample
    ``(N,)`` float64: ``l1_out``/``sum_out`` = ``‖R_z‖₁``/``ΣR_z`` at the step's output,
    ``l1_in``/``sum_in`` the same for the relevance it passed to its input(s) (summed over
    inputs). ``conservation = sum_in / sum_out`` (1 for a conservative rule) and
    ``l1_ratio = l1_in / l1_out`` (1 for R-LRP by construction)."""

    name: str
    kind: str
    l1_out: torch.Tensor
    sum_out: torch.Tensor
    l1_in: torch.Tensor
    sum_in: torch.Tensor

    @property
    def conservation(self) -> torch.Tensor:
        return self.sum_in / self.sum_out

    @property
    def l1_ratio(self) -> torch.Tensor:
        return self.l1_in / self.l1_out


def layer_diagnostics(explainer, x: torch.Tensor, target=None) -> list[LayerDiagnostic]:
    """Run ``explainer`` (a :class:`rlrp_fast.Explainer` with a relevance rule, not
    ``gradient_x_input``) on ``x`` and return the conservation / L1-mass record of every step
    whose rule changes relevance (Linear, Conv, pools, lone BatchNorms, residual adds), in
    backward order (output first). The relevance is the explainer's own (same engine, same
    backend); routing steps (activations, max-pool, reshapes) are conservative by construction
    and not listed."""
    log: list[LayerDiagnostic] = []

    def record(step, r_out: torch.Tensor, r_in: list[torch.Tensor]) -> None:
        r_z, r_a = _flat(r_out), [_flat(p) for p in r_in]
        log.append(LayerDiagnostic(
            step.name, type(step).__name__, r_z.abs().sum(1), r_z.sum(1),
            sum(p.abs().sum(1) for p in r_a), sum(p.sum(1) for p in r_a)))

    explainer.explain(x, target, on_step=record)
    return log


def summarize(values: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """``(mean, standard error)`` of finite values (NaN when none)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return math.nan, math.nan
    se = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return float(v.mean()), se
