"""Models of the task. Input: float NCHW in [0, 1]; output: logits.

Every model ends in an ``nn.Linear`` named ``fc`` whose input is the penultimate feature vector
(``model.features(x)`` returns it), which is what CLIP-Fed's prototype loss works on. Nothing here
is CLIP-Fed specific: the defence finds the penultimate layer of any model by itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _Normalize(nn.Module):
    """Per-channel standardisation inside the model, so every caller feeds raw [0, 1] pixels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, channels, 1, 1), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Two conv blocks + an MLP head: the CPU default (~1,000 CIFAR images/s on 2 cores)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 32) -> None:
        super().__init__()
        self.norm = _Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        pooled = max(image_size // 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(pooled) if image_size % 4 else nn.Identity()
        self.hidden = nn.Linear(2 * width * pooled * pooled, 128)
        self.fc = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(self.norm(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.pool(x)
        return F.relu(self.hidden(torch.flatten(x, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with the CIFAR stem (3×3 conv, no max-pool). ResNet-18: blocks (2,2,2,2); ResNet-8: (1,1,1)."""

    def __init__(self, blocks: tuple[int, ...], widths: tuple[int, ...], in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.norm = _Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(_BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.norm(x))))
        x = self.layers(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The model named by run-config key ``model``."""
    if name == "cnn":
        return SmallCNN(in_channels, num_classes, image_size)
    if name == "resnet18":
        return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), in_channels, num_classes)
    if name == "resnet8":
        return CifarResNet((1, 1, 1), (64, 128, 256), in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}; allowed values: cnn, resnet8, resnet18")
