"""torchvision's ResNet-18, as is, on bstune's CIFAR-10 loader (workload.dataset: cifar10): the data set held
on the device as uint8, normalised and augmented (random crop, flip) there."""

from __future__ import annotations

from torch import nn


def model(num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=num_classes)  # freshly initialised: bstune seeds torch before the call
