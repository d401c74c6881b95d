"""Running a study: the Optuna study, its trials as real training runs, and their MLflow runs.

`run_study(spec)` checks everything that can be wrong before it creates anything (the data set loads, the
storage and tracking store answer, a resumed study matches its spec), then asks Optuna for trials until the
budget is spent. Every trial ends recorded, whatever happens to it:

    COMPLETE / PRUNED             as Optuna has them
    DIVERGED (NaN, inf, blow-up)  Optuna PRUNED, so the samplers learn the region is bad
    OOM, FAILED (any other error) Optuna FAIL, with the reason; the study goes on
    INTERRUPTED (Ctrl-C)          Optuna FAIL, re-queued: the next run of the same command re-runs it
    LOST (worker killed)          failed by Optuna's heartbeat check, its MLflow run closed, re-queued
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
import yaml
from optuna.trial import FrozenTrial

from bstune.claim import ClaimLock
from bstune.data import Dataset, load_dataset
from bstune.diagnostics import HISTOGRAM_ARTIFACT_DIR
from bstune.errors import BstuneError, redact
from bstune.space import BATCH_SIZE, Config, SearchSpace, make_pruner, make_sampler
from bstune.spec import StudySpec, Workload
from bstune.status import WorkerBeat, worker_id
from bstune.stores import check_storage, grace_seconds, load_study, open_storage
from bstune.tracking import EPOCH_METRICS, Tracker
from bstune.train import Diverged, EpochStats, OutOfMemory, TrainConfig, pick_device, plan, train
from bstune.trials import EpochPoint, Spent, TrialTable, curve_to_json, exhausted, from_study, summarize, tally

log = logging.getLogger("bstune")

# Spec fields that define what a study measures: a resumed study must not change them.
_FIXED_FIELDS = ("workload", "search.batch_sizes", "search.lr", "search.momentum", "search.objective")
INTERRUPTED = "interrupted (Ctrl-C); run the same command again to resume"
# Workload fields that change only what is observed (the updates are the same either way): free on resume.
_OBSERVING_FIELDS = ("diagnostics_every", "grad_histogram_epochs")


class Progress(Protocol):
    def trial_started(self, number: int, config: Config) -> None: ...
    def epoch_done(self, number: int, config: Config, epoch: int, epochs: int, value: float) -> None: ...
    def trial_finished(self, number: int, config: Config, state: str, value: float | None, seconds: float,
                       reason: str) -> None: ...
    def note(self, text: str) -> None: ...


class SilentProgress:
    def trial_started(self, number: int, config: Config) -> None:
        pass

    def epoch_done(self, number: int, config: Config, epoch: int, epochs: int, value: float) -> None:
        pass

    def trial_finished(self, number: int, config: Config, state: str, value: float | None, seconds: float,
                       reason: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass
class StudyResult:
    study_name: str
    table: TrialTable
    spent: Spent
    stop_reason: str
    parent_run_id: str
    interrupted: bool = False
    trials_run: int = 0  # by this call
    summary: dict[str, Any] = field(default_factory=dict)


class _TrialFailed(Exception):
    """Raised out of the objective so Optuna records FAIL (OOM, FAILED) while the study goes on."""


class _TrialTakenAway(BaseException):
    """Another worker failed this worker's trial (its heartbeat had gone stale: the machine stalled, or the
    storage was out of reach) and queued it again. The trial is dropped without a word to Optuna, whose
    tell fails on a finished trial: a BaseException, so Optuna's handlers let it through."""


def _check_same_spec(study: optuna.Study, spec: StudySpec) -> None:
    stored = study.user_attrs.get("bstune.spec")
    if not stored:
        return
    current = spec.to_dict()
    for path in _FIXED_FIELDS:
        a, b = _get(stored, path), _get(current, path)
        if path == "workload":
            a, b = ({k: v for k, v in d.items() if k not in _OBSERVING_FIELDS} for d in (a, b))
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                path, a, b = f"{path}.{key}", a.get(key), b.get(key)
            raise BstuneError(
                f"{spec.source}: {path}: study {spec.name!r} already exists with {path} = {a!r}, the spec now "
                f"says {b!r}; give the study a new name, or restore the old value to resume it")


