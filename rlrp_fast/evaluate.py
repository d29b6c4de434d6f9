"""The evaluation driver: faithfulness, robustness and sanity of R-LRP against classic rules.

:func:`faithfulness_table` scores every method of :data:`METHODS` on one model (region
perturbation MoRF/LeRF/ABPC, insertion, deletion, Gini); :func:`run_full_evaluation` does it
for one section of zoo models (:data:`SECTIONS`: the three classic CNNs, or the ViT and the
SE-ConvNeXt) on the 540 held-out images of the evaluation split, adds the robustness and
randomisation studies and writes that section of ``docs/EVALUATION.md`` and two figures.
``rlrp-fast evaluate`` runs :func:`faithfulness_table` on the embedded demo CNN.

The library itself never prints: progress bars go to stderr only with ``progress=True``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from . import metrics as M
from . import zoo
from .digits import _single_thread, evaluate_accuracy
from .explainer import Explainer, Explanation

__all__ = ["ATTENTION_METHODS", "LXTAttnLRP", "METHODS", "Method", "RandomMap", "SECTIONS",
           "Section", "faithfulness_table", "format_table", "methods_for", "preactivation_std",
           "run_full_evaluation", "evaluate_default"]


def _targets(logits: torch.Tensor, target) -> torch.Tensor:
    """The explained class per sample: the prediction (``None``), one class for all (``int``)
    or one per sample."""
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, int):
        return torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
    return torch.as_tensor(target, device=logits.device).long()


class RandomMap:
    """The "random map" control: uniform noise in [-1, 1) relevance, seeded, independent of the
    model (so it must *fail* the randomisation check: its maps do not change with the weights).
    Same ``explain`` interface as :class:`rlrp_fast.Explainer`."""

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        self.model, self.seed = model, seed

    def explain(self, x: torch.Tensor, target=None) -> Explanation:
        with torch.inference_mode():
            logits = self.model(x)
        targets = _targets(logits, target)
        gen = torch.Generator().manual_seed(self.seed)
        r = torch.rand(x.shape, generator=gen, dtype=torch.float32) * 2 - 1
        return Explanation(relevance=r.to(x.device), logits=logits, targets=targets)


class LXTAttnLRP:
    """LXT 2.1's relevance for torchvision's ViT (``lxt.efficient.models.vit_torch.cp_LRP``),
    on any model built from the same ``torch.nn`` modules: CP-LRP inside
    ``nn.MultiheadAttention`` (no relevance through queries and keys: attention held
    constant), the identity rule through LayerNorm's σ and through GELU, then gradient × input
    (so LRP-0 on Linear/Conv layers; LXT's optional zennit γ-rules are not applied). Same
    ``explain`` interface as :class:`rlrp_fast.Explainer`.

    LXT patches these classes' ``forward`` process-wide; the patch is applied only for the
    duration of each :meth:`explain` and the original methods restored after it."""

    def __init__(self, model: nn.Module) -> None:
        try:
            from lxt.efficient.models.vit_torch import cp_LRP
        except ImportError as err:
            raise ImportError("the 'lxt' method needs LXT 2.1 with transformers 4 (LXT 2.1 "
                              "imports transformers.modeling_attn_mask_utils, which "
                              "transformers 5 removed): pip install lxt==2.1 'transformers<5'"
                              f" ({err})") from err
        self.model, self._patches = model, cp_LRP

    def explain(self, x: torch.Tensor, target=None) -> Explanation:
        saved = {cls: {name: cls.__dict__.get(name) for name in ("forward", "original_forward")}
                 for cls in self._patches}
        try:
            for cls, patch in self._patches.items():
                if not patch(cls):
                    raise RuntimeError(f"LXT could not patch {cls.__name__}.forward (already "
                                       "patched elsewhere in this process?)")
            with torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)
                logits = self.model(xg)
                targets = _targets(logits, target)
                picked = logits.gather(1, targets[:, None]).sum()
                (grad,) = torch.autograd.grad(picked, xg)
        finally:
            for cls, methods in saved.items():
                for name, fn in methods.items():
                    if fn is None:
                        if name in cls.__dict__:
                            delattr(cls, name)
                    else:
                        setattr(cls, name, fn)
        return Explanation(relevance=(xg * grad).detach(), logits=logits.detach(),
                           targets=targets)


def _has_attention(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


@dataclass(frozen=True)
class Method:
    """One row of the tables: ``make(model, eps_std)`` builds its explainer."""

    key: str
    label: str
    make: Callable[[nn.Module, float], object]


def _explainer(rule: str, **options) -> Callable[[nn.Module, float], object]:
    return lambda model, _eps: Explainer(model, rule=rule, **options)


METHODS: tuple[Method, ...] = (
    Method("rlrp", "R-LRP (default: norm=layer, skip=linear)", _explainer("rlrp", norm="layer")),
    Method("rlrp_neuron", "R-LRP (norm=neuron)", _explainer("rlrp", norm="neuron")),
    Method("rlrp_ratio", "R-LRP (skip=ratio)", _explainer("rlrp", norm="layer", skip="ratio")),
    Method("lrp0", "LRP-0", _explainer("lrp0")),
    Method("eps_1e-6", "LRP-ε (ε=1e-6)", _explainer("epsilon", epsilon=1e-6)),
    Method("eps_std", "LRP-ε (ε=0.25·std)",
           lambda model, eps: Explainer(model, rule="epsilon", epsilon=eps)),
    Method("EpsilonPlus", "EpsilonPlus", _explainer("EpsilonPlus")),
    Method("gxi", "gradient × input", _explainer("gradient_x_input")),
    Method("random", "random map", lambda model, _eps: RandomMap(model)),
)
"""The compared methods, in table order (they apply to every model)."""

ATTENTION_METHODS: tuple[Method, ...] = (
    Method("lxt", "LXT AttnLRP (CP-LRP attention)", lambda model, _eps: LXTAttnLRP(model)),
)
"""Methods compared on models with ``nn.MultiheadAttention`` only, after :data:`METHODS`."""

_BY_KEY = {m.key: m for m in METHODS + ATTENTION_METHODS}


def _lxt_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("lxt") is not None


def methods_for(model: nn.Module) -> list[str]:
    """The method keys :func:`run_full_evaluation` compares on ``model``: :data:`METHODS`, plus
    :data:`ATTENTION_METHODS` when ``model`` has ``nn.MultiheadAttention`` and LXT is
    installed."""
    keys = [m.key for m in METHODS]
    if _has_attention(model) and _lxt_installed():
        keys += [m.key for m in ATTENTION_METHODS]
    return keys


def _select(keys: Sequence[str] | None) -> list[Method]:
    if keys is None:
        return list(METHODS)
    unknown = [k for k in keys if k not in _BY_KEY]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(_BY_KEY)}")
    return [_BY_KEY[k] for k in keys]


# =============================================================================================
# ε = 0.25·std
# =============================================================================================
@torch.inference_mode()
def preactivation_std(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> float:
    """Standard deviation of all pre-activations of the network's Conv/Linear layers on ``x``,
    pooled over layers, after BatchNorm folding (a conv followed by a BatchNorm contributes
    the BatchNorm's output, which is what the folded conv computes)."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d,
                                                          nn.Conv3d))]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(x), batch_size):
        outputs: dict[int, torch.Tensor] = {}
        consumed: set[int] = set()

        def conv_hook(_m, _inp, out):
            outputs[id(out)] = out

        def norm_hook(_m, inp, out):
            consumed.add(id(inp[0]))  # the conv output this BatchNorm folds into
            outputs[id(out)] = out

        handles = [m.register_forward_hook(conv_hook) for m in convs]
        handles += [m.register_forward_hook(norm_hook) for m in norms]
        try:
            model(x[start:start + batch_size])
        finally:
            for h in handles:
                h.remove()
        for key, out in outputs.items():
            if key in consumed:
                continue
            v = out.double()
            total += float(v.sum())
            total_sq += float((v * v).sum())
            count += v.numel()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean * mean, 0.0))


