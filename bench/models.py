"""The benchmark's models: torchvision VGG16 and ResNet50 (random weights and random biases,
224×224) and the embedded digits CNN (1×32×32), each with its BatchNorm-folded twin for the
peers' exact-parity checks; and four modern torchvision architectures (ViT-B/16,
ConvNeXt-Tiny, EfficientNet-B0, MobileNetV3-Large, ``weights=None``, the same randomization,
224×224)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

MODELS = ("digits", "vgg16", "resnet50", "vit_b_16", "convnext_tiny", "efficientnet_b0",
          "mobilenet_v3_large")


def _tv_models():
    """``tests/tv_models.py`` (randomized, fold_batchnorm): one home for those helpers."""
    path = Path(__file__).resolve().parents[1] / "tests" / "tv_models.py"
    spec = importlib.util.spec_from_file_location("_bench_tv_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    low: float                    # the input domain's bounds, for EpsilonGammaBox's zᴮ
    high: float
    is_resnet: bool
    fixed_size: bool = False      # takes only its own H × W (ViT's positional embedding)

    def inputs(self, batch: int, seed: int, size: int | None = None) -> torch.Tensor:
        """A fresh random batch in the model's input domain (``size`` overrides H and W)."""
        if self.fixed_size:
            size = None
        shape = self.input_shape if size is None else (self.input_shape[0], size, size)
        g = torch.Generator().manual_seed(seed)
        if self.name == "digits":
            return torch.rand(batch, *shape, generator=g)
        return torch.randn(batch, *shape, generator=g).clamp_(self.low, self.high)


SPECS = {
    "digits": ModelSpec("digits", (1, 32, 32), 0.0, 1.0, False),
    "vgg16": ModelSpec("vgg16", (3, 224, 224), -3.0, 3.0, False),
    "resnet50": ModelSpec("resnet50", (3, 224, 224), -3.0, 3.0, True),
    "vit_b_16": ModelSpec("vit_b_16", (3, 224, 224), -3.0, 3.0, False, fixed_size=True),
    "convnext_tiny": ModelSpec("convnext_tiny", (3, 224, 224), -3.0, 3.0, False),
    "efficientnet_b0": ModelSpec("efficientnet_b0", (3, 224, 224), -3.0, 3.0, False),
    "mobilenet_v3_large": ModelSpec("mobilenet_v3_large", (3, 224, 224), -3.0, 3.0, False),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The model in eval mode, on CPU, float32."""
    if name not in SPECS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    if name == "digits":
        from rlrp_fast.digits import load_pretrained
        return load_pretrained().eval()
    model = _tv_models().randomized(name, seed=seed)
    if name == "vit_b_16":
        # torchvision zero-initialises the head's weight: every logit would be its bias and
        # every map zero (gradient and relevance alike)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 1)
            model.heads.head.weight.normal_(0, 0.02, generator=g)
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every BatchNorm folded into the conv before it (tests/tv_models.py)."""
    return _tv_models().fold_batchnorm(model)
