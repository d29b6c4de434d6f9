"""``rlrp-fast explain``: explain a folder of images with a model, on one process or many.

The pieces, usable on their own:

- :func:`collect_images`: files, folders (recursively) and globs -> one sorted list of files.
- :class:`Preprocess`: PIL image file -> normalised ``(C, size, size)`` tensor (resize the
  shorter side to ``size * 256 / 224``, centre-crop ``size``, ImageNet mean/std by default).
- :class:`ImageFiles` and :func:`make_loader`: a Dataset that reports unreadable files instead
  of raising, and a DataLoader with workers (pinned memory on CUDA only).
- :func:`load_model`: a torchvision model name (``weights=None``, plus a state_dict from
  ``--weights`` loaded with ``weights_only=True``), or a TorchScript / exported-program file
  (refused with a clear message: the explainer needs ``torch.fx``, which cannot trace them).
- :class:`Writer`: per image and target a heatmap figure (input beside the colour-mapped map,
  with a colour bar) and the raw relevance ``.npy``; one JSON line per image in
  ``predictions.jsonl`` (``predictions-rank{r}.jsonl`` under ``torchrun``); writing runs on
  one background thread so that it overlaps the next batch's explanation.
- :func:`run`: all of it, sharded over ``torch.distributed`` ranks when ``WORLD_SIZE > 1``
  (gloo on CPU, NCCL on CUDA): rank ``r`` takes images ``r, r + W, r + 2W, ...`` of the sorted
  list, rank 0 merges ``predictions.jsonl`` and writes ``manifest.json`` after a barrier.

User errors are raised as :class:`PipelineError` (a ``ValueError``) with a one-line message;
images that cannot be read are reported through ``on_error`` and skipped.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFiles", "PipelineError",
           "Preprocess", "RunConfig", "Writer", "collect_images", "explain_targets",
           "load_model", "make_loader", "run"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
"""What a folder is searched for (case-insensitive). Files named explicitly may have any name."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The embedded digits CNN (the demo's, shipped weights): grey 32×32 pixels in [0, 1], no
# mean/std; ``--model digits`` takes these unless --size/--mean/--std say otherwise.
DIGITS = "digits"
DIGITS_SIZE = 32
_RESIZE_RATIO = 256 / 224  # the usual ImageNet evaluation: resize to 256, crop 224


class PipelineError(ValueError):
    """A problem the user can fix (bad model, weights, options); the message is one line."""


# -- inputs ----------------------------------------------------------------------------------
def collect_images(specs: Sequence[str], on_error: Callable[[str, str], None] | None = None
                   ) -> list[str]:
    """Files, folders (searched recursively for :data:`IMAGE_EXTENSIONS`) and glob patterns
    (``**`` recurses), as one sorted list without duplicates (the same file reached twice is
    listed once). A spec that matches nothing is reported through ``on_error(spec, why)``."""
    found: dict[str, str] = {}  # real path -> path as found

    def add(path: str) -> None:
        found.setdefault(os.path.realpath(path), os.path.normpath(path))

    for spec in specs:
        if os.path.isdir(spec):
            matches = [os.path.join(root, name)
                       for root, dirs, files in os.walk(spec, followlinks=False)
                       for name in files if name.lower().endswith(IMAGE_EXTENSIONS)]
            if not matches and on_error:
                on_error(spec, "folder holds no " + "/".join(IMAGE_EXTENSIONS) + " files")
            for m in matches:
                add(m)
        elif os.path.lexists(spec):
            add(spec)
        elif glob.has_magic(spec):
            matches = [m for m in glob.glob(spec, recursive=True) if not os.path.isdir(m)]
            if not matches and on_error:
                on_error(spec, "the pattern matches no file")
            for m in matches:
                add(m)
        elif on_error:
            on_error(spec, "no such file or folder")
    return sorted(found.values())


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """PIL-readable file -> ``(channels, size, size)`` float32 tensor.

    The shorter side is resized to ``round(size * 256 / 224)`` (bilinear, antialiased), the
    centre ``size x size`` is cropped, values are scaled to [0, 1] and, unless ``mean`` is
    None, normalised ``(x - mean) / std`` per channel. EXIF orientation is applied.
    """

    size: int = 224
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    channels: int = 3

    def __call__(self, path: str) -> torch.Tensor:
        from PIL import Image, ImageOps

        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img = img.convert("L" if self.channels == 1 else "RGB")
            w, h = img.size
            short = max(self.size, round(self.size * _RESIZE_RATIO))
            scale = short / min(w, h)
            nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
            a = np.asarray(img, dtype=np.float32) / 255.0
        x = torch.from_numpy(a.copy()).view(self.size, self.size, -1).permute(2, 0, 1)
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()


