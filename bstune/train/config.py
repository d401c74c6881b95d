"""What one training run is: its settings (`TrainConfig`) and how many steps and epochs they come to (`plan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int  # the batch the optimizer sees (split into accumulation_steps micro-batches)
    lr: float
    momentum: float
    optimizer: str = "sgd"
    epochs: int = 10
    steps: int | None = None  # if set, train exactly this many optimizer steps (equal-steps control)
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    accumulation_steps: int = 1
    seed: int = 0
    model: str = "mlp"
    width: int = 128
    compile: str = "off"  # torch.compile mode: off | default | reduce-overhead (CUDA graphs) | max-autotune
    diagnostics_every: int = 16  # noise scale every this-many-th step, gradient statistics too (0: all off)
    grad_histogram_epochs: tuple[int | str, ...] = (1, "last")  # epochs with gradient histograms ("last": the last)
    check_every: int = 16  # steps between divergence checks (each is one host sync)
    eval_batch_size: int = 4096


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return math.ceil(n_train / batch_size)


def plan(cfg: TrainConfig, n_train: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, steps in all, epochs) of a run. Compiled runs drop the last, smaller
    batch (it would record a second CUDA graph); with ``steps`` set the run lasts that many steps, however
    many epochs they take."""
    per_epoch = n_train // cfg.batch_size if cfg.compile != "off" and n_train >= cfg.batch_size \
        else steps_per_epoch(n_train, cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else per_epoch * cfg.epochs
    return per_epoch, total, math.ceil(total / per_epoch)
