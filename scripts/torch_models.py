"""Minimal PyTorch ResNet50 / VGG16 (Keras layouts) for scripts/benchmark.py's --compare.

torchvision is not a dependency; these mirror `keras.applications` (biased convs, the ResNet
stride on the first 1x1 conv) so that the FLOPs match affect-jax's models. Benchmark-only code:
PyTorch is optional and never imported by the package.
"""

from __future__ import annotations

import torch
from torch import nn

_RESNET_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


class Bottleneck(nn.Module):
    """Keras stack1 block: 1x1 (stride) -> 3x3 -> 1x1 (x4), projection on the first block."""

    def __init__(self, cin: int, filters: int, stride: int, shortcut: bool):
        super().__init__()
        out = 4 * filters
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, out, 1, stride), nn.BatchNorm2d(out, eps=1.001e-5))
            if shortcut
            else None
        )
        self.body = nn.Sequential(
            nn.Conv2d(cin, filters, 1, stride),
            nn.BatchNorm2d(filters, eps=1.001e-5),
            nn.ReLU(inplace=True),
            nn.Conv2d(filters, filters, 3, 1, 1),
            nn.BatchNorm2d(filters, eps=1.001e-5),
            nn.ReLU(inplace=True),
            nn.Conv2d(filters, out, 1),
            nn.BatchNorm2d(out, eps=1.001e-5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sc = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(sc + self.body(x))


def resnet50() -> tuple[nn.Module, int]:
    """(backbone without top, number of output channels)."""
    layers: list[nn.Module] = [
        nn.ZeroPad2d(3),
        nn.Conv2d(3, 64, 7, 2),
        nn.BatchNorm2d(64, eps=1.001e-5),
        nn.ReLU(inplace=True),
        nn.ZeroPad2d(1),
        nn.MaxPool2d(3, 2),
    ]
    cin = 64
    for filters, blocks, stride in _RESNET_STAGES:
        for b in range(blocks):
            layers.append(Bottleneck(cin, filters, stride if b == 0 else 1, b == 0))
            cin = 4 * filters
    return nn.Sequential(*layers), cin


def vgg16() -> tuple[nn.Module, int]:
    """(backbone without top: 13 convs and 5 max-pools, number of output channels)."""
    layers: list[nn.Module] = []
    cin = 3
    for n_convs, channels in ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)):
        for _ in range(n_convs):
            layers += [nn.Conv2d(cin, channels, 3, 1, 1), nn.ReLU(inplace=True)]
            cin = channels
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers), cin


class MultiTask(nn.Module):
    """Backbone + global average pool + Dense(num_classes) and Dense(2) heads."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        self.backbone, features = {"resnet50": resnet50, "vgg16": vgg16}[name]()
        self.cls = nn.Linear(features, num_classes)
        self.reg = nn.Linear(features, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x).mean(dim=(2, 3))
        return self.cls(f), self.reg(f)
