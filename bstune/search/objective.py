"""A trial's life, as Optuna's own `_run_trial` (optuna/study/_optimize.py) reads, for a group of trials of one
batch size trained together (fused):

    ask     the claim (`study._claim_group`) asks Optuna for the trials; each beats at once (`Heartbeats`)
    start   each trial's point written on it, its MLflow run opened                     `_TrialRun.start`
    train   the group trained; every epoch each member is logged and reported, and the pruner's decision
            returned to the trainer, which stops that member                          `_TrialRun.on_epoch`
    record  how each ended, decided in one place (`ending`), written in one order      `_TrialRun.end`

Every trial ends recorded, whatever happens to it (`bstune.trials.State`):

    COMPLETE / PRUNED             as Optuna has them
    DIVERGED (NaN, inf, blow-up)  Optuna PRUNED, so the samplers learn the region is bad
    OOM, FAILED (any other error) Optuna FAIL, with the reason; the study goes on (a group that runs out of
                                  memory is split in two and each half run again first)
    INTERRUPTED (Ctrl-C, SIGTERM) Optuna FAIL, re-queued: the next run of the same command re-runs it
    LOST (its worker died)        Optuna FAIL, by another worker's heartbeat check (`lost.py`); re-queued

A write that fails for a reason of the world (a store gone, a full disk) stops the study with one line
(`RecordFailed`); its trials in flight are then LOST and run again when it resumes, as after a SIGKILL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import optuna
from optuna.trial import TrialState

from bstune import entry, signals
from bstune.errors import BstuneError, first_line, redact
from bstune.run_spool import SpooledRuns
from bstune.search._optuna import PruneRound, frozen, report_values, set_user_attrs, tell, trial_id
from bstune.search.lost import Settler, requeue
from bstune.search.own_loop import run_own
from bstune.search.progress import Progress
from bstune.search.space import Hyperparams
from bstune.search.status import worker_id
from bstune.signals import kill_point
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
    train_config,
    train_fused,
)
from bstune.trials import TOLD_AS, Attr, EpochPoint, State, curve_to_json, trial_state


class RecordFailed(BstuneError):
    """A trial's record could not be written (a store went away, a disk is full): the study stops; its trials
    in flight are LOST and run again when it resumes."""


def interrupt_unstarted(study: optuna.Study, trial: optuna.Trial, requeue_it: bool, settler: Settler) -> None:
    """Ctrl-C before a trial started training: recorded INTERRUPTED (re-queued once it has its point), its MLflow
    run made and closed, in `_TrialRun.end`'s order."""
    reason = f"interrupted ({signals.what_stopped()}); re-queued"
    trial.set_user_attr(Attr.STATE, State.INTERRUPTED)
    trial.set_user_attr(Attr.REASON, reason)
    if requeue_it:
        requeue(study, frozen(trial))
    settler.settle_run(study, frozen(trial), State.INTERRUPTED, reason)
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


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
    tracker: Tracker | SpooledRuns  # of the trial runs
    parent: str  # the study's MLflow run
    progress: Progress


class Ending(NamedTuple):
    """How a trial ended: `_TrialRun.end(*ending)`."""

    state: State
    reason: str = ""
    value: float | None = None


def run_group(ctx: TrialContext, study: optuna.Study, trials: Sequence[optuna.Trial],
              points: Sequence[Hyperparams]) -> int:
    """Train the trials (all of one batch size, asked and beating) together and record each; how many this
    worker recorded (a trial another worker took away is not). Ctrl-C records every unfinished one
    INTERRUPTED, re-queues it and propagates."""
    pruning = PruneRound(study)  # one for the group: its members' asks share a read of the study per epoch
    runs = [_TrialRun(ctx, study, t, p, len(trials), pruning) for t, p in zip(trials, points, strict=True)]
    try:
        for run in runs:
            run.start()
        _train_and_record(ctx, [r for r in runs if not r.ended])
    except KeyboardInterrupt as e:
        for run in runs:
            if not run.ended:
                run.end(*ending(run, MemberResult(0, error=e)))
        raise
    return sum(r.told for r in runs)


