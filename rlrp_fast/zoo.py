"""The evaluation's model zoo: five architectures trained on scikit-learn's digits.

The three classic ones (:data:`CLASSIC_ARCHS`, the evaluation's main tables):

- :class:`PlainCNN`  a plain CNN (conv -> ReLU -> max-pool, three times, then two Linear
  layers; no BatchNorm, no skip).
- :class:`VGGBN`     a VGG-style net: two conv3x3 -> BatchNorm -> ReLU per stage, max-pool
  between stages, a small dense head.
- :class:`SmallResNet` a small ResNet of basic blocks; the second block downsamples with a
  strided 1x1 conv (+ BatchNorm) projection on the skip. Residual sums are written with ``+``.

Two modern ones (:data:`MODERN_ARCHS`, the evaluation's section on gates and attention):

- :class:`TinyViT`   a ViT: 4x4 patch-embedding conv, class token, position embedding, two
  pre-norm encoder blocks (``nn.MultiheadAttention``, LayerNorm, GELU MLP), head on the
  class token.
- :class:`SEConvNet` a ConvNeXt-style net with squeeze-excitation: patchify stem, blocks of
  depthwise 7x7 conv -> channels LayerNorm -> 1x1 expand -> GELU -> 1x1 project -> sigmoid SE
  gate, plus the residual; a LayerNorm + strided 2x2 conv between the two stages.

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
    "CLASSIC_ARCHS",
    "ChannelsLayerNorm",
    "ConvNeXtSEBlock",
    "EncoderBlock",
    "EVAL_SPLIT_SEED",
    "EVAL_TEST_SIZE",
    "PlainCNN",
    "MODERN_ARCHS",
    "SEConvNet",
    "SmallResNet",
    "SqueezeExcite",
    "TinyViT",
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


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))`` with a
    GELU MLP of ``mlp_ratio`` times the width. Tokens are (N, T, dim) (``batch_first``)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """ViT on 4x4 patches (64 tokens of width 32 + a class token), learned position embedding,
    two :class:`EncoderBlock` of 4 heads, final LayerNorm, Linear(32, 10) on the class token.
    The 4x4 patches are the evaluation's perturbation patches. Input (N, 1, 32, 32)."""

    def __init__(self, num_classes: int = NUM_CLASSES, dim: int = 32, depth: int = 2,
                 heads: int = 4, patch: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (32 // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class ChannelsLayerNorm(nn.Module):
    """LayerNorm over the channels of an (N, C, H, W) map (ConvNeXt's channels-first
    LayerNorm), written as transpose -> ``nn.LayerNorm`` -> transpose back."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 3)).transpose(1, 3)


class SqueezeExcite(nn.Module):
    """``x * sigmoid(conv1x1(ReLU(conv1x1(avgpool(x)))))``, channels reduced by ``reduction``."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(channels // reduction, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class ConvNeXtSEBlock(nn.Module):
    """ConvNeXt block with a squeeze-excitation gate: depthwise 7x7 conv ->
    :class:`ChannelsLayerNorm` -> 1x1 conv (``expansion`` x) -> GELU -> 1x1 conv ->
    :class:`SqueezeExcite`, plus the identity skip."""

    def __init__(self, channels: int, expansion: int = 2) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = ChannelsLayerNorm(channels)
        self.pw1 = nn.Conv2d(channels, expansion * channels, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(expansion * channels, channels, 1)
        self.se = SqueezeExcite(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se(self.pw2(self.act(self.pw1(self.norm(self.dwconv(x))))))


class SEConvNet(nn.Module):
    """Patchify stem (conv 4x4 stride 4 -> :class:`ChannelsLayerNorm`, 8x8 x 16),
    :class:`ConvNeXtSEBlock` (16), downsample (ChannelsLayerNorm -> conv 2x2 stride 2, 4x4 x
    32), :class:`ConvNeXtSEBlock` (32), global average pool, LayerNorm, Linear(32, 10)."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, int] = (16, 32)
                 ) -> None:
        super().__init__()
        w1, w2 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 4, stride=4), ChannelsLayerNorm(w1))
        self.stage1 = ConvNeXtSEBlock(w1)
        self.down = nn.Sequential(ChannelsLayerNorm(w1), nn.Conv2d(w1, w2, 2, stride=2))
        self.stage2 = ConvNeXtSEBlock(w2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.norm = nn.LayerNorm(w2)
        self.head = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(self.flatten(self.pool(x))))


ARCHS: dict[str, Callable[[], nn.Module]] = {
    "plain_cnn": PlainCNN,
    "vgg_bn": VGGBN,
    "resnet": SmallResNet,
    "vit": TinyViT,
    "se_convnet": SEConvNet,
}
"""Architecture name -> constructor (the order is the evaluation tables')."""

CLASSIC_ARCHS = ("plain_cnn", "vgg_bn", "resnet")
"""The evaluation's main models (ReLU, max-pool, BatchNorm, residual adds)."""
MODERN_ARCHS = ("vit", "se_convnet")
"""The evaluation's attention / gate models (its own section of docs/EVALUATION.md)."""

# name -> (epochs, lr); recipes that reach > 95% test accuracy in about a minute of CPU or less
_RECIPES = {"plain_cnn": (10, 3e-3), "vgg_bn": (8, 3e-3), "resnet": (10, 5e-3),
            "vit": (30, 3e-3), "se_convnet": (15, 5e-3)}


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
                        help="default: each architecture's recipe (8 to 30)")
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
