"""A trial trained by the user's own loop (`workload.trainer: FILE.py:FUNC`), recorded as any trial is.

FUNC(trial) gets an `OwnTrial`: the point (batch_size, lr, momentum), the seed, epochs, device, every other
workload field, and the data set's tensors when the spec names one. It calls `trial.report(epoch, value,
examples=N)` after each epoch (N: training examples processed so far, which the budget counts) and returns once
`trial.should_stop()` is true (pruned, diverged, or its epochs done). Its return value, else the last value it
reported, is the trial's objective. Each report goes where a built-in trial's epoch goes (its MLflow run, the
Optuna trial, the pruner, the progress display); an exception in FUNC is the trial's FAILED, with its message;
running out of device memory its OOM; a non-finite value its DIVERGED; Ctrl-C and SIGTERM propagate.
"""

from __future__ import annotations

import math
import time
from dataclasses import fields
from typing import Any, Protocol

import torch

from bstune import entry
from bstune.spec import Workload
from bstune.train import Diverged, EpochStats
from bstune.trials import State

_REPORTED = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")  # metrics a report may add by name


class TrialRun(Protocol):
    """What of `objective._TrialRun` a trial of one's own loop needs."""

    ended: bool
    metric: str
    point: Any
    started: float

    def on_epoch(self, s: EpochStats) -> bool: ...
    def end(self, state: State, reason: str = "", value: float | None = None) -> bool: ...
    def charge_divergence(self, e: Diverged) -> None: ...


class OwnTrial:
    """What the user's trainer gets: the trial's settings as attributes, and `report` / `should_stop`."""

    def __init__(self, run: TrialRun, workload: Workload, seed: int, device: torch.device, epochs: int,
                 data: Any = None, number: int = 0) -> None:
        for f in fields(Workload):
            setattr(self, f.name, getattr(workload, f.name))
        p = run.point
        self.batch_size, self.lr, self.momentum = p.batch_size, p.lr, p.momentum
        self.seed, self.device, self.epochs, self.number = seed, device, epochs, number
        self.train = self.val = None  # (inputs, targets) tensors on the device, when the spec names a data set
        if data is not None and data.n_train:
            self.train, self.val = (data.train_x, data.train_y), (data.val_x, data.val_y)
        self._run = run
        self._n_train = data.n_train if data is not None else 0
        self._last: float | None = None
        self._epoch = 0
        self._diverged: Diverged | None = None
        self._stopped = False

    def report(self, epoch: int, value: float, examples: int | None = None, **metrics: float) -> None:
        """The trial's objective after `epoch` (1, 2, ...), and the training examples processed so far; other
        metrics by name (train_loss, val_accuracy, ...) are logged too. Ignored once the trial should stop."""
        if self._stopped:
            return
        value = float(value)
        self._epoch = int(epoch)
        # not told: whole epochs of the spec's data set, if it names one
        seen = int(examples) if examples is not None else self._epoch * self._n_train
        if not math.isfinite(value):
            steps = max(1, seen // max(self.batch_size, 1))
            self._diverged = Diverged(self._epoch, steps, f"reported as {value}")
            self._stopped = True
            return
        self._last = value
        stats = _stats(self._run.metric, self._epoch, value, seen, self.batch_size,
                       time.perf_counter() - self._run.started, metrics)
        if self._run.on_epoch(stats):  # pruned (recorded already), or taken away: the trainer sees should_stop()
            self._stopped = True

    def should_stop(self) -> bool:
        """True once the trial is pruned, has diverged, or has reported its last epoch: return then."""
        return self._stopped or self._epoch >= self.epochs


def _stats(metric: str, epoch: int, value: float, seen: int, batch_size: int, seconds: float,
           metrics: dict[str, float]) -> EpochStats:
    values: dict[str, float] = dict.fromkeys(_REPORTED, math.nan)
    values.update({k: float(v) for k, v in metrics.items() if k in values})
    values[metric] = value
    return EpochStats(epoch=epoch, **values, examples_seen=seen,
                      optimizer_steps=math.ceil(seen / batch_size) if seen else 0, train_seconds=seconds,
                      examples_per_second=seen / seconds if seconds > 0 else math.nan, weight_distance=math.nan)


def run_own(run: TrialRun, workload: Workload, device: torch.device, epochs: int, data: Any, number: int) -> None:
    """Train one trial by the workload's trainer and record how it ended."""
    trial = OwnTrial(run, workload, workload.seed, device, epochs, data, number)
    try:
        returned = entry.load(workload.trainer, "workload.trainer")(trial)
    except torch.OutOfMemoryError as e:
        run.end(State.OOM, f"out of memory at batch size {trial.batch_size}: {str(e).splitlines()[0]}")
        return
    except Exception as e:  # noqa: BLE001 - the user's code failed: this trial's FAILED, the study goes on
        if not run.ended:
            run.end(State.FAILED, f"{type(e).__name__}: {e}")
        return
    if run.ended:  # pruned
        return
    if trial._diverged is not None:
        run.charge_divergence(trial._diverged)
        run.end(State.DIVERGED, str(trial._diverged))
        return
    value = _number(returned)
    if value is None:
        value = trial._last
    if value is None:
        run.end(State.FAILED, f"{entry.name_of(workload.trainer)} reported nothing and returned {returned!r}; "
                              "call trial.report(epoch, value, examples=N) each epoch or return the objective")
    elif not math.isfinite(value):
        run.charge_divergence(Diverged(trial._epoch, 1, f"returned as {value}"))
        run.end(State.DIVERGED, f"objective returned as {value}")
    else:
        run.end(State.COMPLETE, value=value)


def _number(v: Any) -> float | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    return None
