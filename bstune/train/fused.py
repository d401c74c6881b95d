"""A stand-in for the fused trainer with its interface: the members are trained one after another (the stacked
trainer replaces it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bstune.train.config import TrainConfig
from bstune.train.data import Dataset
from bstune.train.loop import EpochStats, OutOfMemory, train


@dataclass
class MemberResult:
    index: int
    history: list[EpochStats]
    error: BaseException | None


def train_fused(configs: Sequence[TrainConfig], data: Dataset, device: torch.device | str = "cpu",
                on_epoch: Callable[[int, EpochStats], None] | None = None) -> list[MemberResult]:
    out = []
    for i, cfg in enumerate(configs):
        history: list[EpochStats] = []

        def each(s: EpochStats, i: int = i, history: list = history) -> None:
            history.append(s)
            if on_epoch:
                on_epoch(i, s)
        try:
            train(cfg, data, device, each)
            out.append(MemberResult(i, history, None))
        except OutOfMemory:
            raise
        except Exception as e:  # noqa: BLE001
            out.append(MemberResult(i, history, e))
    return out
