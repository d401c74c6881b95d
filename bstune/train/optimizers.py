"""The optimizers a spec names (`registry.OPTIMIZERS`), as torch.optim builds them. Momentum is beta1 for the Adam
family. The trainer's stacked update (`stacked_optim`) follows these formulas; tests/test_fused.py checks a lone run
against the plain model trained by hand with them."""

from __future__ import annotations

import torch
from torch import nn

from bstune import entry, registry


def make_optimizer(name: str, params: list[nn.Parameter], lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """The registered optimizer `name` over `params`."""
    return entry.load(registry.OPTIMIZERS[name], "workload.optimizer")(params, lr, momentum, weight_decay)


def sgd(params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def nesterov(params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)


def adam(params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


def adamw(params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
