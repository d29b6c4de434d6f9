"""Command line: ``rlrp-fast <command> [options]`` (also ``python -m rlrp_fast``).

Commands:
  demo      explain the embedded digits CNN, print accuracy and speed, write a figure of heatmaps
            (.png, .jpg, .pdf or .svg, from --out's extension).
  evaluate  faithfulness table (region perturbation, insertion/deletion) of every method on
            the embedded digits CNN.
  explain   explain image files/folders/globs with a torchvision model: heatmaps, .npy
            relevance, predictions.jsonl (see :mod:`rlrp_fast.pipeline`; shards under torchrun).

The CLI is the only place in rlrp_fast that prints. User errors (bad options, no CUDA, unknown
rule, an --out that cannot or should not be written) end with one ``rlrp-fast <command>: error:
...`` line on stderr and exit code 2, not a traceback.

``demo --out`` does not overwrite, unless ``--force`` is given: a symbolic link (with --force the
link itself is replaced, never its target), an existing file that is not a PNG, JPEG, PDF or SVG
(by its content, not its name), or an existing file outside the current directory. A directory or
another non-regular file is never overwritten.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import torch

from . import __version__
from .viz import figure_format

__all__ = ["main"]

_PROG = "rlrp-fast"
_USAGE_ERROR = 2  # argparse's own exit code for bad usage; we use it for every user error
_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


class _UsageError(Exception):
    """A problem with the command line that the user can fix; reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(_USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


# Leading bytes of the files `demo` writes: an existing file that starts otherwise is not ours.
_FIGURE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"%PDF-")


