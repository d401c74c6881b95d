"""MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024) as a bstune workload:
the `mnist1d` package's procedurally generated data (no download) and the paper's small 1-D CNN.

Needs `pip install mnist1d` (bstune's optional extra: `pip install 'bstune[examples]'`).
"""

from __future__ import annotations

import torch
from torch import nn


def data() -> tuple:
    """4,000 training and 1,000 test signals of length 40, ten classes (about a second to generate)."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    train = (torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"]))
    val = (torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"]))
    return train, val


class ConvBase(nn.Module):
    """The paper's CNN: three strided 1-D convolutions of 25 channels and a linear head (about 5k weights)."""

    def __init__(self, num_classes: int = 10, channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, num_classes)  # length 40 -> 19 -> 10 -> 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x.unsqueeze(1)).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


def model(num_classes: int) -> nn.Module:
    return ConvBase(num_classes)
