"""Random images of CIFAR-10's shape and statistics, for benchmarks of the image path at full size."""

from __future__ import annotations

import torch

from bstune.train import Dataset
from bstune.train.data import CIFAR10_MEAN, CIFAR10_STD


def random_images(n: int = 50_000, shape: tuple[int, int, int] = (3, 32, 32), n_val: int = 10_000,
                  num_classes: int = 10, seed: int = 0) -> Dataset:
    """Random uint8 images of CIFAR-10's shape: exercises the image path at full size (benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    xt = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    xv = torch.randint(0, 256, (n_val, *shape), dtype=torch.uint8, generator=g)
    yt = torch.randint(0, num_classes, (n,), generator=g)
    yv = torch.randint(0, num_classes, (n_val,), generator=g)
    return Dataset("random", xt, yt, xv, yv, num_classes, augment=True, mean=CIFAR10_MEAN, std=CIFAR10_STD)