def _get(d: dict, path: str) -> Any:
    for part in path.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


# --------------------------------------------------------------------------------------------------
# The study


def check_input(spec: StudySpec, data: Dataset | None = None) -> Dataset:
    """Fail with one line if the spec's data or batch sizes cannot be trained on; returns the data (loaded
    unless given). Creates nothing."""
    if data is None:
        check_batch_sizes(spec, None)  # before a long load
        try:
            data = load_dataset(spec.workload)
        except BstuneError as e:
            raise BstuneError(f"{_where(spec)}{e}") from None
    check_batch_sizes(spec, data.n_train)
    return data


def check_batch_sizes(spec: StudySpec, n_train: int | None) -> None:
    """Fail with one line if a batch size cannot be trained on: not divisible by the accumulation steps, or
    (``n_train`` given) larger than the training set."""
    sizes, accumulation = spec.search.batch_sizes, spec.workload.accumulation_steps
    if accumulation > 1 and (bad := [b for b in sizes if b % accumulation]):
        raise BstuneError(f"{_where(spec)}search.batch_sizes: {bad} not divisible by "
                          f"workload.accumulation_steps ({accumulation})")
    if n_train is not None and (bad := [b for b in sizes if b > n_train]):
        # Such a batch is the whole training set: each of them would run the same full-batch training.
        raise BstuneError(f"{_where(spec)}search.batch_sizes: {bad} larger than the training set ({n_train} "
                          f"examples of {spec.workload.dataset}); drop them, or use at most {n_train}")


def _where(spec: StudySpec) -> str:
    return f"{spec.source}: " if spec.source else ""


@dataclass
class OpenStudy:
    """A study ready for trials: the Optuna study, its MLflow side and the data its trials train on."""

    spec: StudySpec
    study: optuna.Study
    tracker: Tracker
    parent_run_id: str
    data: Dataset
    space: SearchSpace


def open_study(
    spec: StudySpec,
    *,
    progress: Progress | None = None,
    data: Dataset | None = None,
    worker: int = 0,
    join: bool = False,
) -> OpenStudy:
    """Check everything that can be wrong, then create the study and its MLflow parent run (or find them
    again, on resume). With `join` (a worker joining others) the study must exist and its parent run is left
    as it is: the process that started the study created and closes it."""
    progress = progress or SilentProgress()
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    # 1. Everything that can be wrong with the input, before anything is created.
    data = check_input(spec, data)
    check_storage(spec.storage)
    # a worker joins: the study must be there, and nothing is created
    existing = load_study(spec.storage, spec.name, source=spec.source or "SPEC") if join else None
    tracker = Tracker(spec.tracking_uri, spec.experiment)
    tracker.check()

    # 2. The Optuna study and the MLflow parent run (created, or found again on resume).
    space = SearchSpace(spec.search)

    def on_lost(study: optuna.Study, trial: FrozenTrial) -> None:
        reason = "worker stopped sending heartbeats (killed or lost) during the trial; re-queued"
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            tracker.close_if_running(run_id, "LOST", reason)
        _requeue(study, trial)
        progress.note(f"trial {trial.number} was lost with its worker; re-queued")

    storage = open_storage(spec.storage, spec.heartbeat_seconds, on_lost)
    if not join:
        try:
            existing = optuna.load_study(study_name=spec.name, storage=storage)
        except KeyError:
            existing = None
    if existing is not None:
        _check_same_spec(existing, spec)

    def epochs_at(batch_size: int) -> int:  # with hold: steps, a run's epochs depend on its batch size
        return plan(train_config(spec.workload, batch_size, 1.0, 0.0), data.n_train)[2]

    study = optuna.create_study(
        study_name=spec.name, storage=storage, direction=spec.search.direction, load_if_exists=True,
        sampler=make_sampler(spec.search, space, seed_offset=worker * 1000 + len(existing.trials if existing else [])),
        pruner=make_pruner(spec.search, epochs_at),
    )
    # Rewritten on resume too: the fixed fields are checked equal above, and the budget may have been raised.
    study.set_user_attr("bstune.spec", _public_spec(spec))
    if existing is None:
        study.set_user_attr("bstune.n_train", data.n_train)
    if join:
        parent = study.user_attrs["mlflow_parent_run_id"]
    else:
        spec_yaml = yaml.safe_dump(_public_spec(spec), sort_keys=False)
        parent = tracker.open_study_run(spec.name, study.user_attrs.get("mlflow_parent_run_id"),
                                        _study_params(spec, data), spec_yaml)
        if study.user_attrs.get("mlflow_parent_run_id") != parent:
            study.set_user_attr("mlflow_parent_run_id", parent)
    return OpenStudy(spec, study, tracker, parent, data, space)


