"""The optimizers of K stacked runs as one update over stacked tensors, each member with its own lr, momentum
and weight decay, following torch.optim's single-tensor formulas:

- SGD: d = g + wd p; buf = m buf + d (the first step buf = d); d = buf (Nesterov: d + m buf); p -= lr d.
- Adam: d = g + wd p; m1 = lerp(m1, d, 1 - beta1); m2 = beta2 m2 + (1 - beta2) d^2;
  p -= lr / (1 - beta1^t) * m1 / (sqrt(m2) / sqrt(1 - beta2^t) + eps). AdamW decays p *= 1 - lr wd instead.

Momentum is beta1 for the Adam family (beta2 = 0.999, eps = 1e-8), as `optimizers.make_optimizer`. Every tensor is
handled through its member view (K, n), so the per-member hyperparameters are (K, 1) columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bstune.registry import OPTIMIZERS

BETA2 = 0.999
EPS = 1e-8


class StackedOptimizer:
    """One optimizer for the K members of stacked parameters (leading axis K)."""

    def __init__(self, name: str, params: list[nn.Parameter], lr: Sequence[float], momentum: Sequence[float],
                 weight_decay: Sequence[float]) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}")
        self.name = name
        self.params = params
        device, dtype = params[0].device, params[0].dtype

        def column(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=dtype, device=device).view(-1, 1)

        self.lr, self.momentum, self.weight_decay = column(lr), column(momentum), column(weight_decay)
        self.one_minus_momentum = column([1.0 - m for m in momentum])
        self.decays = any(v != 0 for v in weight_decay)
        self.adam = name in ("adam", "adamw")
        self.uses_buffers = self.adam or any(m != 0 for m in momentum)
        self.steps = 0
        k = len(lr)
        n_state = (2 if self.adam else 1) if self.uses_buffers else 0
        self.state = [[torch.zeros(k, p.numel() // k, device=device) for p in params] for _ in range(n_state)]

    def keep(self, keep: torch.Tensor, params: list[nn.Parameter]) -> None:
        """Re-slice to the members at indices `keep`, as `stacked.keep_members` does the model, whose
        parameters are now `params`."""
        self.params = params
        for name in ("lr", "momentum", "weight_decay", "one_minus_momentum"):
            setattr(self, name, getattr(self, name).index_select(0, keep))
        self.state = [[t.index_select(0, keep) for t in ts] for ts in self.state]

    @torch.no_grad()
    def step(self, factor: float = 1.0) -> None:
        """One update, every member at its base lr times `factor` (the schedule's, the same for all)."""
        k = self.lr.shape[0]
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        w = [self.params[i].view(k, -1) for i in live]
        g = [self.params[i].grad.view(k, -1) for i in live]
        state = [[ts[i] for i in live] for ts in self.state]
        lr = self.lr * factor
        self.steps += 1
        if self.adam:
            self._adam(w, g, state, lr)
        else:
            self._sgd(w, g, state, lr)

    def _sgd(self, w: list[torch.Tensor], g: list[torch.Tensor], state: list[list[torch.Tensor]],
             lr: torch.Tensor) -> None:
        n = len(w)
        d = torch._foreach_addcmul(g, w, [self.weight_decay] * n) if self.decays else g
        if self.uses_buffers:
            buf = state[0]
            for b, x in zip(buf, d, strict=True):  # buf = d + m buf in one pass, in place
                torch.addcmul(x, b, self.momentum, out=b)
            d = torch._foreach_addcmul(d, buf, [self.momentum] * n) if self.name == "nesterov" else buf
        torch._foreach_addcmul_(w, d, [-lr] * n)

    def _adam(self, w: list[torch.Tensor], g: list[torch.Tensor], state: list[list[torch.Tensor]],
              lr: torch.Tensor) -> None:
        n, t = len(w), self.steps
        d = g
        if self.decays and self.name == "adamw":
            torch._foreach_mul_(w, [1.0 - lr * self.weight_decay] * n)
        elif self.decays:
            d = torch._foreach_addcmul(g, w, [self.weight_decay] * n)
        m1, m2 = state
        torch._foreach_lerp_(m1, d, [self.one_minus_momentum] * n)
        torch._foreach_mul_(m2, BETA2)
        torch._foreach_addcmul_(m2, d, d, value=1.0 - BETA2)
        step_size = lr / (1.0 - self.momentum.pow(t))
        denom = torch._foreach_sqrt(m2)
        torch._foreach_div_(denom, math.sqrt(1.0 - BETA2**t))
        torch._foreach_add_(denom, EPS)
        torch._foreach_addcmul_(w, torch._foreach_div(m1, denom), [-step_size] * n)
