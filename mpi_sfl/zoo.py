"""The built-in models (`model.name` = "cnn", "lenet5", "mlp", "resnet18"): each an `nn.Sequential`
built for the data's sample shape and classes, with its default cut into encoder | body | head
(`MODELS`). What any model goes through (a user's function, the cut, the set-up check) is models.py's."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .errors import UserError


def _image(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise UserError(f"model {name} takes images (channels, height, width); the data's samples have "
                        f"shape {list(shape)}: use model.name = \"mlp\" or a model of your own")
    return shape  # type: ignore[return-value]


def cnn(input_shape=(1, 28, 28), num_classes=10) -> nn.Sequential:
    """Small CNN; the server part carries the dropout (its masks must survive recompute). Cut [3, 10]."""
    c, h, w = _image("cnn", input_shape)
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),                              # 16 x H/2 x W/2
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Dropout(0.25),                  # 128
        nn.Linear(128, num_classes))


def lenet5(input_shape=(1, 28, 28), num_classes=10) -> nn.Sequential:
    """LeNet-5 with tanh and average pooling. Cut [3, 11]."""
    c, h, w = _image("lenet5", input_shape)
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),                                # 6 x H/2 x W/2
        nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(16 * ((h // 2 - 4) // 2) * ((w // 2 - 4) // 2), 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),  # 84
        nn.Linear(84, num_classes))


def mlp(input_shape=(1, 28, 28), num_classes=10) -> nn.Sequential:
    """Two hidden layers of 64 on any sample shape. Cut [3, 5]."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, num_classes))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with BatchNorm and an identity (or 1x1-projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(input_shape=(3, 32, 32), num_classes=10) -> nn.Sequential:
    """ResNet-18 with the CIFAR stem (3x3 convolution, no max-pool) for small images. The default
    cut [2, 10] is the SplitFed paper's: the client keeps the first convolution block and the first
    residual block (and the final linear layer, U-shaped); the server runs the other 7 blocks."""
    c, _, _ = _image("resnet18", input_shape)
    widths = [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
              (256, 512, 2), (512, 512, 1)]
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(c, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()),
        *(BasicBlock(i, o, s) for i, o, s in widths),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        nn.Linear(512, num_classes))


# name -> (builder, default cut)
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[int, int]]] = {
    "cnn": (cnn, (3, 10)), "lenet5": (lenet5, (3, 11)), "mlp": (mlp, (3, 5)), "resnet18": (resnet18, (2, 10)),
}
