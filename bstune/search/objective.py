"""One trial: pick its point, train it, report every epoch to Optuna, record how it ended in Optuna and MLflow.

Every trial ends recorded, whatever happens to it (`bstune.trials.State`):

    COMPLETE / PRUNED             as Optuna has them
    DIVERGED (NaN, inf, blow-up)  Optuna PRUNED, so the samplers learn the region is bad
    OOM, FAILED (any other error) Optuna FAIL, with the reason; the study goes on
    INTERRUPTED (Ctrl-C)          Optuna FAIL, re-queued: the next run of the same command re-runs it
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from bstune.errors import redact
from bstune.search._optuna import frozen, trial_id
from bstune.search.progress import Progress
from bstune.search.space import Hyperparams, SearchSpace
from bstune.search.status import worker_id
from bstune.spec import StudySpec, Workload
from bstune.tracking import EPOCH_METRICS, HISTOGRAM_ARTIFACT_DIR, Tracker
from bstune.train import Dataset, Diverged, EpochStats, OutOfMemory, plan, train, train_config
from bstune.trials import BATCH_SIZE, Attr, EpochPoint, State, curve_to_json


class TrialFailed(Exception):
    """Raised out of the objective so Optuna records FAIL (OOM, FAILED) while the study goes on."""


class TrialTakenAway(BaseException):
    """Another worker failed this worker's trial (its heartbeat had gone stale: the machine stalled, or the
    storage was out of reach) and queued it again. The trial is dropped without a word to Optuna, whose
    tell fails on a finished trial: a BaseException, so Optuna's handlers let it through."""


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a trial's exact point to run again (after an interruption or a lost worker)."""
    study.enqueue_trial(dict(trial.params), user_attrs={Attr.RETRY_OF: trial.number})


def workload_params(w: Workload) -> dict[str, Any]:
    """The workload's settings as MLflow params, every one of them (so a new setting shows without an edit)."""
    return {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in asdict(w).items()}


class TrialObjective:
    """Optuna's objective: one trial per call."""

    def __init__(self, spec: StudySpec, space: SearchSpace, data: Dataset, device: Any, tracker: Tracker,
                 parent: str, progress: Progress, claimed: Callable[[], None]) -> None:
        self.spec, self.space, self.data, self.device = spec, space, data, device
        self.tracker, self.parent, self.progress = tracker, parent, progress
        self.claimed = claimed  # called once the trial exists and has its batch size

    def __call__(self, trial: optuna.Trial) -> float:
        run = _TrialRun(self, trial)
        try:
            return run.run()
        except optuna.exceptions.UpdateFinishedTrialError:
            raise TrialTakenAway(trial.number) from None
        except KeyboardInterrupt:
            # Ctrl-C anywhere in the trial, in training or not (picking its point, MLflow's start or end of its
            # run): recorded INTERRUPTED, its MLflow run closed, its point queued to run again
            run.interrupted("interrupted by the user (Ctrl-C); re-queued")
            if BATCH_SIZE in trial.params:  # before it has one there is nothing to re-run
                requeue(trial.study, frozen(trial))
            raise