class ImageFiles(torch.utils.data.Dataset):
    """``files[i]`` -> ``(i, tensor, "")``, or ``(i, None, why)`` when it cannot be read."""

    def __init__(self, files: Sequence[str], preprocess: Preprocess) -> None:
        self.files = list(files)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.preprocess(self.files[i]), ""
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            why = " ".join(str(exc).split()) or type(exc).__name__
            return i, None, why


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> dict:
    good = [(i, x) for i, x, _ in items if x is not None]
    return {"index": [i for i, _ in good],
            "x": torch.stack([x for _, x in good]) if good else None,
            "errors": [(i, why) for i, x, why in items if x is None]}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is per-process; torch threads would oversubscribe


def make_loader(files: Sequence[str], preprocess: Preprocess, batch_size: int = 64,
                workers: int = 4, device: torch.device | str = "cpu"
                ) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`ImageFiles`, in order; batches are dicts with ``index``
    (positions in ``files``), ``x`` (the readable images stacked, or None) and ``errors``
    (``(position, why)`` of the unreadable ones). Memory is pinned only for CUDA."""
    workers = min(workers, max(1, -(-len(files) // batch_size))) if files else 0
    return torch.utils.data.DataLoader(
        ImageFiles(files, preprocess), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate,
        pin_memory=torch.device(device).type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None)


# -- the model -------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _is_torchscript(path: str) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(("/code/__torch__.py", "constants.pkl")) or "/code/" in n
                       for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _num_classes(state: dict) -> int | None:
    """Rows of the last 2-D ``*weight`` in the state_dict: the classifier of torchvision
    models (fc, classifier.N, heads.head)."""
    rows = [v.shape[0] for k, v in state.items()
            if k.endswith("weight") and isinstance(v, torch.Tensor) and v.dim() == 2]
    return rows[-1] if rows else None


def load_model(spec: str, weights: str | None = None, num_classes: int | None = None,
               device: torch.device | str = "cpu") -> tuple[torch.nn.Module, list[str] | None]:
    """The model named by ``spec`` in eval mode on ``device``, and its class names when known
    (torchvision's ImageNet categories for a 1000-class torchvision model).

    ``spec`` is ``"digits"`` (the embedded demo CNN: its shipped weights, or ``weights``), a
    torchvision classification model name (built with ``weights=None``: nothing
    is downloaded; ``weights`` is a state_dict file, loaded with ``weights_only=True``;
    ``num_classes`` defaults to the rows of its last 2-D weight), or a file: TorchScript and
    exported programs (``.pt2``) are refused with a message saying why (the explainer traces
    the model's Python ``forward`` with ``torch.fx``).
    """
    if spec == DIGITS:
        return _load_digits(weights, num_classes, device)
    looks_like_file = os.path.sep in spec or spec.endswith((".pt", ".pth", ".pt2", ".ts", ".jit"))
    if os.path.isfile(spec) or looks_like_file:
        if not os.path.isfile(spec):
            raise PipelineError(f"--model {spec!r}: no such file")
        if weights is not None:
            raise PipelineError(f"--weights applies to a torchvision model name, not to the "
                                f"model file {spec!r}")
        return _load_model_file(spec, device), None
    try:
        import torchvision
    except ImportError as exc:
        raise PipelineError(f"--model {spec!r} names a torchvision model but torchvision is "
                            f"not installed ({_first_line(exc)})") from exc
    names = _torchvision_names()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else \
            " (a torchvision classification model such as resnet50, or a model file)"
        raise PipelineError(f"--model {spec!r} is not a torchvision classification model or an "
                            f"existing file{hint}")
    state = None
    if weights is not None:
        state = _load_state_dict(weights)
        if num_classes is None:
            num_classes = _num_classes(state)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = torchvision.models.get_model(spec, weights=None, **kwargs)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"--model {spec}: {_first_line(exc)}") from exc
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            msg = _first_line(exc)
            raise PipelineError(f"--weights {weights!r} does not fit {spec}"
                                f"{'' if num_classes is None else f' ({num_classes} classes)'}: "
                                f"{msg[:400]}{'...' if len(msg) > 400 else ''}") from exc
    model = model.eval().to(device)
    labels = None
    try:
        enum = torchvision.models.get_model_weights(spec)
        categories = list(enum)[0].meta.get("categories")
        out_features = _num_classes(model.state_dict())
        if categories and len(categories) == out_features:
            labels = list(categories)
    except Exception:  # noqa: BLE001 - class names are a nicety
        labels = None
    return model, labels


def _load_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise PipelineError(f"--weights {path!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of all kinds
        raise PipelineError(f"--weights {path!r} could not be loaded with weights_only=True "
                            f"(a state_dict of tensors is expected): {_first_line(exc)[:300]}"
                            ) from exc
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"--weights {path!r} is not a state_dict (a mapping of names to "
                            f"tensors), got {type(state).__name__}")
    return state


def _load_digits(weights: str | None, num_classes: int | None, device
                 ) -> tuple[torch.nn.Module, list[str]]:
    """The embedded digits CNN: its shipped weights, or a state_dict of the same network."""
    from .digits import NUM_CLASSES, DigitsCNN, load_pretrained

    if num_classes not in (None, NUM_CLASSES):
        raise PipelineError(f"--model digits has {NUM_CLASSES} classes, not {num_classes}")
    if weights is None:
        model = load_pretrained()
    else:
        model = DigitsCNN()
        try:
            model.load_state_dict(_load_state_dict(weights))
        except RuntimeError as exc:
            raise PipelineError(f"--weights {weights!r} is not a state_dict of the digits CNN: "
                                f"{_first_line(exc)}") from exc
    return model.eval().to(device), [str(d) for d in range(NUM_CLASSES)]


def _load_model_file(path: str, device) -> torch.nn.Module:
    if path.endswith(".pt2"):
        try:
            program = torch.export.load(path)
        except Exception as exc:  # noqa: BLE001
            raise PipelineError(f"--model {path!r} is not a loadable exported program (.pt2): "
                                f"{_first_line(exc)[:300]}") from exc
        raise PipelineError(
            f"--model {path!r} is an exported program, which cannot be explained: its graph "
            f"is in ATen operators ({len(program.graph.nodes)} nodes), while the explainer "
            "traces a model's Python forward with torch.fx; pass a torchvision model name "
            "with --weights instead")
    if _is_torchscript(path):
        raise PipelineError(
            f"--model {path!r} is a TorchScript model, which torch.fx (the tracer the "
            "explainer needs) cannot trace; pass a torchvision model name with --weights "
            "(a state_dict) instead")
    raise PipelineError(
        f"--model {path!r} is neither a TorchScript file nor an exported program (.pt2); "
        "for a state_dict pass a torchvision model name and --weights FILE")


# -- explaining ------------------------------------------------------------------------------
def explain_targets(explainer, x: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits (N, classes), targets (N, K), relevance (N, K, *x.shape[1:]))`` for the K
    highest logits of each sample, in order: one forward and one batched relevance pass
    (``Explainer.explain(x, top_k=k)``)."""
    e = explainer.explain(x, top_k=k)
    n = x.shape[0]
    relevance = e.relevance if e.relevance.dim() == x.dim() + 1 else e.relevance.unsqueeze(1)
    return e.logits, e.targets.reshape(n, -1), relevance


# -- outputs ---------------------------------------------------------------------------------
def _output_stem(file: str, root: str) -> str:
    rel = os.path.relpath(os.path.abspath(file), root)
    return rel.replace(os.sep, "/")


class Writer:
    """Writes each image's outputs on one background thread, then its JSON line.

    The line is appended (and flushed) only after every file of that image is written, so a
    record in the jsonl means the image is complete: that is what ``--resume`` checks.
    """

    def __init__(self, out: Path, jsonl: Path, formats: Sequence[str], npy_dtype: str,
                 labels: list[str] | None, rule: str, append: bool) -> None:
        self.out, self.formats, self.labels, self.rule = out, tuple(formats), labels, rule
        self.npy_dtype = np.dtype(npy_dtype)
        self._file = jsonl.open("a" if append else "w", encoding="utf-8")
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="rlrp-writer", daemon=True)
        self._thread.start()

    def put(self, job: tuple) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._file.close()
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue
            try:
                self._write_batch(*job)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self._error = exc

    def _label(self, c: int) -> str:
        return self.labels[c] if self.labels and 0 <= c < len(self.labels) else f"class {c}"

    def _write_batch(self, files: list[str], stems: list[str], x: torch.Tensor,
                     logits: torch.Tensor, targets: torch.Tensor, relevance: torch.Tensor,
                     seconds: float) -> None:
        from .viz import save_grid

        per_image = seconds / len(files)
        for i, (file, stem) in enumerate(zip(files, stems)):
            outputs, l1 = [], []
            for j, c in enumerate(targets[i].tolist()):
                r = relevance[i, j]
                l1.append(float(r.abs().sum()))
                base = self.out / f"{stem}.top{j + 1}-c{c}"
                base.parent.mkdir(parents=True, exist_ok=True)
                if "npy" in self.formats:
                    path = base.with_name(base.name + ".npy")
                    tmp = path.with_name(f".{path.name}.tmp.npy")
                    np.save(tmp, r.numpy().astype(self.npy_dtype))
                    os.replace(tmp, path)
                    outputs.append(str(path.relative_to(self.out)))
                if "png" in self.formats:
                    path = base.with_name(base.name + ".png")
                    # one title band (save_grid sizes it), not per-panel titles: with a
                    # single row those would be clipped
                    save_grid(x[i:i + 1], r[None], path,
                              title=f"{_shorten(Path(file).name, 40)}\n"
                                    f"top {j + 1}: {_shorten(self._label(c), 40)} "
                                    f"(logit {float(logits[i, c]):.3g})",
                              colorbar=f"{self.rule} relevance (channels summed)")
                    outputs.append(str(path.relative_to(self.out)))
            record = {
                "file": file,
                "top_k": targets[i].tolist(),
                "labels": [self._label(c) for c in targets[i].tolist()] if self.labels else None,
                "logits": [float(logits[i, c]) for c in targets[i].tolist()],
                "relevance_l1": l1,
                "outputs": outputs,
                "time_s": round(per_image, 6),
            }
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()


def _shorten(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def _read_records(paths: Iterable[Path]) -> list[dict]:
    records = []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by an interrupted run
                continue
            if isinstance(rec, dict) and isinstance(rec.get("file"), str):
                records.append(rec)
    return records


def _done(out: Path) -> set[str]:
    """Absolute paths of the images with a complete record (all its outputs exist)."""
    done = set()
    for rec in _read_records([out / "predictions.jsonl", *sorted(out.glob("predictions-rank*.jsonl"))]):
        if all((out / p).is_file() for p in rec.get("outputs", [])):
            done.add(os.path.abspath(rec["file"]))
    return done


# -- the run ---------------------------------------------------------------------------------
@dataclasses.dataclass
class RunConfig:
    images: list[str]
    model: str
    weights: str | None = None
    num_classes: int | None = None
    rule: str = "rlrp"
    backend: str = "auto"
    top_k: int = 1
    out: str = "rlrp_explanations"
    batch_size: int = 64
    workers: int = 4
    device: str = "cpu"
    size: int = 224
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    formats: tuple[str, ...] = ("png", "npy")
    npy_dtype: str = "float32"
    resume: bool = False
    progress: bool = True


@dataclasses.dataclass
class RunResult:
    images: int  # explained now, over all ranks
    skipped: int  # already written (--resume)
    errors: int  # unreadable files
    seconds: float
    world_size: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _input_channels(explainer) -> int:
    layers = getattr(explainer, "_input_layers", None) or []
    for step in layers:
        if getattr(step, "is_conv", False):
            return int(step.weight.shape[1] * step.groups)
    return 3


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def run(cfg: RunConfig, on_error: Callable[[str, str], None] | None = None) -> RunResult:
    """Explain ``cfg.images`` into ``cfg.out``; see the module docstring."""
    from .explainer import Explainer

    try:
        import PIL.Image  # noqa: F401 - decoding happens in the workers: fail here, once
    except ImportError as exc:
        raise PipelineError("reading images needs Pillow: pip install 'rlrp_fast[cli]'"
                            ) from exc
    if "png" in cfg.formats:
        from .viz import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as exc:
            raise PipelineError(f"{exc} (or pass --format npy)") from exc
    world, rank, local_rank = _dist_env()
    report = on_error or (lambda path, why: None)
    dist = None
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    try:
        return _run(cfg, report, world, rank, local_rank, dist, Explainer)
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg, report, world, rank, local_rank, dist, Explainer) -> RunResult:
    device = torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" and world > 1
                          else cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {cfg.out!r} exists and is not a folder")
    # every rank lists the same files in the same order; only rank 0 reports missing specs
    files = collect_images(cfg.images, on_error=report if rank == 0 else None)
    if not files:
        raise PipelineError("no images found in " + " ".join(cfg.images)
                            + " (folders are searched for " + "/".join(IMAGE_EXTENSIONS) + ")")
    model, labels = load_model(cfg.model, cfg.weights, cfg.num_classes, device)
    try:
        explainer = Explainer(model, rule=cfg.rule, backend=cfg.backend)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise PipelineError(f"cannot explain --model {cfg.model}: {_first_line(exc)[:500]}"
                            ) from exc
    channels = _input_channels(explainer)
    mean, std = cfg.mean, cfg.std
    if mean is not None:
        if len(mean) != len(std):
            raise PipelineError(f"--mean has {len(mean)} values but --std has {len(std)}")
        if len(mean) == 1:
            mean, std = mean * channels, std * channels
        elif len(mean) != channels:
            if channels == 1 and (mean, std) == (IMAGENET_MEAN, IMAGENET_STD):
                mean, std = (sum(mean) / 3,), (sum(std) / 3,)
            else:
                raise PipelineError(f"--mean/--std have {len(mean)} values but the model "
                                    f"takes {channels} channel(s)")
    if any(s <= 0 for s in (std or ())):
        raise PipelineError("--std values must be positive")
    preprocess = Preprocess(cfg.size, mean, std, channels)

    out.mkdir(parents=True, exist_ok=True)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    stems = {f: _output_stem(f, root) for f in files}
    mine = files[rank::world]  # deterministic: the sorted list, round-robin over ranks
    skipped = 0
    if cfg.resume:
        done = _done(out)
        todo = [f for f in mine if os.path.abspath(f) not in done]
        skipped = len(mine) - len(todo)
        mine = todo
    jsonl = out / ("predictions.jsonl" if world == 1 else f"predictions-rank{rank}.jsonl")
    # the loader's worker processes are forked before the writer's thread exists
    batches = iter(make_loader(mine, preprocess, cfg.batch_size, cfg.workers, device))
    writer = Writer(out, jsonl, cfg.formats, cfg.npy_dtype, labels, cfg.rule,
                    append=cfg.resume)
    bar = _progress(len(mine), cfg.progress and rank == 0)
    errors = 0
    explained = 0
    t0 = time.perf_counter()
    try:
        for batch in batches:
            for i, why in batch["errors"]:
                errors += 1
                report(mine[i], why)
            if batch["x"] is not None:
                t = time.perf_counter()
                x = batch["x"].to(device, non_blocking=True)
                logits, targets, relevance = explain_targets(explainer, x, cfg.top_k)
                logits, targets, relevance = logits.cpu(), targets.cpu(), relevance.cpu()
                names = [mine[i] for i in batch["index"]]
                writer.put((names, [stems[f] for f in names], x.cpu(), logits, targets,
                            relevance, time.perf_counter() - t))
                explained += len(names)
            if bar is not None:
                bar.update(len(batch["index"]) + len(batch["errors"]))
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    seconds = time.perf_counter() - t0
    counts = [explained, skipped, errors, seconds]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, counts)  # also the barrier before merging
        explained, skipped, errors = (sum(g[k] for g in gathered) for k in range(3))
        seconds = max(g[3] for g in gathered)
    result = RunResult(explained, skipped, errors, seconds, world)
    if rank == 0:
        _write_manifest(out, files, world, cfg, result)
    if world > 1:
        dist.barrier()
    return result