# =============================================================================================
# Faithfulness
# =============================================================================================
@dataclass
class MethodScores:
    """Per-sample scores of one method on one model (float64 tensors, ``(N,)``)."""

    abpc: torch.Tensor
    auc_morf: torch.Tensor
    auc_lerf: torch.Tensor
    auc_insertion: torch.Tensor
    auc_deletion: torch.Tensor
    gini: torch.Tensor
    morf_curve: torch.Tensor  # (steps+1,) mean over samples
    lerf_curve: torch.Tensor
    seconds: float
    relevance: torch.Tensor = field(repr=False)


def _explain_batched(explainer, x: torch.Tensor, batch_size: int) -> Explanation:
    parts = [explainer.explain(x[s:s + batch_size]) for s in range(0, len(x), batch_size)]
    return Explanation(torch.cat([p.relevance for p in parts]),
                       torch.cat([p.logits for p in parts]),
                       torch.cat([p.targets for p in parts]))


def faithfulness_table(model: nn.Module, x: torch.Tensor, methods: Sequence[str] | None = None,
                       patch_size: int = 4, steps: int = 16, baseline="zeros",
                       insertion_baseline="blur", deletion_baseline="blur",
                       eps_std: float | None = None,
                       batch_size: int = 256, progress: bool = False,
                       seed: int = 0) -> dict[str, MethodScores]:
    """Score each method on ``model`` and images ``x`` (explaining the model's prediction).

    MoRF/LeRF replace patches by ``baseline``; insertion starts from ``insertion_baseline``
    and puts the most relevant patches back first; deletion replaces the most relevant first
    by ``deletion_baseline`` (with ``deletion_baseline == baseline`` it is the MoRF curve,
    computed once). ``eps_std`` is the
    ε of the ``eps_std`` method (default: 0.25 × :func:`preactivation_std` on ``x``).
    Returns ``{method key: MethodScores}``."""
    chosen = _select(methods)
    if eps_std is None:
        eps_std = 0.25 * preactivation_std(model, x)
    with torch.inference_mode():
        targets = torch.cat([model(x[s:s + batch_size]).argmax(1)
                             for s in range(0, len(x), batch_size)])
    # The perturbation curves run the model ~50 times per method: score with a channels-last
    # copy (faster convolutions on CPU; the caller's model is not touched).
    scorer = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xs = x.contiguous(memory_format=torch.channels_last)
    results: dict[str, MethodScores] = {}
    bar = M.progress_bar(chosen, progress, desc="methods")
    for method in bar:
        t0 = time.perf_counter()
        e = _explain_batched(method.make(model, eps_std), x, batch_size)
        seconds = time.perf_counter() - t0
        rp = M.region_perturbation(scorer, xs, e.relevance, targets, patch_size, steps,
                                   baseline, batch_size=batch_size, seed=seed)
        order = M.patch_order(e.relevance, patch_size, True, seed)
        ins = M.perturbation_curve(scorer, xs, order, targets, patch_size, steps,
                                   insertion_baseline, insertion=True, batch_size=batch_size)
        if isinstance(deletion_baseline, str) and deletion_baseline == baseline:
            auc_del = rp.auc_morf
        else:
            auc_del = M.auc(M.perturbation_curve(scorer, xs, order, targets, patch_size, steps,
                                                 deletion_baseline, batch_size=batch_size))
        results[method.key] = MethodScores(
            abpc=rp.abpc, auc_morf=rp.auc_morf, auc_lerf=rp.auc_lerf,
            auc_insertion=M.auc(ins), auc_deletion=auc_del, gini=M.gini(e.relevance),
            morf_curve=rp.morf.mean(0), lerf_curve=rp.lerf.mean(0), seconds=seconds,
            relevance=e.relevance)
    return results


