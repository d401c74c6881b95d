"""What one training run is: its settings (`TrainConfig`, from a workload by `train_config`) and how many steps
and epochs they come to (`plan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from bstune.spec import Workload


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs besides its data. Fields named as in `Workload` take its values (see
    `train_config`)."""

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
    model: Any = "mlp"  # a built-in's name, or an entry point / callable (models.build_model)
    loss: Any = None  # an entry point / callable (outputs, targets) -> mean loss; None: cross-entropy
    width: int = 128
    compile: str = "off"  # torch.compile mode: off | default | reduce-overhead (CUDA graphs) | max-autotune
    diagnostics_every: int = 16  # noise scale every this-many-th step, gradient statistics too (0: all off)
    grad_histogram_epochs: tuple[int | str, ...] = (1, "last")  # epochs with gradient histograms ("last": the last)
    check_every: int = 16  # steps between divergence checks (each is one host sync)
    eval_batch_size: int = 4096


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one pass over `n_train` examples, the last batch possibly smaller."""
    return math.ceil(n_train / batch_size)


def plan(cfg: TrainConfig, n_train: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, steps in all, epochs) of a run. Compiled runs drop the last, smaller
    batch (it would record a second CUDA graph), any run a last batch of one example (batch norm cannot
    train on one); with ``steps`` set the run lasts that many steps, however many epochs they take."""
    drop = n_train >= cfg.batch_size and (cfg.compile != "off" or n_train % cfg.batch_size == 1)
    per_epoch = n_train // cfg.batch_size if drop else steps_per_epoch(n_train, cfg.batch_size)
    per_epoch = max(per_epoch, 1)  # no data of bstune's (a trainer of one's own): epochs are the user's
    total = cfg.steps if cfg.steps is not None else per_epoch * cfg.epochs
    return per_epoch, total, math.ceil(total / per_epoch)


def train_config(w: Workload, batch_size: int, lr: float, momentum: float, seed: int | None = None) -> TrainConfig:
    """The training run of one trial: the workload's settings at (batch_size, lr, momentum). Every field of
    TrainConfig that Workload also has is copied by name, except that ``steps`` counts only with
    ``hold: steps``; ``seed`` replaces the workload's."""
    workload_fields = {f.name for f in fields(Workload)}
    shared = {f.name: getattr(w, f.name) for f in fields(TrainConfig) if f.name in workload_fields}
    shared.update(steps=w.steps if w.hold == "steps" else None, seed=w.seed if seed is None else seed)
    return TrainConfig(batch_size=batch_size, lr=lr, momentum=momentum, **shared)