def _is_figure(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(1024)
    except OSError:  # unreadable: we cannot tell, so it needs --force like any foreign file
        return False
    return head.startswith(_FIGURE_MAGIC) or b"<svg" in head


def _check_out(text: str, force: bool) -> Path:
    """The --out path, or a _UsageError if it cannot be written or is not ours to overwrite."""
    if not text:
        raise _UsageError("--out is empty; give a file name such as rlrp_demo.png")
    path = Path(text)
    if text.endswith(("/", os.sep)) or (path.is_dir() and not path.is_symlink()):
        raise _UsageError(f"--out {text!r} is a directory; give a file name such as "
                          f"{os.path.join(text, 'rlrp_demo.png')}")
    try:
        figure_format(path)
    except ValueError as err:
        raise _UsageError(f"--out {err}") from None
    parent = path.parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise _UsageError(f"--out {text!r}: {str(parent)!r} {why}")
    if not os.access(parent, os.W_OK):
        raise _UsageError(f"--out {text!r}: cannot write in {str(parent)!r}")
    if path.is_symlink():
        if not force:
            raise _UsageError(f"--out {text!r} is a symbolic link; pass --force to replace the "
                              "link (its target is left alone)")
        return path
    if not path.exists():
        return path
    if not path.is_file():
        raise _UsageError(f"--out {text!r} exists and is not a regular file")
    if force:
        return path
    if not _is_figure(path):
        raise _UsageError(f"--out {text!r} exists and is not a PNG, JPEG, PDF or SVG file; "
                          "pass --force to overwrite it")
    if not path.resolve().is_relative_to(Path.cwd().resolve()):
        raise _UsageError(f"--out {text!r} exists outside the current directory; pass --force "
                          "to overwrite it")
    return path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="explain the embedded digits CNN and write a figure of heatmaps",
        description="Explain a batch of test digits with the embedded CNN; print test accuracy, "
        "explained images per second and the path of the figure (inputs beside heatmaps).",
    )
    p.add_argument("--out", default="rlrp_demo.png",
                   help="figure to write; the extension picks the format: .png, .jpg, .jpeg, "
                   ".pdf or .svg (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="overwrite --out even if it is a symbolic link, a file that is not a "
                   "figure, or a file outside the current directory")
    p.add_argument("--rule", default="rlrp", help="relevance rule (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="engine backend (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="images explained in the timed batch (default: %(default)s)")
    p.add_argument("--n-show", type=_positive_int, default=16,
                   help="images drawn in the PNG (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _UsageError(
            "--device cuda requested but CUDA is not available on this machine; use --device cpu"
        )
    try:
        out = _check_out(args.out, args.force)  # before any work: a bad path fails in milliseconds
    except OSError as err:  # e.g. a file name too long for the file system
        raise _UsageError(f"--out {args.out!r}: {err.strerror or err}") from err
    from .demo import run_demo  # late: keeps `rlrp-fast --help` fast and free of data loading

    try:
        result = run_demo(
            out=out,
            rule=args.rule,
            batch_size=args.batch_size,
            device=args.device,
            n_show=args.n_show,
            backend=args.backend,
        )
    except (ValueError, NotImplementedError, ImportError, OSError) as err:
        # The engine and the demo report user-fixable problems with these types and a message
        # that names the culprit (OSError: the figure could not be written, e.g. disk full);
        # a traceback would add nothing for a command-line user.
        raise _UsageError(str(err)) from err
    print(f"test accuracy: {result['accuracy'] * 100:.2f}%")
    print(f"explained {args.batch_size} images in {result['seconds'] * 1e3:.1f} ms: "
          f"{result['images_per_s']:.1f} images/s ({args.rule}, {args.device})")
    print(f"heatmaps: {result['path']}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from .digits import IMAGE_SIZE  # light: no data loading
    from .evaluate import METHODS

    p = sub.add_parser(
        "evaluate",
        help="faithfulness table of every method on the embedded digits CNN",
        description="Score R-LRP and the classic rules on the embedded digits CNN's test "
        "images: MoRF/LeRF region perturbation (4x4 patches set to 0), ABPC, insertion "
        "(from a blurred copy) and deletion AUCs of the predicted class's probability, and "
        "the Gini sparseness of the maps. Prints a Markdown table (mean ± standard error). "
        "The full study on three trained models is `python -m rlrp_fast.evaluate` "
        "(docs/EVALUATION.md).",
    )
    p.add_argument("--n-images", type=_positive_int, default=100,
                   help="test images scored (default: %(default)s, at most 360)")
    p.add_argument("--methods", nargs="+", default=None, metavar="KEY",
                   help="subset of methods (default: all): " + ", ".join(m.key for m in METHODS))
    p.add_argument("--patch-size", type=_positive_int, default=4,
                   help=f"side of the square patches, in pixels of the {IMAGE_SIZE}x{IMAGE_SIZE} "
                   f"model input, at most {IMAGE_SIZE - 1} (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=16,
                   help="perturbation steps per curve (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _UsageError(
            "--device cuda requested but CUDA is not available on this machine; use --device cpu"
        )
    from .digits import IMAGE_SIZE

    if args.patch_size >= IMAGE_SIZE:
        # One patch covers the whole image: there is no order of patches to score.
        raise _UsageError(f"--patch-size {args.patch_size} does not fit the {IMAGE_SIZE}x"
                          f"{IMAGE_SIZE} model input (the 8x8 digits upsampled); use at most "
                          f"{IMAGE_SIZE - 1}")
    import time

    from .evaluate import evaluate_default

    t0 = time.perf_counter()
    try:
        table, _ = evaluate_default(n_images=args.n_images, methods=args.methods,
                                    patch_size=args.patch_size, steps=args.steps,
                                    device=args.device, progress=not args.no_progress)
    except (ValueError, NotImplementedError, ImportError, OSError) as err:
        raise _UsageError(str(err)) from err
    print(f"embedded digits CNN, {args.n_images} test images, {args.patch_size}x"
          f"{args.patch_size} patches, {args.steps} steps ({time.perf_counter() - t0:.0f} s)")
    print(table)
    return 0


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers such as 0.5,0.5,0.5, got {text!r}"
                                         ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _formats(text: str) -> tuple[str, ...]:
    values = tuple(v.strip().lower() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in ("png", "npy")]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"expected png, npy or png,npy, got {text!r}")
    return values


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="explain your images with a torchvision model (heatmaps, .npy, predictions.jsonl)",
        description="Explain image files, folders (searched recursively for .jpg/.jpeg/.png/"
        ".webp) and glob patterns with a model: per image and explained class a heatmap "
        "figure (input beside the map, with a colour bar) and the raw relevance (.npy), one "
        "JSON line per image in OUT/predictions.jsonl, and OUT/manifest.json. Unreadable "
        "files are reported on stderr and skipped. Under `torchrun --nproc-per-node N -m "
        "rlrp_fast explain ...` the images are sharded over the ranks.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGES",
                   help="image files, folders and glob patterns (quote them: ** recurses)")
    p.add_argument("--model", required=True,
                   help="a torchvision classification model name (built with weights=None: "
                   "nothing is downloaded; pass --weights), e.g. resnet50, or 'digits' (the "
                   "demo's embedded CNN: grey 32x32 images in [0, 1] by default)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="a state_dict for --model, loaded with torch.load(weights_only=True)")
    p.add_argument("--num-classes", type=_positive_int, default=None,
                   help="classes of the model (default: from --weights, else the model's own)")
    p.add_argument("--rule", default="rlrp", help="relevance rule (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="engine backend (default: %(default)s)")
    p.add_argument("--top-k", type=_positive_int, default=1,
                   help="explain each of the K highest-scoring classes (default: %(default)s)")
    p.add_argument("--out", default="rlrp_explanations", metavar="DIR",
                   help="output folder (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=4,
                   help="DataLoader processes decoding images; 0 decodes in the main process "
                   "(default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="(default: %(default)s; under torchrun each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--size", type=_positive_int, default=None,
                   help="side of the centre crop the model sees; the shorter side is first "
                   "resized to size*256/224 (default: 224; 32 for --model digits)")
    p.add_argument("--mean", type=_floats, default=None,
                   help="normalisation mean per channel, e.g. 0.5,0.5,0.5 (default: ImageNet's)")
    p.add_argument("--std", type=_floats, default=None,
                   help="normalisation std per channel (default: ImageNet's)")
    p.add_argument("--no-normalize", action="store_true",
                   help="feed pixel values in [0, 1], without mean/std (the default for "
                   "--model digits)")
    p.add_argument("--format", type=_formats, default=("png", "npy"), metavar="png,npy",
                   help="outputs per image and class (default: png,npy)")
    p.add_argument("--npy-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the .npy relevance (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="skip images that already have a complete record in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _UsageError(
            "--device cuda requested but CUDA is not available on this machine; use --device cpu"
        )
    if args.workers < 0:
        raise _UsageError(f"--workers must be 0 or more, got {args.workers}")
    if args.no_normalize and (args.mean is not None or args.std is not None):
        raise _UsageError("--no-normalize cannot be combined with --mean/--std")
    from . import pipeline  # late: keeps `rlrp-fast --help` fast

    digits = args.model == pipeline.DIGITS
    size = args.size or (pipeline.DIGITS_SIZE if digits else 224)
    if args.no_normalize or (digits and args.mean is None and args.std is None):
        mean = std = None
    else:
        mean = args.mean if args.mean is not None else pipeline.IMAGENET_MEAN
        std = args.std if args.std is not None else pipeline.IMAGENET_STD
    cfg = pipeline.RunConfig(
        images=args.images, model=args.model, weights=args.weights,
        num_classes=args.num_classes, rule=args.rule, backend=args.backend, top_k=args.top_k,
        out=args.out, batch_size=args.batch_size, workers=args.workers, device=args.device,
        size=size, mean=mean, std=std, formats=args.format, npy_dtype=args.npy_dtype,
        resume=args.resume, progress=not args.quiet)

    def skipped(path: str, why: str) -> None:
        print(f"{_PROG} explain: skipped {path}: {_one_line(why)}", file=sys.stderr, flush=True)

    try:
        result = pipeline.run(cfg, on_error=skipped)
    except (ValueError, NotImplementedError, ImportError, OSError) as err:
        raise _UsageError(str(err)) from err
    if int(os.environ.get("RANK", "0")) == 0:
        ranks = f" on {result.world_size} ranks" if result.world_size > 1 else ""
        print(f"explained {result.images} images (top-{args.top_k}), {result.errors} errors, "
              f"{result.skipped} already done, in {result.seconds:.1f} s: "
              f"{result.images_per_s:.1f} images/s{ranks} -> {args.out}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description="Fast R-LRP explanations for PyTorch image classifiers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_evaluate(sub)
    _add_explain(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the process exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and bad usage (2): return instead
        return exit_.code if isinstance(exit_.code, int) else _USAGE_ERROR
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _UsageError as err:
        print(f"{_PROG} {args.command}: error: {_one_line(str(err))}", file=sys.stderr)
        return _USAGE_ERROR
    except KeyboardInterrupt:  # Ctrl-C during a long evaluate: a stop, not a crash
        print(f"{_PROG} {args.command}: interrupted", file=sys.stderr)
        return _INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