class _TrialRun:
    """The state of one trial while it runs: its MLflow run, its learning curve, its last numbers."""

    def __init__(self, objective: TrialObjective, trial: optuna.Trial) -> None:
        self.o, self.trial = objective, trial
        self.metric = objective.spec.search.objective
        self.run_id: str | None = None
        self.point: Hyperparams | None = None
        self.curve: list[EpochPoint] = []
        self.last: dict[str, Any] = {}
        self.epochs = 0
        self.started = self.saved = time.perf_counter()

    def run(self) -> float:
        self.start()
        try:
            history = train(self.config, self.o.data, self.o.device, self.on_epoch)
        except optuna.TrialPruned as e:
            self.finish(State.PRUNED, str(e))
            raise
        except Diverged as e:
            self.finish(State.DIVERGED, str(e))
            raise optuna.TrialPruned(str(e)) from None
        except OutOfMemory as e:
            self.finish(State.OOM, f"out of memory at batch size {self.config.batch_size}: {e}")
            raise TrialFailed(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a trial's failure must not end the study
            self.finish(State.FAILED, f"{type(e).__name__}: {e}")
            raise TrialFailed(str(e)) from None
        self.finish(State.COMPLETE)
        return float(getattr(history[-1], self.metric))

    def start(self) -> None:
        """Pick the point, record it on the trial, open the trial's MLflow run."""
        spec, w, trial = self.o.spec, self.o.spec.workload, self.trial
        p = self.point = self.o.space.suggest(trial)
        self.o.claimed()
        n = self.o.data.n_train
        self.config = train_config(w, p.batch_size, p.lr, p.momentum)
        per_epoch, _, self.epochs = plan(self.config, n)
        for k, v in ((Attr.LR, p.lr), (Attr.MOMENTUM, p.momentum), (Attr.EFFECTIVE_LR, p.effective_lr),
                     (Attr.BATCH_SIZE, p.batch_size), (Attr.WORKER_PID, os.getpid()), (Attr.WORKER, worker_id())):
            trial.set_user_attr(k, v)
        params = workload_params(w) | {
            "batch_size": p.batch_size, "lr": p.lr, "momentum": p.momentum, "epochs": self.epochs,
            "effective_lr": p.effective_lr, "noise_scale": p.lr * n / (p.batch_size * (1.0 - p.momentum)),
            "steps_per_epoch": per_epoch, "optuna_trial": trial.number, "n_train": n,
            "retry_of": trial.user_attrs.get(Attr.RETRY_OF),
        }
        self.run_id = self.o.tracker.start_trial(self.o.parent, spec.name, trial.number, trial_id(trial), params)
        trial.set_user_attr(Attr.RUN_ID, self.run_id)
        self.o.progress.trial_started(trial.number, p)

    def on_epoch(self, s: EpochStats) -> None:
        """Log the epoch, report it to Optuna, and stop if the pruner says so."""
        value = getattr(s, self.metric)
        metrics = {k: getattr(s, k) for k in EPOCH_METRICS}
        self.o.tracker.log_epoch(self.run_id, s.epoch, metrics | s.layer_metrics())
        if s.grad_histogram is not None:
            self.o.tracker.log_json(self.run_id, s.grad_histogram, f"{HISTOGRAM_ARTIFACT_DIR}/epoch_{s.epoch:04d}.json")
        self.curve.append(EpochPoint(s.epoch, value, s.optimizer_steps, s.examples_seen))
        self.last.update(metrics, value=value, examples_seen=s.examples_seen, train_seconds=s.train_seconds)
        if time.perf_counter() - self.saved > 5.0:  # spend is saved every few seconds, and at the end
            self.save_spend()
            self.saved = time.perf_counter()
        self.o.progress.epoch_done(self.trial.number, self.point, s.epoch, self.epochs, value)
        self.trial.report(value, s.epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {s.epoch} ({self.metric} {value:.4g})")

    def finish(self, state: State, reason: str = "") -> None:
        """Record how the trial ended: on the Optuna trial, in its MLflow run, to the progress display."""
        trial, last = self.trial, self.last
        reason = redact(reason)  # an error's text may quote a URL with its password
        self.save_spend()
        trial.set_user_attr(Attr.STATE, state)
        if reason:
            trial.set_user_attr(Attr.REASON, reason)
        trial.set_user_attr(Attr.CURVE, curve_to_json(self.curve))
        if last.get("grad_noise_scale") is not None:
            trial.set_user_attr(Attr.GRAD_NOISE_SCALE, last["grad_noise_scale"])
        final = {f"final_{k}": last.get(k) for k in ("val_loss", "val_accuracy", "train_loss")}
        # one name for the objective across studies, and the time cost, for the UI's compare views
        final |= {"examples_seen": last.get("examples_seen"), "final_objective": last.get("value"),
                  "train_seconds": last.get("train_seconds")}
        self.o.tracker.end_trial(self.run_id, state, reason, final)
        self.o.progress.trial_finished(trial.number, self.point, state, last.get("value"),
                                       time.perf_counter() - self.started, reason)

    def interrupted(self, reason: str) -> None:
        """Ctrl-C: recorded as fully as the trial got (it may not have a point or an MLflow run yet)."""
        if self.point is not None and self.run_id is not None:
            self.finish(State.INTERRUPTED, reason)
            return
        self.trial.set_user_attr(Attr.STATE, State.INTERRUPTED)
        self.trial.set_user_attr(Attr.REASON, reason)
        if self.run_id is not None:
            self.o.tracker.close_if_running(self.run_id, State.INTERRUPTED, reason)

    def save_spend(self) -> None:
        if "examples_seen" in self.last:
            self.trial.set_user_attr(Attr.EXAMPLES, self.last["examples_seen"])
            self.trial.set_user_attr(Attr.SECONDS, self.last["train_seconds"])