def run_study(
    spec: StudySpec,
    *,
    device: str | None = None,
    progress: Progress | None = None,
    data: Dataset | None = None,
    worker: int = 0,
    join: bool = False,
) -> StudyResult:
    """Run (or resume) the study until its budget is spent. Ctrl-C returns with `interrupted=True`.

    Several workers (processes, machines) may run one study: `worker` (distinct per worker) seeds the
    samplers apart, and `join` makes this one a worker of a study another process started (`open_study`)."""
    progress = progress or SilentProgress()
    dev = pick_device(device)
    opened = open_study(spec, progress=progress, data=data, worker=worker, join=join)
    study = opened.study
    claim = ClaimLock(spec.storage, spec.name)
    # on the device once for the whole study, not once per trial
    objective = _Objective(spec, opened.space, opened.data.to(dev), dev, opened.tracker, opened.parent_run_id, progress,
                           claimed=claim.release)
    interrupted = False
    stop_reason = ""
    run = 0
    try:
        with WorkerBeat(study, worker, str(dev), spec.heartbeat_seconds):
            while True:
                # Held from the budget check until the new trial has its batch size (the objective releases
                # it): so workers never claim the same free trial, re-queued trial or lost trial twice.
                claim.acquire()
                try:
                    optuna.storages.fail_stale_trials(study)
                    spent = tally(study.get_trials(deepcopy=False))
                    stop_reason = exhausted(spec.budget, spent) or ""
                    if stop_reason and not spent.running:
                        break
                    if stop_reason or exhausted(spec.budget, spent, in_flight=spent.running):
                        # Trials are running elsewhere (or their worker died): wait until they finish, or the
                        # heartbeat check fails and re-queues them, so no trial is lost or left RUNNING.
                        claim.release()
                        time.sleep(min(spec.heartbeat_seconds, 5))
                        continue
                    try:
                        study.optimize(objective, n_trials=1, catch=(_TrialFailed,), gc_after_trial=False)
                        run += 1
                    except _TrialTakenAway as e:
                        progress.note(f"trial {e} was declared lost while this worker ran it (no heartbeat for "
                                      f"{grace_seconds(spec.heartbeat_seconds)}s); dropped here, it runs again")
                finally:
                    claim.release()
    except KeyboardInterrupt:
        interrupted = True
        stop_reason = INTERRUPTED
    finally:
        claim.close()
    return finish_study(opened, stop_reason, interrupted=interrupted, trials_run=run, close=not join)


def finish_study(opened: OpenStudy, stop_reason: str, *, interrupted: bool = False, trials_run: int = 0,
                 close: bool = True, status: str | None = None) -> StudyResult:
    """The study's result now. With `close`, its summary goes to the MLflow parent run, which is closed with
    `status` (default: KILLED if interrupted, else FINISHED)."""
    table = from_study(opened.study, n_train=opened.data.n_train)
    spent = tally(opened.study.get_trials(deepcopy=False))
    summary = summarize(table, spent, stop_reason)
    if close:
        opened.tracker.close_study_run(opened.parent_run_id, summary,
                                       status=status or ("KILLED" if interrupted else "FINISHED"))
    return StudyResult(opened.spec.name, table, spent, stop_reason, opened.parent_run_id, interrupted,
                       trials_run, summary)


def _public_spec(spec: StudySpec) -> dict[str, Any]:
    """The spec as stored in the study and logged to MLflow: URLs without their passwords."""
    d = spec.to_dict()
    for key in ("storage", "tracking_uri"):
        d[key] = redact(d[key])
    return d


