"""The evaluation's model zoo: three architectures trained on scikit-learn's digits.

- :class:`PlainCNN`  a plain CNN (conv -> ReLU -> max-pool, three times, then two Linear
  layers; no BatchNorm, no skip).
- :class:`VGGBN`     a VGG-style net: two conv3x3 -> BatchNorm -> ReLU per stage, max-pool
  between stages, a small dense head.
- :class:`SmallResNet` a small ResNet of basic blocks; the second block downsamples with a
  strided 1x1 conv (+ BatchNorm) projection on the skip. Residual sums are written with ``+``.

Every model is ``torch.fx`` traceable and built only from ops the engine supports. They are
trained on the *evaluation split* (:data:`EVAL_TEST_SIZE` = 30% of the 1797 digits held out,
stratified, ``random_state=EVAL_SPLIT_SEED``: 1257 train / 540 test images), which is larger
than the demo's 20% test split so the evaluation can score more than 500 held-out images. The
demo's model and split (:mod:`rlrp_fast.digits`) are not affected.

Run ``python -m rlrp_fast.zoo [--arch NAME ...]`` to retrain and rewrite the shipped weights
(``rlrp_fast/data/zoo_<arch>.pt``). Training is seeded and single-threaded (bitwise
reproducible on one machine).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .digits import NUM_CLASSES, fit, load_digits_split, load_weights, train_and_save

__all__ = [
    "ARCHS",
    "EVAL_SPLIT_SEED",
    "EVAL_TEST_SIZE",
    "PlainCNN",
    "SmallResNet",
    "VGGBN",
    "build",
    "load_eval_split",
    "load_pretrained",
    "train",
    "weights_path",
]

EVAL_TEST_SIZE = 0.3
"""Fraction of the digits held out for evaluation (540 images)."""

EVAL_SPLIT_SEED = 0

_DATA = Path(__file__).resolve().parent / "data"


class PlainCNN(nn.Module):
    """conv3x3(16) -> ReLU -> pool, conv3x3(32) -> ReLU -> pool, conv3x3(64) -> ReLU -> pool,
    Linear(1024, 64) -> ReLU -> Linear(64, 10). Input (N, 1, 32, 32) in [0, 1]."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class VGGBN(nn.Module):
    """VGG-style with BatchNorm: [16, 16, M, 32, 32, M, 64, 64, M] (conv3x3 -> BN -> ReLU,
    M = max-pool 2), then Linear(1024, 64) -> ReLU -> Dropout -> Linear(64, 10)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for width in (16, 32, 64):
            layers += _conv_bn_relu(cin, width) + _conv_bn_relu(width, width)
            layers.append(nn.MaxPool2d(2))
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.25),
            nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the skip, -> ReLU.

    The skip is the identity, or (``stride != 1`` or a width change) a strided 1x1 conv ->
    BN projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + identity)


class SmallResNet(nn.Module):
    """stem conv3x3(16) -> BN -> ReLU -> max-pool (16x16), BasicBlock(16, 16),
    BasicBlock(16, 32, stride 2, projection skip) (8x8), BasicBlock(32, 32), global average
    pool, Linear(32, 10)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


ARCHS: dict[str, Callable[[], nn.Module]] = {
    "plain_cnn": PlainCNN,
    "vgg_bn": VGGBN,
    "resnet": SmallResNet,
}
"""Architecture name -> constructor (the order is the evaluation table's)."""

# name -> (epochs, lr); recipes that reach > 95% test accuracy in well under a minute of CPU
_RECIPES = {"plain_cnn": (10, 3e-3), "vgg_bn": (8, 3e-3), "resnet": (10, 5e-3)}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")


def weights_path(arch: str) -> Path:
    """Where the shipped state_dict of ``arch`` lives (``rlrp_fast/data/zoo_<arch>.pt``)."""
    _check_arch(arch)
    return _DATA / f"zoo_{arch}.pt"


def build(arch: str) -> nn.Module:
    """A freshly initialised ``arch`` (uses the global RNG), eval mode."""
    _check_arch(arch)
    return ARCHS[arch]().eval()


def load_eval_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of the evaluation split (1257 / 540 images)."""
    return load_digits_split(seed=EVAL_SPLIT_SEED, test_size=EVAL_TEST_SIZE)


def train(arch: str, seed: int = 0, epochs: int | None = None, lr: float | None = None,
          batch_size: int = 64) -> tuple[nn.Module, float]:
    """Train ``arch`` on the evaluation split with Adam and a one-cycle schedule, on the CPU.

    Seeded (initialisation and batch order) and single-threaded, so bitwise reproducible on
    one machine. Returns ``(model in eval mode, test accuracy on the 540 held-out images)``.
    """
    _check_arch(arch)
    default_epochs, default_lr = _RECIPES[arch]
    epochs = default_epochs if epochs is None else epochs
    lr = default_lr if lr is None else lr
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return fit(ARCHS[arch], load_eval_split(), epochs, seed, batch_size, lr)


def load_pretrained(arch: str, path: str | Path | None = None) -> nn.Module:
    """The shipped ``arch`` (CPU, eval mode), or one loaded from a state_dict at ``path``."""
    _check_arch(arch)
    return load_weights(ARCHS[arch](), weights_path(arch) if path is None else path,
                        f"python -m rlrp_fast.zoo --arch {arch}")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlrp_fast.zoo",
        description="Retrain the evaluation models on the digits and write their weights.")
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=list(ARCHS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: each architecture's recipe (8 or 10)")
    parser.add_argument("--out-dir", type=Path, default=_DATA)
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    for arch in args.arch:
        train_and_save(lambda: train(arch, seed=args.seed, epochs=args.epochs),
                       args.out_dir / f"zoo_{arch}.pt", f"{arch}: ")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