def ending(run: _TrialRun, result: MemberResult) -> Ending:
    """How a trial ended, from how its training did: the one place every end state is decided."""
    e = result.error
    if isinstance(e, KeyboardInterrupt):
        return Ending(State.INTERRUPTED, f"interrupted ({signals.what_stopped()}); re-queued")
    if result.stopped:
        last = run.curve[-1]
        return Ending(State.PRUNED, f"pruned at epoch {last.epoch} ({run.metric} {last.value:.4g})")
    if e is None:
        return Ending(State.COMPLETE, value=float(getattr(result.history[-1], run.metric)))
    if isinstance(e, Diverged):
        run.charge_divergence(e)
        return Ending(State.DIVERGED, str(e))
    if isinstance(e, OutOfMemory):
        return Ending(State.OOM, f"out of memory at batch size {run.config.batch_size}: {e}")
    return Ending(State.FAILED, f"{type(e).__name__}: {e}")


def _train_and_record(ctx: TrialContext, runs: list[_TrialRun]) -> None:
    if not runs:
        return
    if ctx.spec.workload.trainer is not None:  # the user's own training loop, one trial at a time
        for run in runs:
            run_own(run, ctx.spec.workload, ctx.device, run.epochs, ctx.data, run.trial.number)
        return

    def on_epoch(i: int, stats: EpochStats) -> bool:
        return runs[i].on_epoch(stats)

    try:
        results = _train(ctx, [r.config for r in runs], on_epoch)
    except OutOfMemory as e:
        if len(runs) == 1:
            results = [MemberResult(0, error=e)]
        else:
            for half in (runs[: len(runs) // 2], runs[len(runs) // 2:]):  # a smaller group may fit
                for r in half:
                    r.restart()
                _train_and_record(ctx, half)
            return
    # pruned ones were recorded at their epoch; taken-away ones are another worker's. The group's runs are all
    # closed before the first commit waits for its run's id: a spooled run's writer then writes each run whole.
    closed = [(run, run.close(*ending(run, result))) for run, result in zip(runs, results, strict=True)
              if not run.ended]
    for run, e in closed:
        if e is not None and not run.ended:
            run.commit(e)


def _train(ctx: TrialContext, configs: list[TrainConfig], on_epoch: Callable[[int, EpochStats], bool]
           ) -> list[MemberResult]:
    """The group trained (a lone trial is a group of one). An error of the training itself (the model's, the
    data's) ends every member with it; the recording's (RecordFailed), running out of memory and Ctrl-C
    propagate."""
    try:
        return train_fused(configs, ctx.data, ctx.device, on_epoch)
    except (OutOfMemory, RecordFailed):
        raise
    except Exception as e:  # noqa: BLE001 - the training failed: each member FAILED with the reason
        return [MemberResult(i, error=e) for i in range(len(configs))]


STORAGE, TRACKING = "storage", "tracking_uri"


class _TrialRun:
    """One trial while it runs: its MLflow run, its learning curve, its last numbers."""

    def __init__(self, ctx: TrialContext, study: optuna.Study, trial: optuna.Trial, point: Hyperparams,
                 group_size: int, pruning: PruneRound) -> None:
        self.ctx, self.study, self.trial, self.point = ctx, study, trial, point
        self.share = 1.0 / group_size  # of the group's wall time that is this trial's
        self.metric = ctx.spec.search.objective
        self.config = train_config(ctx.spec.workload, point.batch_size, point.lr, point.momentum)
        self.epochs = plan(self.config, ctx.data.n_train)[2]
        self.run_id: Any = None  # what the tracker's start_trial returned (a run id, or a spooled run's handle)
        self.run_recorded = False  # its MLflow run id is on the trial
        self.pruning = pruning
        self.ended = False
        self.told = False  # Optuna was told how it ended, by this worker
        self.restart()

    def restart(self) -> None:
        """Forget the epochs seen (the group is trained again, smaller)."""
        self.curve: list[EpochPoint] = []
        self.reports: dict[int, float] = {}  # epochs for the pruner not yet written to the trial
        self.last: dict[str, Any] = {}
        self.started = self.saved = time.perf_counter()

    @contextmanager
    def _writing(self, store: str) -> Iterator[None]:
        """Around writes to one store: a trial another worker took away is dropped here (`ended`, not told);
        any other failure stops the study with one line naming the store."""
        try:
            yield
        except optuna.exceptions.UpdateFinishedTrialError:
            self._taken_away()
        except BstuneError:
            raise
        except Exception as e:  # noqa: BLE001 - a store gone, a full disk: the world's, said in one line
            url = self.ctx.spec.storage if store == STORAGE else self.ctx.spec.tracking_uri
            raise RecordFailed(f"{store}: cannot record trial {self.trial.number} in {redact(url)} "
                               f"({first_line(e)}); fix that and run the same command again: the trials in "
                               "flight then run again") from e

    def _taken_away(self) -> None:
        """Another worker failed this trial (its heartbeat had gone stale: the machine stalled, or the storage
        was out of reach) and settled it: dropped here, its MLflow run made to agree with what it decided."""
        self.ended = True
        if self.run_id is not None:  # this worker may have written the run after the other settled it
            t = frozen(self.trial)
            self.ctx.tracker.settle_trial(self.ctx.parent, self.ctx.spec.name, t.number, trial_id(t),
                                          trial_state(t), t.user_attrs.get(Attr.REASON, ""))
        self.ctx.progress.note(f"trial {self.trial.number} was declared lost while this worker ran it (no "
                               "heartbeat in time); dropped here, it runs again")

    def start(self) -> None:
        """Record the point and the worker on the trial (failing if it was taken away), then open its MLflow
        run and record the run on the trial."""
        ctx, trial, p = self.ctx, self.trial, self.point
        with self._writing(STORAGE):
            set_user_attrs(trial, {Attr.LR: p.lr, Attr.MOMENTUM: p.momentum, Attr.EFFECTIVE_LR: p.effective_lr,
                                   Attr.BATCH_SIZE: p.batch_size, Attr.WORKER_PID: os.getpid(),
                                   Attr.WORKER: worker_id()})
        kill_point("point")
        if self.ended:
            return
        n = ctx.data.n_train
        params = workload_params(ctx.spec.workload) | {
            "batch_size": p.batch_size, "lr": p.lr, "momentum": p.momentum, "epochs": self.epochs,
            "effective_lr": p.effective_lr, "noise_scale": p.lr * n / (p.batch_size * (1.0 - p.momentum)),
            "steps_per_epoch": plan(self.config, n)[0], "optuna_trial": trial.number, "n_train": n,
            "retry_of": trial.user_attrs.get(Attr.RETRY_OF),
        }
        with self._writing(TRACKING):
            self.run_id = ctx.tracker.start_trial(ctx.parent, ctx.spec.name, trial.number, trial_id(trial), params)
        kill_point("run_started")
        with self._writing(STORAGE):
            if recorded := self._run_recorded():  # a spooled run's id comes later (`on_epoch`, `end`)
                set_user_attrs(trial, recorded)
        kill_point("run_recorded")
        if not self.ended:
            ctx.progress.trial_started(trial.number, p)

    def on_epoch(self, s: EpochStats) -> bool:
        """Log the epoch, report it to Optuna; whether the trial stops here: pruned (recorded at once, as the
        group may train on a while), or taken away by another worker."""
        value = getattr(s, self.metric)
        metrics = {k: getattr(s, k) for k in EPOCH_METRICS}
        with self._writing(TRACKING):
            self.ctx.tracker.log_epoch(self.run_id, s.epoch, metrics | s.layer_metrics(), s.grad_histogram)
        self.curve.append(EpochPoint(s.epoch, value, s.optimizer_steps, s.examples_seen))
        self.last.update(metrics, value=value, examples_seen=s.examples_seen, train_seconds=s.train_seconds)
        self.ctx.progress.epoch_done(self.trial.number, self.point, s.epoch, self.epochs, value)
        with self._writing(STORAGE):
            if time.perf_counter() - self.saved > 5.0:  # spend is saved every few seconds, and at the end
                set_user_attrs(self.trial, self.spend())
                self.saved = time.perf_counter()
            if recorded := self._run_recorded():  # a spooled run: its id once its writer has made it
                set_user_attrs(self.trial, recorded)
            prune = False
            if self.pruning.reads_reports:  # for the pruner alone (the curve is kept apart)
                self.reports[s.epoch] = value
                if s.epoch >= self.pruning.from_epoch:  # those before its warm-up written with this one
                    self._report()
                    prune = self.pruning.should_prune(self.trial, s.epoch)
        kill_point("epoch")
        if self.ended:
            return True
        if prune:
            self.end(*ending(self, MemberResult(0, stopped=True)))
        return prune

    def charge_divergence(self, e: Diverged) -> None:
        """A run that diverged still spent compute: the steps it took (at least one) and its share of the time
        since it started, so a study whose trials all diverge still spends its examples and seconds."""
        b = self.point.batch_size
        self.last["examples_seen"] = max(self.last.get("examples_seen", 0), max(e.step, 1) * b)
        self.last["train_seconds"] = max(self.last.get("train_seconds", 0.0),
                                         (time.perf_counter() - self.started) * self.share)

    def end(self, state: State, reason: str = "", value: float | None = None) -> None:
        """Record how the trial ended: `close`, then `commit`."""
        if (e := self.close(state, reason, value)) is not None:
            self.commit(e)

    def close(self, state: State, reason: str = "", value: float | None = None) -> Ending | None:
        """Record how the trial ended but for the commit (`commit`), in the order that keeps a kill at any instant
        safe (docs/scale-out.md); the ending to commit (None: the trial was taken away meanwhile):
        1. on the trial: bstune.state, reason, spend, curve. Optuna has it RUNNING, beating; killed from here
           to 4, it goes stale and is settled (`lost.py`) as `trials.trial_state` decides;
        2. an INTERRUPTED trial's point queued again (once, whoever does it);
        3. its MLflow run closed with the same state (made first if the trial stopped before making it)."""
        trial, last, e = self.trial, self.last, Ending(state, redact(reason), value)  # an error may quote a password
        attrs = self.spend() | {Attr.STATE: e.state, Attr.CURVE: curve_to_json(self.curve)}
        attrs |= self._run_recorded()
        if e.reason:
            attrs[Attr.REASON] = e.reason
        if last.get("grad_noise_scale") is not None:
            attrs[Attr.GRAD_NOISE_SCALE] = last["grad_noise_scale"]
        with self._writing(STORAGE):
            self._report()  # a trial that ends before its pruner's warm-up: its reports, as Optuna tells them
            set_user_attrs(trial, attrs)
            if e.state == State.INTERRUPTED:
                requeue(self.study, frozen(trial))
        kill_point("end_state")
        if self.ended:
            return None
        if self.run_id is not None:
            final = {f"final_{k}": last.get(k) for k in ("val_loss", "val_accuracy", "train_loss")}
            # one name for the objective across studies, and the time cost, for the UI's compare views
            final |= {"examples_seen": last.get("examples_seen"), "final_objective": last.get("value"),
                      "train_seconds": last.get("train_seconds")}
            with self._writing(TRACKING):
                self.ctx.tracker.end_trial(self.run_id, e.state, e.reason, final)
        else:  # Ctrl-C as its group started
            with self._writing(TRACKING):
                self.ctx.tracker.settle_trial(self.ctx.parent, self.ctx.spec.name, trial.number, trial_id(trial),
                                              e.state, e.reason)
        kill_point("end_run")
        return e

    def commit(self, e: Ending) -> None:
        """4. Its run's id on the trial, if a spooled run's writer made the run only once it saw 3 (it writes a
        short trial's run whole); Optuna told (DIVERGED as PRUNED, so the samplers learn the region is bad;
        failures as FAIL): the commit, after which it counts and all three agree."""
        trial = self.trial
        recorded = self._run_recorded(wait=True)  # a spooled run's writer is then never more than a group behind
        with self._writing(STORAGE):
            if recorded:
                set_user_attrs(trial, recorded)
            state = TrialState[TOLD_AS[e.state]]
            told = tell(self.study, trial, e.value if state == TrialState.COMPLETE else None, state)
            if told != state:  # another worker failed it first (the state it had ended with is returned)
                raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} is {told.name}")
        kill_point("told")
        if self.ended:
            return
        self.ended = self.told = True
        self.ctx.progress.trial_finished(trial.number, self.point, e.state, self.last.get("value"),
                                         time.perf_counter() - self.started, e.reason)

    def _report(self) -> None:
        if self.reports:
            report_values(self.trial, self.reports)
            self.reports = {}

    def _run_recorded(self, wait: bool = False) -> dict[str, Any]:
        """The MLflow run id as an attribute to write now, if it is known (with `wait`, once it is) and not yet
        written; else nothing."""
        if self.run_recorded or self.run_id is None:
            return {}
        run_id = self.ctx.tracker.run_id(self.run_id, wait)
        if run_id is None:
            return {}
        self.run_recorded = True
        return {Attr.RUN_ID: run_id}

    def spend(self) -> dict[str, Any]:
        """What the trial has spent so far, as its attributes (none before its first epoch)."""
        if "examples_seen" not in self.last:
            return {}
        return {Attr.EXAMPLES: self.last["examples_seen"], Attr.SECONDS: self.last["train_seconds"]}