def _study_params(spec: StudySpec, data: Dataset) -> dict[str, Any]:
    w = spec.workload
    return {
        "dataset": w.dataset, "model": w.model, "optimizer": w.optimizer, "epochs": w.epochs, "hold": w.hold,
        "lr_schedule": w.lr_schedule, "weight_decay": w.weight_decay, "seed": w.seed, "n_train": data.n_train,
        "accumulation_steps": w.accumulation_steps, "batch_sizes": ",".join(map(str, spec.search.batch_sizes)),
        "lr_range": f"{spec.search.lr[0]:g}..{spec.search.lr[1]:g}",
        "momentum_range": f"{spec.search.momentum[0]:g}..{spec.search.momentum[1]:g}",
        "sampler": spec.search.sampler.name, "pruner": spec.search.pruner.name,
        "objective": spec.search.objective, "budget_trials": spec.budget.trials,
        "budget_examples": spec.budget.examples, "budget_seconds": spec.budget.seconds,
    }


def train_config(w: Workload, batch_size: int, lr: float, momentum: float, seed: int | None = None) -> TrainConfig:
    """The training run of one trial: the workload's settings at (batch_size, lr, momentum); ``seed``
    replaces the workload's."""
    return TrainConfig(
        batch_size=batch_size, lr=lr, momentum=momentum, optimizer=w.optimizer, epochs=w.epochs,
        steps=w.steps if w.hold == "steps" else None, lr_schedule=w.lr_schedule, warmup_epochs=w.warmup_epochs,
        weight_decay=w.weight_decay, accumulation_steps=w.accumulation_steps, seed=w.seed if seed is None else seed,
        model=w.model, width=w.width, compile=w.compile, diagnostics_every=w.diagnostics_every,
        grad_histogram_epochs=w.grad_histogram_epochs,
    )


def _requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a trial's exact config to run again (after an interruption or a lost worker)."""
    study.enqueue_trial(dict(trial.params), user_attrs={"bstune.retry_of": trial.number})


