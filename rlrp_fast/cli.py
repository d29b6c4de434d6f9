"""Command line: ``rlrp-fast <command> [options]`` (also ``python -m rlrp_fast``).

Commands:
  demo      explain the embedded digits CNN, print accuracy and speed, write a PNG of heatmaps.
  evaluate  faithfulness table (region perturbation, insertion/deletion) of every method on
            the embedded digits CNN.

The CLI is the only place in rlrp_fast that prints. User errors (bad options, no CUDA, unknown
rule) end with one ``rlrp-fast <command>: error: ...`` line on stderr and exit code 2, not a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import torch

__all__ = ["main"]

_PROG = "rlrp-fast"
_USAGE_ERROR = 2  # argparse's own exit code for bad usage; we use it for every user error


class _UsageError(Exception):
    """A problem with the command line that the user can fix; reported as one line."""


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
        help="explain the embedded digits CNN and write a PNG of heatmaps",
        description="Explain a batch of test digits with the embedded CNN; print test accuracy, "
        "explained images per second and the path of the PNG (inputs beside heatmaps).",
    )
    p.add_argument("--out", default="rlrp_demo.png", help="PNG to write (default: %(default)s)")
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
    from .demo import run_demo  # late: keeps `rlrp-fast --help` fast and free of data loading

    try:
        result = run_demo(
            out=args.out,
            rule=args.rule,
            batch_size=args.batch_size,
            device=args.device,
            n_show=args.n_show,
            backend=args.backend,
        )
    except (ValueError, NotImplementedError, ImportError, FileNotFoundError) as err:
        # The engine and the demo report user-fixable problems with these types and a message
        # that names the culprit; a traceback would add nothing for a command-line user.
        raise _UsageError(str(err)) from err
    print(f"test accuracy: {result['accuracy'] * 100:.2f}%")
    print(f"explained {args.batch_size} images in {result['seconds'] * 1e3:.1f} ms: "
          f"{result['images_per_s']:.1f} images/s ({args.rule}, {args.device})")
    print(f"heatmaps: {result['path']}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from .evaluate import METHODS  # light: no data loading

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
    p.add_argument("--patch-size", type=_positive_int, default=4, help="(default: %(default)s)")
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
    import time

    from .evaluate import evaluate_default

    t0 = time.perf_counter()
    try:
        table, _ = evaluate_default(n_images=args.n_images, methods=args.methods,
                                    patch_size=args.patch_size, steps=args.steps,
                                    device=args.device, progress=not args.no_progress)
    except (ValueError, NotImplementedError, ImportError, FileNotFoundError) as err:
        raise _UsageError(str(err)) from err
    print(f"embedded digits CNN, {args.n_images} test images, {args.patch_size}x"
          f"{args.patch_size} patches, {args.steps} steps ({time.perf_counter() - t0:.0f} s)")
    print(table)
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Fast R-LRP explanations for PyTorch image classifiers."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_evaluate(sub)
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
        print(f"{_PROG} {args.command}: error: {err}", file=sys.stderr)
        return _USAGE_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
