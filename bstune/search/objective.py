"""Trials as training runs: a group of trials of one batch size is trained together (fused), each member
reported to its own Optuna trial every epoch, pruned on its own, and recorded in Optuna and MLflow as a lone
trial would be.

Every trial ends recorded, whatever happens to it (`bstune.trials.State`):

    COMPLETE / PRUNED             as Optuna has them
    DIVERGED (NaN, inf, blow-up)  Optuna PRUNED, so the samplers learn the region is bad
    OOM, FAILED (any other error) Optuna FAIL, with the reason; the study goes on (a group that runs out of
                                  memory is split in two and each half run again first)
    INTERRUPTED (Ctrl-C, SIGTERM) Optuna FAIL, re-queued: the next run of the same command re-runs it
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from bstune import entry, signals
from bstune.errors import redact
from bstune.search._optuna import PruneRound, frozen, set_user_attrs, trial_id
from bstune.search.own_loop import run_own
from bstune.search.progress import Progress
from bstune.search.space import Hyperparams
from bstune.search.status import worker_id
from bstune.spec import StudySpec, Workload
from bstune.tracking import EPOCH_METRICS, Tracker
from bstune.train import (
    Dataset,
    Diverged,
    EpochStats,
    MemberResult,
    OutOfMemory,
    TrainConfig,
    plan,
    train,
    train_config,
    train_fused,
)
from bstune.trials import Attr, EpochPoint, State, curve_to_json


class TrialTakenAway(Exception):
    """Another worker failed this worker's trial (its heartbeat had gone stale: the machine stalled, or the
    storage was out of reach) and queued it again: it is dropped here without a word to Optuna."""


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a trial's exact point to run again (after an interruption or a lost worker)."""
    study.enqueue_trial(dict(trial.params), user_attrs={Attr.RETRY_OF: trial.number})


def interrupt_unstarted(study: optuna.Study, trial: optuna.Trial, requeue_it: bool) -> None:
    """Ctrl-C before a trial started training: recorded INTERRUPTED (re-queued once it has its point)."""
    trial.set_user_attr(Attr.STATE, State.INTERRUPTED)
    trial.set_user_attr(Attr.REASON, f"interrupted ({signals.what_stopped()}); re-queued")
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if requeue_it:
        requeue(study, frozen(trial))


def workload_params(w: Workload) -> dict[str, Any]:
    """The workload's settings as MLflow params, every one of them (so a new setting shows without an edit)."""
    return {k: ",".join(map(str, v)) if isinstance(v, tuple) else entry.name_of(v) if callable(v) else v
            for k, v in asdict(w).items()}


@dataclass
class TrialContext:
    """What every trial of a study shares."""

    spec: StudySpec
    data: Dataset  # on the device
    device: Any
    tracker: Tracker
    parent: str  # the study's MLflow run
    progress: Progress


def run_group(ctx: TrialContext, study: optuna.Study, trials: Sequence[optuna.Trial],
              points: Sequence[Hyperparams]) -> int:
    """Train the trials (all of one batch size) together and record each; how many were recorded here (a
    trial another worker took away is not). Ctrl-C records every unfinished one INTERRUPTED, re-queues it
    and propagates."""
    pruning = PruneRound(study)  # one for the group: its members' asks share a read of the study per epoch
    runs = [_TrialRun(ctx, study, t, p, len(trials), pruning) for t, p in zip(trials, points, strict=True)]
    try:
        for run in runs:
            run.guarded(run.start)
        _train_and_record(ctx, [r for r in runs if not r.ended])
        return sum(r.told for r in runs)
    except KeyboardInterrupt:
        for run in runs:
            if not run.ended:
                run.interrupt(f"interrupted ({signals.what_stopped()}); re-queued")
        raise