def _fmt(mean: float, se: float | None = None, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} ± {se:.{digits}f}"


def format_table(results: dict[str, MethodScores]) -> str:
    """A Markdown table of :func:`faithfulness_table`'s results (mean ± standard error)."""
    rows = ["| method | ABPC ↑ | AUC MoRF ↓ | AUC LeRF ↑ | insertion ↑ | deletion ↓ | Gini |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, s in results.items():
        cells = [_fmt(*M.summarize(v)) for v in
                 (s.abpc, s.auc_morf, s.auc_lerf, s.auc_insertion, s.auc_deletion)]
        cells.append(_fmt(M.summarize(s.gini)[0], digits=2))
        rows.append(f"| {_BY_KEY[key].label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# =============================================================================================
# Randomisation (sanity)
# =============================================================================================
def randomization_table(model: nn.Module, x: torch.Tensor, eps_std: float,
                        layer_counts: Sequence[int], methods: Sequence[str] | None = None,
                        seed: int = 0) -> dict[str, dict[int, torch.Tensor]]:
    """``{method: {n_layers: per-sample Spearman}}`` of maps before/after re-initialising the
    top ``n_layers`` Linear/Conv layers (targets: the original prediction)."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for method in _select(methods):
        out[method.key] = {
            n: M.randomization_check(lambda m, _meth=method: _meth.make(m, eps_std), model, x,
                                     n_layers=n, seed=seed)
            for n in layer_counts}
    return out


# =============================================================================================
# Per-layer conservation / L1 mass
# =============================================================================================
_DIAG_METHODS = ("rlrp", "rlrp_neuron", "rlrp_ratio", "lrp0", "eps_std", "EpsilonPlus")


def diagnostics_rows(model: nn.Module, x: torch.Tensor, eps_std: float,
                     methods: Sequence[str] = _DIAG_METHODS) -> list[str]:
    """Markdown rows: per method, the range over layers of the per-layer mean conservation
    ``ΣR_a/ΣR_z`` and L1 ratio ``‖R_a‖₁/‖R_z‖₁`` (:func:`rlrp_fast.metrics.layer_diagnostics`),
    and end to end ``ΣR_input / R_out`` and ``‖R_input‖₁ / |R_out|`` (medians over images)."""
    rows = ["| method | per-layer ΣR_in/ΣR_out (min … max of layer medians) | per-layer "
            "‖R_in‖₁/‖R_out‖₁ (min … max) | input ΣR / logit | input ‖R‖₁ / \\|logit\\| |",
            "| --- | --- | --- | --- | --- |"]
    for key in methods:
        d = M.layer_diagnostics(_BY_KEY[key].make(model, eps_std), x)
        cons = torch.stack([layer.conservation for layer in d]).nanmedian(dim=1).values
        l1 = torch.stack([layer.l1_ratio for layer in d]).nanmedian(dim=1).values
        end_sum = (d[-1].sum_in / d[0].sum_out).nanmedian()
        end_l1 = (d[-1].l1_in / d[0].l1_out).nanmedian()
        rows.append(f"| {_BY_KEY[key].label} | {cons.min():.3f} … {cons.max():.3f} | "
                    f"{l1.min():.3f} … {l1.max():.3f} | {end_sum:.3f} | {end_l1:.3f} |")
    return rows


# =============================================================================================
# Robustness
# =============================================================================================
_ROBUST_METHODS = ("rlrp", "rlrp_neuron", "rlrp_ratio", "lrp0", "eps_1e-6", "eps_std", "gxi")


def _first_preactivation_bias(model: nn.Module, value: float) -> nn.Module:
    """A copy of ``model`` whose first conv's (BatchNorm-folded) bias is exactly ``value`` on
    every channel, so every pre-activation of that layer over an all-zero (background) patch
    is exactly ``value``."""
    m = copy.deepcopy(model)
    modules = list(m.modules())
    conv = next(mod for mod in modules if isinstance(mod, nn.Conv2d))
    idx = modules.index(conv)
    bn = next((mod for mod in modules[idx + 1:idx + 2]
               if isinstance(mod, nn.BatchNorm2d)), None)
    with torch.no_grad():
        if bn is None:
            conv.bias.fill_(value)
        else:
            # folded bias = s·(b − μ) + β: make b − μ exactly 0 and β = value
            if conv.bias is None:
                bn.running_mean.zero_()
            else:
                conv.bias.copy_(bn.running_mean)
            bn.bias.fill_(value)
    return m


def _shift(method: Method, model: nn.Module, x: torch.Tensor, eps_std: float, noise: float,
           seed: int) -> dict[str, torch.Tensor]:
    explainer = method.make(model, eps_std)
    e = explainer.explain(x)
    gen = torch.Generator().manual_seed(seed)
    x2 = x + noise * torch.randn(x.shape, generator=gen).to(x)
    e2 = explainer.explain(x2, target=e.targets)
    r, r2 = e.relevance, e2.relevance
    return {"conc": M.concentration(r), "nonfinite": M.nonfinite_count(r).double(),
            "nonfinite2": M.nonfinite_count(r2).double(), "shift": M.map_shift(r, r2)}


# The robustness studies move inputs by 1e-6 and put sums within 1e-7 of 0: a conv that splits
# its reduction over two threads rounds differently and flips which side of 0 (or of a
# max-pool tie) a value lands on. One thread keeps their tables the same whatever --threads.
@_single_thread()
def robustness_study(model: nn.Module, x: torch.Tensor, eps_std: float, noise: float = 1e-6,
                     seed: int = 0, methods: Sequence[str] = _ROBUST_METHODS
                     ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """``{scenario: {method: {stat: per-sample tensor}}}`` for the scenarios
    ``natural`` (the trained model), ``bias=0`` and ``bias=1e-30`` (first-layer folded bias
    set so background pre-activations are exactly 0 / 1e-30). Stats: ``conc`` max|R|/‖R‖₁,
    ``nonfinite`` (NaN/Inf count), ``shift`` the normalised L1 move of the map under
    ``noise``-σ Gaussian input noise."""
    scenarios = {"natural": model, "bias=0": _first_preactivation_bias(model, 0.0),
                 "bias=1e-30": _first_preactivation_bias(model, 1e-30)}
    return {name: {k: _shift(_BY_KEY[k], m, x, eps_std, noise, seed) for k in methods}
            for name, m in scenarios.items()}


@_single_thread()
def residual_cancellation_study(model: nn.Module, block: nn.Module, x: torch.Tensor,
                                eps_std: float, delta: float = 1e-7, noise: float = 1e-6,
                                seed: int = 0, methods: Sequence[str] = _ROBUST_METHODS,
                                progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Residual adds with ``u ≈ −v``: for each image, a copy of ``model`` whose ``block``
    (a :class:`rlrp_fast.zoo.BasicBlock` with a projection) has its projection BatchNorm's
    bias shifted so that, at the centre of the block's output map, ``y = u + v = delta`` in
    every channel (``u`` the main branch, ``v`` the projected skip). One model per image (the
    edit is per image); the maps are then compared with those of the input plus
    ``noise``-σ Gaussian noise, which moves ``y`` across 0."""
    path = next(name for name, mod in model.named_modules() if mod is block)
    stats: dict[str, dict[str, list]] = {k: {"conc": [], "nonfinite": [], "nonfinite2": [],
                                             "shift": []} for k in methods}
    for i in M.progress_bar(range(len(x)), progress, desc="residual"):
        xi = x[i:i + 1]
        captured = {}
        h1 = block.downsample.register_forward_hook(lambda _m, _i, o: captured.update(v=o))
        h2 = block.bn2.register_forward_hook(lambda _m, _i, o: captured.update(u=o))
        with torch.inference_mode():
            model(xi)
        h1.remove(), h2.remove()
        y = captured["u"] + captured["v"]
        hc, wc = y.shape[2] // 2, y.shape[3] // 2
        edited = copy.deepcopy(model)
        bn = edited.get_submodule(path).downsample[1]
        with torch.no_grad():
            bn.bias.add_(-y[0, :, hc, wc] + delta)
        for k in methods:
            s = _shift(_BY_KEY[k], edited, xi, eps_std, noise, seed + i)
            for name, v in s.items():
                stats[k][name].append(v)
    return {k: {name: torch.cat(v) for name, v in d.items()} for k, d in stats.items()}


# =============================================================================================
# Figures
# =============================================================================================
def _save_heatmaps(per_model: dict[str, tuple[torch.Tensor, dict[str, MethodScores]]],
                   path: Path, n_images: int = 3) -> Path:
    from .viz import heatmap_limit, require_matplotlib

    FigureCanvasAgg, Figure = require_matplotlib()

    models = list(per_model)
    keys = _union_keys(results for _x, results in per_model.values())
    rows, cols = len(models) * n_images, len(keys) + 1
    fig = Figure(figsize=(1.25 * cols, 1.3 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    for mi, name in enumerate(models):
        x, results = per_model[name]
        for j in range(n_images):
            r = mi * n_images + j
            axes[r, 0].imshow(x[j, 0].numpy(), cmap="gray", interpolation="nearest")
            axes[r, 0].set_ylabel(name if j == 0 else "", fontsize=7)
            for c, key in enumerate(keys, start=1):
                if r == 0:
                    axes[r, c].set_title(_BY_KEY[key].label.replace(" (", "\n("), fontsize=6)
                if key not in results:  # a method that does not apply to this model
                    axes[r, c].axis("off")
                    continue
                rel = results[key].relevance[j].sum(0).numpy()
                m = heatmap_limit(rel)
                axes[r, c].imshow(rel, cmap="bwr", vmin=-m, vmax=m, interpolation="nearest")
    axes[0, 0].set_title("input", fontsize=7)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=0.93, wspace=0.05, hspace=0.08)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _save_curves(per_model: dict[str, dict[str, MethodScores]], path: Path) -> Path:
    from .viz import require_matplotlib

    FigureCanvasAgg, Figure = require_matplotlib()

    fig = Figure(figsize=(5 * len(per_model), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(per_model), squeeze=False)[0]
    for ax, (name, results) in zip(axes, per_model.items()):
        for idx, (key, s) in enumerate(results.items()):
            color = f"C{idx}"
            frac = torch.linspace(0, 1, len(s.morf_curve)).numpy()
            ax.plot(frac, s.morf_curve.numpy(), color=color, label=_BY_KEY[key].label)
            ax.plot(frac, s.lerf_curve.numpy(), color=color, linestyle="--")
        ax.set_title(f"{name}: MoRF (solid), LeRF (dashed)", fontsize=9)
        ax.set_xlabel("fraction of 4×4 patches set to 0")
        ax.set_ylabel("softmax probability of the predicted class")
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7, loc="center left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


# =============================================================================================
# The full evaluation
# =============================================================================================
def _union_keys(tables) -> list[str]:
    """The keys of several ``{method key: ...}`` tables, first seen first."""
    keys: dict[str, None] = {}
    for table in tables:
        keys.update(dict.fromkeys(table))
    return list(keys)


@dataclass(frozen=True)
class Section:
    """One generated part of ``EVALUATION.md``: its models, the markers it is written between
    (``<!-- {marker}:begin -->`` … ``<!-- {marker}:end -->``), the prefix of its two figures
    and the suffix of its ``##`` headings."""

    archs: tuple[str, ...]
    marker: str
    figure_prefix: str
    heading_suffix: str
    command: str


SECTIONS = {
    "classic": Section(zoo.CLASSIC_ARCHS, "results", "eval", "",
                       "python -m rlrp_fast.evaluate"),
    "modern": Section(zoo.MODERN_ARCHS, "modern-results", "eval_modern",
                      " (ViT, SE-ConvNeXt)", "python -m rlrp_fast.evaluate --section modern"),
}
"""``--section`` name -> :class:`Section`."""


def _robust_table(study: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    rows = ["| method | mean max\\|R\\|/‖R‖₁ | worst max\\|R\\|/‖R‖₁ | NaN/Inf elements "
            "(clean + noisy) | median shift | 95th pct shift | max shift |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, s in study.items():
        conc, shift = s["conc"], s["shift"]
        finite_c, finite_s = conc[torch.isfinite(conc)], shift[torch.isfinite(shift)]
        nonfinite = int(s["nonfinite"].sum() + s["nonfinite2"].sum())
        q = (lambda t, p: float(torch.quantile(t, p)) if t.numel() else math.nan)
        rows.append(
            f"| {_BY_KEY[key].label} | {_fmt(float(finite_c.mean()) if finite_c.numel() else math.nan, digits=4)} "
            f"| {_fmt(float(finite_c.max()) if finite_c.numel() else math.nan, digits=4)} "
            f"| {nonfinite} | {q(finite_s, 0.5):.1e} | {q(finite_s, 0.95):.1e} "
            f"| {float(finite_s.max()) if finite_s.numel() else math.nan:.1e} |")
    return rows


def run_full_evaluation(out_dir: str | Path = "docs", n_images: int | None = None,
                        archs: Sequence[str] | None = None, patch_size: int = 4,
                        steps: int = 16, n_robust: int = 200, n_residual: int = 50,
                        n_sanity: int = 100, progress: bool = False,
                        cache: str | Path | None = None, section: str = "classic") -> Path:
    """Evaluate one :data:`SECTIONS` entry's zoo models (shipped weights; ``archs`` overrides
    the section's list) and write their part of ``out_dir/EVALUATION.md`` (between the
    section's markers; the rest of the file is kept, a missing part is appended) and two
    figures, ``out_dir/<figure_prefix>_heatmaps.png`` and ``_curves.png``. Returns the
    Markdown path.

    ``n_images`` (default: all 540 held-out images of the evaluation split) are scored for
    faithfulness; ``n_robust`` for robustness, ``n_residual`` for the per-image residual
    cancellation study (ResNet only), ``n_sanity`` for the randomisation check. Each model is
    compared on :func:`methods_for` it (LXT's AttnLRP joins on attention models)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}; choose one of {sorted(SECTIONS)}")
    sec = SECTIONS[section]
    out_dir = Path(out_dir)
    archs = list(sec.archs) if archs is None else list(archs)
    for arch in archs:
        zoo.weights_path(arch)  # an unknown name fails here, before any work
    _, _, x_all, y_all = zoo.load_eval_split()
    x = x_all if n_images is None else x_all[:n_images]
    t_start = time.perf_counter()
    faith, figs, sanity, robust, info, diags = {}, {}, {}, {}, {}, {}
    residual = None
    for arch in archs:
        model = zoo.load_pretrained(arch)
        acc = evaluate_accuracy(model, x_all, y_all)
        std = preactivation_std(model, x)
        eps = 0.25 * std
        keys = methods_for(model)
        t0 = time.perf_counter()
        res = faithfulness_table(model, x, methods=keys, patch_size=patch_size, steps=steps,
                                 eps_std=eps, progress=progress)
        info[arch] = (acc, std, eps, time.perf_counter() - t0)
        faith[arch] = res
        figs[arch] = (x[:3], res)
        n_layers = len([m for m in model.modules()
                        if isinstance(m, (nn.Linear, nn.Conv2d))])
        sanity[arch] = (randomization_table(model, x[:n_sanity], eps, (1, 3, n_layers),
                                            methods=keys), n_layers)
        robust[arch] = robustness_study(model, x[:n_robust], eps)
        diags[arch] = diagnostics_rows(model, x[:n_sanity], eps)
        if arch == "resnet":
            residual = residual_cancellation_study(model, model.layer2, x[:n_residual], eps,
                                                   progress=progress)
    total = time.perf_counter() - t_start
    if cache is not None:  # the raw numbers, to redraw the tables without re-running
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"faith": {a: {k: {f: getattr(v, f) for f in ("abpc", "auc_morf", "auc_lerf",
                    "auc_insertion", "auc_deletion", "gini", "morf_curve", "lerf_curve")}
                    for k, v in r.items()} for a, r in faith.items()},
                    "sanity": sanity, "robust": robust, "residual": residual, "info": info},
                   cache)
    heat = _save_heatmaps(figs, out_dir / f"{sec.figure_prefix}_heatmaps.png")
    curves = _save_curves(faith, out_dir / f"{sec.figure_prefix}_curves.png")
    md = _write_markdown(out_dir / "EVALUATION.md", faith, sanity, robust, residual, info, x,
                         patch_size, steps, total, heat.name, curves.name, n_robust,
                         n_residual, n_sanity, diags, sec)
    return md


def _write_markdown(path, faith, sanity, robust, residual, info, x, patch_size, steps, total,
                    heat_name, curves_name, n_robust, n_residual, n_sanity, diags,
                    section: Section = SECTIONS["classic"]) -> Path:
    suffix = section.heading_suffix
    begin, end = f"<!-- {section.marker}:begin -->", f"<!-- {section.marker}:end -->"
    lines = [begin, f"<!-- generated by `{section.command}` in {total:.0f} s "
             f"({torch.get_num_threads()} CPU threads); do not edit between these markers -->",
             "", f"## Faithfulness{suffix}", ""]
    for arch, res in faith.items():
        acc, std, eps, secs = info[arch]
        lines += [f"### {arch} (test accuracy {acc * 100:.1f}%, {len(x)} images, "
                  f"ε_std = 0.25·{std:.3g} = {eps:.3g})", "", format_table(res), ""]
    lines += ["### Paired ABPC difference, R-LRP (default) minus each method", "",
              "| method | " + " | ".join(faith) + " |", "| --- |" + " --- |" * len(faith)]
    for key in _union_keys(faith.values()):
        if key == "rlrp":
            continue
        cells = []
        for res in faith.values():
            if key not in res:  # the method does not apply to this model
                cells.append("—")
                continue
            d = res["rlrp"].abpc - res[key].abpc
            cells.append(_fmt(*M.summarize(d)))
        lines.append(f"| {_BY_KEY[key].label} | " + " | ".join(cells) + " |")
    lines += ["", f"## Randomisation check{suffix}", "",
              f"Mean Spearman ρ (per image, {n_sanity} images) between the map of the trained "
              "model and the map after re-initialising its top 1, top 3 and all Linear/Conv "
              "layers.", ""]
    keys = _union_keys(tab for tab, _n in sanity.values())
    head = "| method | " + " | ".join(
        f"{arch}: top 1 / top 3 / all {n}" for arch, (_, n) in sanity.items()) + " |"
    lines += [head, "| --- |" + " --- |" * len(sanity)]
    for key in keys:
        cells = []
        for arch, (tab, _n) in sanity.items():
            cells.append(" / ".join(_fmt(M.summarize(v)[0], digits=2)
                                    for v in tab[key].values()) if key in tab else "—")
        lines.append(f"| {_BY_KEY[key].label} | " + " | ".join(cells) + " |")
    lines += ["", f"## Per-layer conservation and L1 mass{suffix} ({n_sanity} images)", "",
              "Each relevance-changing step (Linear, Conv, pools, residual adds), from "
              "`rlrp_fast.metrics.layer_diagnostics`.", ""]
    for arch, rows in diags.items():
        lines += [f"### {arch}", ""] + rows + [""]
    residual_note = f"; residual study {n_residual} images" if residual is not None else ""
    lines += [f"## Robustness{suffix} ({n_robust} images{residual_note})", ""]
    for arch, scen in robust.items():
        for name, study in scen.items():
            lines += [f"### {arch}, {name}", ""] + _robust_table(study) + [""]
    if residual is not None:
        lines += ["### resnet, residual add with u ≈ −v", ""] + _robust_table(residual) + [""]
    lines.append(end)
    generated = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:  # keep the hand-written text around the results
        head, rest = old.split(begin, 1)
        text = head + generated + rest.split(end, 1)[1]
    elif old:  # another section's file: add this part at its end
        text = old.rstrip("\n") + "\n\n" + generated + "\n"
    else:
        text = "# Evaluation\n\n" + generated + "\n"
    path.write_text(text)
    return path


def evaluate_default(n_images: int = 100, methods: Sequence[str] | None = None,
                     patch_size: int = 4, steps: int = 16, device: str = "cpu",
                     progress: bool = False) -> tuple[str, dict[str, MethodScores]]:
    """The faithfulness table of the embedded demo CNN (:mod:`rlrp_fast.digits`) on the first
    ``n_images`` images of its test split. Returns ``(Markdown table, results)``."""
    from .digits import load_digits_split, load_pretrained

    _, _, x_test, _ = load_digits_split()
    if not 1 <= n_images <= len(x_test):
        raise ValueError(f"n_images must be between 1 and {len(x_test)}, got {n_images}")
    model = load_pretrained().to(device)
    x = x_test[:n_images].to(device)
    results = faithfulness_table(model, x, methods=methods, patch_size=patch_size, steps=steps,
                                 progress=progress)
    return format_table(results), results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rlrp_fast.evaluate",
                                     description="Run the full evaluation; write docs/.")
    parser.add_argument("--out-dir", default="docs",
                        help="where EVALUATION.md and its two PNGs go (default: docs)")
    parser.add_argument("--section", choices=list(SECTIONS), default="classic",
                        help="which part of EVALUATION.md to (re)write: the three classic CNNs "
                        "(default) or the ViT and SE-ConvNeXt ('modern')")
    parser.add_argument("--n-images", type=int, default=None)
    parser.add_argument("--archs", nargs="+", choices=list(zoo.ARCHS), default=None,
                        help="models to evaluate (default: the section's)")
    parser.add_argument("--n-robust", type=int, default=200)
    parser.add_argument("--n-residual", type=int, default=50)
    parser.add_argument("--n-sanity", type=int, default=100)
    parser.add_argument("--cache", default=None, help="also torch.save the raw numbers here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run_full_evaluation(args.out_dir, args.n_images, args.archs, n_robust=args.n_robust,
                              n_residual=args.n_residual, n_sanity=args.n_sanity,
                              progress=True, cache=args.cache, section=args.section)
    print(out)