def _write_manifest(out: Path, files: list[str], world: int, cfg: RunConfig,
                    result: RunResult) -> None:
    """Merge the ranks' records into ``predictions.jsonl`` (in input order) and write
    ``manifest.json``."""
    if world > 1:
        sources = ([out / "predictions.jsonl"] if cfg.resume else []) + \
            [out / f"predictions-rank{r}.jsonl" for r in range(world)]
        latest = {}
        for rec in _read_records(sources):
            latest[os.path.abspath(rec["file"])] = rec
        order = {os.path.abspath(f): i for i, f in enumerate(files)}
        merged = sorted(latest.values(),
                        key=lambda r: order.get(os.path.abspath(r["file"]), len(order)))
        tmp = out / ".predictions.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in merged), encoding="utf-8")
        os.replace(tmp, out / "predictions.jsonl")
    manifest = {
        "model": cfg.model, "weights": cfg.weights, "rule": cfg.rule, "top_k": cfg.top_k,
        "size": cfg.size, "formats": list(cfg.formats), "world_size": world,
        "images": len(files), "explained": result.images, "skipped": result.skipped,
        "errors": result.errors, "seconds": round(result.seconds, 3),
        "predictions": "predictions.jsonl",
        "rank_predictions": [f"predictions-rank{r}.jsonl" for r in range(world)] if world > 1
        else [],
    }
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")


def _progress(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="explain", file=sys.stderr)
