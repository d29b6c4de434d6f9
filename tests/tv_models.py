"""torchvision models prepared for comparisons: random biases and BatchNorm statistics
(torchvision initialises biases to zero, which makes LRP-ε equal gradient × input and hides
bugs), and BatchNorm folded into the convolutions the way docs/RLRP_SPEC.md ("Parity set-up") asks parity tests to."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torchvision


def randomized(name: str, seed: int = 0) -> nn.Module:
    """torchvision ``name`` with random weights, biases on every conv/linear, random BN
    statistics and affine parameters; in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if m.bias is None:
                    m.bias = nn.Parameter(torch.zeros(m.weight.shape[0]))
                m.bias.normal_(0, 0.05, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model.eval()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of a torchvision VGG/ResNet with every BatchNorm folded into the conv before it
    (the conv's bias inside the convolution) and replaced by Identity."""
    model = copy.deepcopy(model)
    pairs = {"bn1": "conv1", "bn2": "conv2", "bn3": "conv3"}
    with torch.no_grad():
        for name, bn in list(model.named_modules()):
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if attr.isdigit():  # inside a Sequential: the conv is the previous entry
                conv = parent[int(attr) - 1]
            else:
                conv = getattr(parent, pairs[attr])
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias.copy_(scale * (conv.bias - bn.running_mean) + bn.bias)
            if attr.isdigit():
                parent[int(attr)] = nn.Identity()
            else:
                setattr(parent, attr, nn.Identity())
    return model.eval()