def _train_and_record(ctx: TrialContext, runs: list[_TrialRun]) -> None:
    if not runs:
        return
    if ctx.spec.workload.trainer is not None:  # the user's own training loop, one trial at a time
        for run in runs:
            run_own(run, ctx.spec.workload, ctx.device, run.epochs, ctx.data, run.trial.number)
        return
    configs = [r.config for r in runs]

    def on_epoch(i: int, stats: EpochStats) -> None:
        runs[i].on_epoch(stats)

    try:
        if len(runs) == 1:  # a lone trial trains as it always has
            results = [_train_one(configs[0], ctx, on_epoch)]
        else:
            results = train_fused(configs, ctx.data, ctx.device, on_epoch)
    except OutOfMemory as e:
        if len(runs) == 1:
            runs[0].end(State.OOM, f"out of memory at batch size {configs[0].batch_size}: {e}")
            return
        for half in (runs[: len(runs) // 2], runs[len(runs) // 2:]):  # a smaller group may fit
            for r in half:
                r.restart()
            _train_and_record(ctx, half)
        return
    for run, result in zip(runs, results, strict=True):
        run.record(result)


def _train_one(config: TrainConfig, ctx: TrialContext, on_epoch: Any) -> MemberResult:
    """A group of one: trained as it always has been, its ending in the form a fused member's takes."""
    history: list[EpochStats] = []

    def each(stats: EpochStats) -> None:
        history.append(stats)
        on_epoch(0, stats)

    try:
        train(config, ctx.data, ctx.device, each)
    except OutOfMemory:
        raise
    except Exception as e:  # noqa: BLE001 - divergence, pruning or a failure: recorded on the trial
        return MemberResult(0, history, e)
    return MemberResult(0, history, None)


class _TrialRun:
    """One trial while it runs: its MLflow run, its learning curve, its last numbers."""

    def __init__(self, ctx: TrialContext, study: optuna.Study, trial: optuna.Trial, point: Hyperparams,
                 group_size: int, pruning: PruneRound) -> None:
        self.ctx, self.study, self.trial, self.point = ctx, study, trial, point
        self.share = 1.0 / group_size  # of the group's wall time that is this trial's
        self.metric = ctx.spec.search.objective
        self.config = train_config(ctx.spec.workload, point.batch_size, point.lr, point.momentum)
        self.epochs = plan(self.config, ctx.data.n_train)[2]
        self.run_id: str | None = None
        self.pruning = pruning
        self.ended = False
        self.told = False  # Optuna was told how it ended, by this worker
        self.restart()

    def restart(self) -> None:
        """Forget the epochs seen (the group is trained again, smaller)."""
        self.curve: list[EpochPoint] = []
        self.last: dict[str, Any] = {}
        self.started = self.saved = time.perf_counter()

    def guarded(self, step: Any) -> None:
        """Run a step that writes to the trial; a trial another worker took away is dropped here."""
        try:
            step()
        except optuna.exceptions.UpdateFinishedTrialError:
            self._taken_away()

    def _taken_away(self) -> None:
        self.ended = True
        self.ctx.progress.note(f"trial {self.trial.number} was declared lost while this worker ran it (no "
                               "heartbeat in time); dropped here, it runs again")

    def start(self) -> None:
        """Open the trial's MLflow run and record the point and the run on the trial."""
        ctx, trial, p = self.ctx, self.trial, self.point
        n = ctx.data.n_train
        params = workload_params(ctx.spec.workload) | {
            "batch_size": p.batch_size, "lr": p.lr, "momentum": p.momentum, "epochs": self.epochs,
            "effective_lr": p.effective_lr, "noise_scale": p.lr * n / (p.batch_size * (1.0 - p.momentum)),
            "steps_per_epoch": plan(self.config, n)[0], "optuna_trial": trial.number, "n_train": n,
            "retry_of": trial.user_attrs.get(Attr.RETRY_OF),
        }
        self.run_id = ctx.tracker.start_trial(ctx.parent, ctx.spec.name, trial.number, trial_id(trial), params)
        set_user_attrs(trial, {Attr.LR: p.lr, Attr.MOMENTUM: p.momentum, Attr.EFFECTIVE_LR: p.effective_lr,
                               Attr.BATCH_SIZE: p.batch_size, Attr.WORKER_PID: os.getpid(), Attr.WORKER: worker_id(),
                               Attr.RUN_ID: self.run_id})
        ctx.progress.trial_started(trial.number, p)

    def on_epoch(self, s: EpochStats) -> None:
        """Log the epoch, report it to Optuna, and stop this trial if the pruner says so."""
        value = getattr(s, self.metric)
        metrics = {k: getattr(s, k) for k in EPOCH_METRICS}
        self.ctx.tracker.log_epoch(self.run_id, s.epoch, metrics | s.layer_metrics(), s.grad_histogram)
        self.curve.append(EpochPoint(s.epoch, value, s.optimizer_steps, s.examples_seen))
        self.last.update(metrics, value=value, examples_seen=s.examples_seen, train_seconds=s.train_seconds)
        if time.perf_counter() - self.saved > 5.0:  # spend is saved every few seconds, and at the end
            self.save_spend()
            self.saved = time.perf_counter()
        self.ctx.progress.epoch_done(self.trial.number, self.point, s.epoch, self.epochs, value)
        self.trial.report(value, s.epoch)
        if self.pruning.should_prune(self.trial, s.epoch):  # recorded at once: the group may train on a while
            reason = f"pruned at epoch {s.epoch} ({self.metric} {value:.4g})"
            self.end(State.PRUNED, reason)
            raise optuna.TrialPruned(reason)

    def record(self, result: MemberResult) -> None:
        """How the member's training ended, as this trial's state (a pruned one is recorded already)."""
        e = result.error
        if self.ended:
            return
        if e is None:
            self.end(State.COMPLETE, value=float(getattr(result.history[-1], self.metric)))
        elif isinstance(e, optuna.exceptions.UpdateFinishedTrialError):
            self._taken_away()
        elif isinstance(e, Diverged):
            self.charge_divergence(e)
            self.end(State.DIVERGED, str(e))
        else:
            self.end(State.FAILED, f"{type(e).__name__}: {e}")

    def charge_divergence(self, e: Diverged) -> None:
        """A run that diverged still spent compute: the steps it took (at least one) and its share of the time
        since it started, so a study whose trials all diverge still spends its examples and seconds."""
        b = self.point.batch_size
        self.last["examples_seen"] = max(self.last.get("examples_seen", 0), max(e.step, 1) * b)
        self.last["train_seconds"] = max(self.last.get("train_seconds", 0.0),
                                         (time.perf_counter() - self.started) * self.share)

    def end(self, state: State, reason: str = "", value: float | None = None) -> bool:
        """Record how the trial ended (on the Optuna trial, in its MLflow run, to the progress display) and tell
        Optuna: DIVERGED as PRUNED so the samplers learn the region is bad, failures as FAIL. False if the
        trial was no longer this worker's."""
        self.guarded(lambda: self._write_end(state, reason))
        if self.ended:
            return False
        self.ended = self.told = True
        if state == State.COMPLETE:
            self.study.tell(self.trial, value, skip_if_finished=True)
        elif state in (State.PRUNED, State.DIVERGED):
            self.study.tell(self.trial, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            self.study.tell(self.trial, state=TrialState.FAIL, skip_if_finished=True)
        return True

    def _write_end(self, state: State, reason: str) -> None:
        trial, last = self.trial, self.last
        reason = redact(reason)  # an error's text may quote a URL with its password
        attrs = self.spend() | {Attr.STATE: state, Attr.CURVE: curve_to_json(self.curve)}
        if reason:
            attrs[Attr.REASON] = reason
        if last.get("grad_noise_scale") is not None:
            attrs[Attr.GRAD_NOISE_SCALE] = last["grad_noise_scale"]
        set_user_attrs(trial, attrs)
        if self.run_id is not None:
            final = {f"final_{k}": last.get(k) for k in ("val_loss", "val_accuracy", "train_loss")}
            # one name for the objective across studies, and the time cost, for the UI's compare views
            final |= {"examples_seen": last.get("examples_seen"), "final_objective": last.get("value"),
                      "train_seconds": last.get("train_seconds")}
            self.ctx.tracker.end_trial(self.run_id, state, reason, final)
        self.ctx.progress.trial_finished(trial.number, self.point, state, last.get("value"),
                                         time.perf_counter() - self.started, reason)

    def interrupt(self, reason: str) -> None:
        """Ctrl-C: recorded as fully as the trial got, and its point queued to run again."""
        if self.end(State.INTERRUPTED, reason):
            requeue(self.study, frozen(self.trial))

    def spend(self) -> dict[str, Any]:
        """What the trial has spent so far, as its attributes (none before its first epoch)."""
        if "examples_seen" not in self.last:
            return {}
        return {Attr.EXAMPLES: self.last["examples_seen"], Attr.SECONDS: self.last["train_seconds"]}

    def save_spend(self) -> None:
        set_user_attrs(self.trial, self.spend())
