"""Small models for the workloads: linear, MLP, a small CNN, and a fast ResNet-style CIFAR net."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bstune import entry, registry
from bstune.errors import BstuneError


def build_model(name: Any, input_shape: tuple[int, ...], num_classes: int, width: int = 128) -> nn.Module:
    """Build a model: a built-in by name (`registry.MODELS`; `width` is the hidden size of mlp, the base channel
    count of cnn and resnet) or a user's entry point / callable, called with the keywords it names of
    (input_shape, num_classes, width). The caller seeds torch first."""
    if isinstance(name, str) and name in registry.MODELS:
        known = registry.MODELS[name]
        if known.images and len(input_shape) != 3:
            raise ValueError(f"model {name!r} needs image input (C, H, W), got shape {input_shape}")
        target: Any = known.target
    else:
        target = name
    fn = entry.load(target, "workload.model")
    model = entry.call(fn, {"input_shape": input_shape, "num_classes": num_classes, "width": width})
    if not isinstance(model, nn.Module):
        raise BstuneError(f"workload.model: {entry.name_of(name)} returned {type(model).__name__}, not a "
                          f"torch.nn.Module; return the freshly built model")
    return model


def linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def mlp(input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def cnn(input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    return SmallCNN(input_shape[0], num_classes, width)


def resnet(input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    return FastResNet(input_shape[0], num_classes, width)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())


class SmallCNN(nn.Module):
    """Two conv stages and a linear head: enough for 8x8 digits, quick on a CPU."""

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = max(width // 4, 8)
        self.features = nn.Sequential(conv_bn(channels, w), conv_bn(w, 2 * w), nn.MaxPool2d(2),
                                      conv_bn(2 * w, 2 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Stage(nn.Module):
    """conv -> pool -> BN -> GELU, then (if `residual`) a residual conv pair. Pooling early keeps the FLOPs
    low."""

    def __init__(self, c_in: int, c_out: int, residual: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.GELU()
        self.res = nn.Sequential(conv_bn(c_out, c_out), conv_bn(c_out, c_out)) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.pool(self.conv(x))))
        return x if self.res is None else x + self.res(x)


class FastResNet(nn.Module):
    """A ResNet-style CIFAR-10 net in the spirit of the fast trainers (ResNet-9 / airbench family):
    a stem, three pooled stages of widths (2w, 4w, 4w) with residual pairs on the first and last, and
    a scaled linear head. With width 64 it is ~2.4M parameters and reaches ~94% in about 10-15 epochs."""

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.stem = conv_bn(channels, w1)
        self.stage1 = Stage(w1, w2)
        self.stage2 = Stage(w2, w3, residual=False)
        self.stage3 = Stage(w3, w3)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.scale = 0.125  # a small logit scale, as in the ResNet-9 recipes: calmer early training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1)) * self.scale