class _Objective:
    """One trial: pick a config, train it, report every epoch, record how it ended."""

    def __init__(self, spec: StudySpec, space: SearchSpace, data: Dataset, device: Any, tracker: Tracker,
                 parent: str, progress: Progress, claimed: Callable[[], None]) -> None:
        self.spec, self.space, self.data, self.device = spec, space, data, device
        self.tracker, self.parent, self.progress = tracker, parent, progress
        self.claimed = claimed  # called once the trial exists and has its batch size

    def __call__(self, trial: optuna.Trial) -> float:
        self._finish: Callable[[str, str], None] | None = None  # set by _run as the trial takes shape
        self._run_id: str | None = None
        try:
            return self._run(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise _TrialTakenAway(trial.number) from None
        except KeyboardInterrupt:
            # Ctrl-C anywhere in the trial, in training or not (picking its config, MLflow's start or end
            # of its run): recorded INTERRUPTED, its MLflow run closed, its config queued to run again
            reason = "interrupted by the user (Ctrl-C); re-queued"
            if self._finish is not None:
                self._finish("INTERRUPTED", reason)
            else:
                trial.set_user_attr("bstune.state", "INTERRUPTED")
                trial.set_user_attr("bstune.reason", reason)
                if self._run_id is not None:
                    self.tracker.close_if_running(self._run_id, "INTERRUPTED", reason)
            if BATCH_SIZE in trial.params:  # before it has one there is nothing to re-run
                _requeue(trial.study, trial.study._storage.get_trial(trial._trial_id))
            raise

    def _run(self, trial: optuna.Trial) -> float:
        spec, w = self.spec, self.spec.workload
        cfg = self.space.suggest(trial)
        self.claimed()
        n = self.data.n_train
        tc = train_config(w, cfg.batch_size, cfg.lr, cfg.momentum)
        per_epoch, _, epochs = plan(tc, n)
        for k, v in (("lr", cfg.lr), ("momentum", cfg.momentum), ("effective_lr", cfg.effective_lr),
                     ("batch_size", cfg.batch_size), ("worker_pid", os.getpid()), ("bstune.worker", worker_id())):
            trial.set_user_attr(k, v)
        params = {
            "batch_size": cfg.batch_size, "lr": cfg.lr, "momentum": cfg.momentum, "optimizer": w.optimizer,
            "epochs": epochs, "accumulation_steps": w.accumulation_steps, "dataset": w.dataset,
            "model": w.model, "seed": w.seed, "effective_lr": cfg.effective_lr,
            "noise_scale": cfg.lr * n / (cfg.batch_size * (1.0 - cfg.momentum)),
            "steps_per_epoch": per_epoch, "hold": w.hold, "steps": w.steps,
            "lr_schedule": w.lr_schedule, "weight_decay": w.weight_decay, "optuna_trial": trial.number,
        }
        if "bstune.retry_of" in trial.user_attrs:
            params["retry_of"] = trial.user_attrs["bstune.retry_of"]
        run_id = self.tracker.start_trial(self.parent, spec.name, trial.number, trial._trial_id, params)
        trial.set_user_attr("mlflow_run_id", run_id)
        self._run_id = run_id
        self.progress.trial_started(trial.number, cfg)

        curve: list[EpochPoint] = []
        last: dict[str, Any] = {}
        t0 = time.perf_counter()
        saved = [t0]

        def on_epoch(s: EpochStats) -> None:
            value = getattr(s, spec.search.objective)
            metrics = {k: getattr(s, k) for k in EPOCH_METRICS}
            self.tracker.log_epoch(run_id, s.epoch, metrics | s.layer_metrics())
            if s.grad_histogram is not None:
                self.tracker.log_json(run_id, s.grad_histogram, f"{HISTOGRAM_ARTIFACT_DIR}/epoch_{s.epoch:04d}.json")
            curve.append(EpochPoint(s.epoch, value, s.optimizer_steps, s.examples_seen))
            last.update(metrics, value=value)
            last.update(examples_seen=s.examples_seen, train_seconds=s.train_seconds)
            if time.perf_counter() - saved[0] > 5.0:  # spend is saved every few seconds, and at the end
                self._save_spend(trial, last)
                saved[0] = time.perf_counter()
            self.progress.epoch_done(trial.number, cfg, s.epoch, epochs, value)
            trial.report(value, s.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {s.epoch} ({spec.search.objective} {value:.4g})")

        def finish(state: str, reason: str = "") -> None:
            reason = redact(reason)  # an error's text may quote a URL with its password
            self._save_spend(trial, last)
            trial.set_user_attr("bstune.state", state)
            if reason:
                trial.set_user_attr("bstune.reason", reason)
            trial.set_user_attr("curve", curve_to_json(curve))
            if last.get("grad_noise_scale") is not None:
                trial.set_user_attr("grad_noise_scale", last["grad_noise_scale"])
            final = {f"final_{k}": last.get(k) for k in ("val_loss", "val_accuracy", "train_loss")}
            final["examples_seen"] = last.get("examples_seen")
            # one name for the objective across studies, and the time cost, for the UI's compare views
            final["final_objective"] = last.get("value")
            final["train_seconds"] = last.get("train_seconds")
            self.tracker.end_trial(run_id, state, reason, final)
            self.progress.trial_finished(trial.number, cfg, state, last.get("value"),
                                         time.perf_counter() - t0, reason)

        self._finish = finish
        try:
            history = train(tc, self.data, self.device, on_epoch)
        except optuna.TrialPruned as e:
            finish("PRUNED", str(e))
            raise
        except Diverged as e:
            finish("DIVERGED", str(e))
            raise optuna.TrialPruned(str(e)) from None
        except OutOfMemory as e:
            finish("OOM", f"out of memory at batch size {cfg.batch_size}: {e}")
            raise _TrialFailed(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a trial's failure must not end the study
            finish("FAILED", f"{type(e).__name__}: {e}")
            raise _TrialFailed(str(e)) from None
        finish("COMPLETE")
        return float(getattr(history[-1], spec.search.objective))

    @staticmethod
    def _save_spend(trial: optuna.Trial, last: dict[str, Any]) -> None:
        if "examples_seen" in last:
            trial.set_user_attr("examples_seen", last["examples_seen"])
            trial.set_user_attr("train_seconds", last["train_seconds"])
