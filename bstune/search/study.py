"""Running a study: the Optuna study, its trials as real training runs, and their MLflow runs.

`run_study(spec)` checks everything that can be wrong before it creates anything (the data set loads, the
storage and tracking store answer, a resumed study matches its spec), then asks Optuna for trials until the
budget is spent. Each group of trials claimed is trained and recorded by `objective.run_group`; a trial
whose worker died is failed by the heartbeat check (`_optuna.StaleTrials`) and settled by `lost.Settler`:
marked LOST, its MLflow run closed, its point re-queued.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optuna
import yaml
from optuna.study import StudyDirection
from optuna.trial import TrialState

from bstune import registry, signals
from bstune.errors import BstuneError, first_line, redact
from bstune.run_spool import SpooledRuns, spool_folder
from bstune.search._beats import Heartbeats, StaleTrials
from bstune.search._optuna import OneReadStorage, ask, one_read
from bstune.search.checks import check_input
from bstune.search.claim import ClaimLock
from bstune.search.lost import Settler, lost_marks
from bstune.search.objective import TrialContext, interrupt_unstarted, run_group, workload_params
from bstune.search.progress import Progress, SilentProgress
from bstune.search.space import BatchSizeSampler, Hyperparams, SearchSpace, make_pruner, make_sampler
from bstune.search.status import WorkerBeat
from bstune.signals import kill_point
from bstune.spec import StudySpec
from bstune.stores import check_storage, creating, grace_seconds, load_study, make_default_folder, open_storage
from bstune.tracking import RUN_FINISHED, RUN_KILLED, Tracker, check_tracking_uri, tracking_errors
from bstune.train import Dataset, pick_device, plan, preload_compiler, train_config
from bstune.train.check import fusable
from bstune.trials import Spent, StudyAttr, TrialTable, exhausted, from_study, summarize, tally

# Spec fields that define what a study measures: a resumed study must not change them.
_FIXED_FIELDS = ("workload", "search.batch_sizes", "search.lr", "search.momentum", "search.objective")
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM); run the same command again to resume"
# Workload fields that change only what is observed (the updates are the same either way): free on resume.
_OBSERVING_FIELDS = ("diagnostics_every", "grad_histogram_epochs")


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


def _check_same_spec(study: optuna.Study, spec: StudySpec) -> None:
    stored = study.user_attrs.get(StudyAttr.SPEC)
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


@dataclass
class OpenStudy:
    """A study ready for trials: the Optuna study, its MLflow side and the data its trials train on."""

    spec: StudySpec
    study: optuna.Study
    tracker: Tracker
    parent_run_id: str
    data: Dataset
    space: SearchSpace
    settler: Settler


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
    check_storage(spec.storage)  # each store is what it should be (and sound, writable) before either is written
    check_tracking_uri(spec.tracking_uri)
    # a worker joins: the study must be there, and nothing is created
    existing = load_study(spec.storage, spec.name, source=spec.source or "SPEC") if join else None
    for url in (spec.storage, spec.tracking_uri):
        make_default_folder(url)
    tracker = Tracker(spec.tracking_uri, spec.experiment)

    # 2. The Optuna study and the MLflow parent run (created, or found again on resume).
    space = SearchSpace(spec.search)

    # settles the trials of workers that died, and applies the MLflow writes they spooled (`run_spool`)
    settler = Settler(tracker, progress, spool_folder(spec.tracking_uri, spec.experiment, spec.name))
    with creating(spec.storage, spec.tracking_uri):  # two studies started at once: one creates the stores
        tracker.check()
        storage = open_storage(spec.storage, spec.heartbeat_seconds, settler, writing=True)
        if isinstance(storage, optuna.storages.RDBStorage):  # a journal holds every trial in memory already
            storage = OneReadStorage(storage)
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
        pruner=make_pruner(spec.search, epochs_at, data.num_classes),
    )
    # Rewritten on resume too: the fixed fields are checked equal above, and the budget may have been raised.
    study.set_user_attr(StudyAttr.SPEC, _public_spec(spec))
    if existing is None:
        study.set_user_attr(StudyAttr.N_TRAIN, data.n_train)
    if join:
        parent = study.user_attrs[StudyAttr.PARENT_RUN]
    else:
        with signals.held():  # a run made and not recorded in the study would be left RUNNING
            parent = _open_parent_run(spec, study, tracker, data, progress)
    settler.parent = parent
    settler.sweep(study)  # whatever a killed worker, or an older bstune, left half-settled
    return OpenStudy(spec, study, tracker, parent, data, space, settler)


def _open_parent_run(spec: StudySpec, study: optuna.Study, tracker: Tracker, data: Dataset,
                     progress: Progress) -> str:
    """The study's MLflow parent run: created with the spec and its params, or reopened on resume."""
    spec_yaml = yaml.safe_dump(_public_spec(spec), sort_keys=False)
    recorded = study.user_attrs.get(StudyAttr.PARENT_RUN)
    key = f"{redact(spec.storage)}#{study._study_id}".replace("'", "")
    parent = tracker.open_study_run(spec.name, recorded, _study_params(spec, data), spec_yaml, key)
    kill_point("parent_run")
    if recorded != parent:
        if recorded:
            n = sum(t.state != optuna.trial.TrialState.WAITING for t in study.get_trials(deepcopy=False))
            progress.note(f"warning: the study's MLflow parent run {recorded} is not in {redact(spec.tracking_uri)} "
                          f"(the tracking store was deleted or replaced): a new parent run is made; the {n} trials "
                          "run before it are in the Optuna storage only, not in MLflow")
        study.set_user_attr(StudyAttr.PARENT_RUN, parent)
    return parent


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

    Trials of one batch size are trained several at a time as one stacked model: the spec's execution.fuse
    of them, else `default_fuse` for the device and model. Several workers (processes, machines) may
    run one study: `worker` (distinct per worker) seeds the samplers apart, and `join` makes this one a worker
    of a study another process started (`open_study`)."""
    with stores_failing(spec):
        return _run_study(spec, device, progress or SilentProgress(), data, worker, join)


@contextmanager
def stores_failing(spec: StudySpec) -> Iterator[None]:
    """A store that fails mid-study (gone, full, read-only) ends the command with one line naming the stores and
    the cause (exit 2), not a traceback; the study resumes once that is fixed, re-running the trials in flight."""
    import sqlalchemy

    try:
        yield
    except BstuneError:
        raise
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, OSError,
            *tracking_errors()) as e:
        raise BstuneError(f"storage {redact(spec.storage)} or tracking_uri {redact(spec.tracking_uri)} failed "
                          f"mid-study ({first_line(e)}); fix that (free space, restart the database), then run "
                          "the same command again: the study resumes") from None


def _run_study(spec: StudySpec, device: str | None, progress: Progress, data: Dataset | None, worker: int,
               join: bool) -> StudyResult:
    dev = pick_device(device)
    if spec.workload.compile != "off" or spec.workload.trainer is not None:
        preload_compiler()
    opened = open_study(spec, progress=progress, data=data, worker=worker, join=join)
    study = opened.study
    group_size = _group_size(spec, dev.type, opened.data, progress)
    claim: ClaimLock | None = None
    runs = None
    interrupted = False
    stop_reason = ""
    run = 0
    try:  # from here on the parent run exists: whatever stops the study, finish_study closes it
        claim = ClaimLock(spec.storage, spec.name)
        # on the device once for the whole study, not once per trial
        runs = trial_runs(opened)
        ctx = TrialContext(spec, opened.data.to(dev), dev, runs, opened.parent_run_id, progress)
        stale = StaleTrials(grace_seconds(spec.heartbeat_seconds), lost_marks)
        with WorkerBeat(study, worker, str(dev), spec.heartbeat_seconds), Heartbeats(study) as beats:
            while True:
                # Held from the budget check until the new trials have their batch size and first heartbeat: so
                # workers never claim the same free, re-queued or lost trial twice, the trial limit holds
                # exactly, and a trial is never RUNNING unseen by the stale-trial check.
                claim.acquire()
                try:
                    stop_reason, asked = _claim_group(opened, group_size, progress, beats, stale)
                finally:
                    claim.release()
                if stop_reason:
                    break
                if not asked:
                    # Trials are running elsewhere (or their worker died): wait until they finish, or the
                    # heartbeat check fails and re-queues them, so no trial is lost or left RUNNING.
                    time.sleep(min(spec.heartbeat_seconds, 5))
                    continue
                try:
                    for trials, points in _by_batch_size(asked):
                        run += run_group(ctx, study, trials, points)
                finally:
                    beats.drop([t for t, _ in asked])
    except KeyboardInterrupt:
        interrupted = True
        stop_reason = INTERRUPTED
    finally:
        if claim is not None:
            claim.close()
        if runs is not None:
            runs.close()  # every trial run this worker spooled is in MLflow
    return finish_study(opened, stop_reason, interrupted=interrupted, trials_run=run, close=not join)


def trial_runs(opened: OpenStudy) -> Tracker | SpooledRuns:
    """Who writes the trial runs: with a SQLite tracking store, a writer process fed by a spool file, off the
    trainer's critical path (`bstune.run_spool`); with others (a server, PostgreSQL), the tracker itself."""
    folder = opened.settler.spools
    return opened.tracker if folder is None else SpooledRuns(folder, opened.tracker)


def default_fuse(device_type: str, model: str) -> int:
    """How many trials of one batch size train together by default: as many as keep the device busy without
    slowing each member (measured in benchmarks/FUSED.md; `registry`)."""
    return registry.default_fuse(device_type, model)


def _group_size(spec: StudySpec, device_type: str, data: Dataset, progress: Progress) -> int:
    """Trials trained together: execution.fuse, else the default; one for a trainer of one's own, and for a
    model that cannot be fused (the study says why)."""
    if spec.workload.trainer is not None:
        return 1
    size = spec.execution.fuse or default_fuse(device_type, spec.workload.model)
    if size > 1 and not registry.is_builtin_model(spec.workload.model):
        why = fusable(spec.workload, data, device_type, asked=spec.execution.fuse is not None)
        if why is not None:
            progress.note(f"trials run one at a time: {why}")
            return 1
    return size


def _claim_group(opened: OpenStudy, group_size: int, progress: Progress, beats: Heartbeats,
                 stale: StaleTrials) -> tuple[str, list[tuple[optuna.Trial, Hyperparams]]]:
    """Under the claim lock: why the study must stop (then no trials), or the trials to run next, at most
    `group_size` and never past the trial limit (none while only trials running elsewhere are left)."""
    spec, study = opened.spec, opened.study
    opened.settler.repair_spools(study)  # dead workers' MLflow writes applied before any of their trials is settled
    stale.fail(study)  # trials of dead workers: failed, settled, re-queued
    trials = study.get_trials(deepcopy=False)
    opened.settler.sweep_unqueued(study, trials)
    spent = tally(trials)
    values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    progress.budget_spent(spent, (max if study.direction == StudyDirection.MAXIMIZE else min)(values, default=None))
    stop_reason = exhausted(spec.budget, spent) or ""
    if stop_reason and not spent.running:
        return stop_reason, []
    if stop_reason or exhausted(spec.budget, spent, in_flight=spent.running):
        return "", []
    sampler = study.sampler
    assert isinstance(sampler, BatchSizeSampler)
    batch_size, has = sampler.least_covered(study, trials)
    k = min(group_size, _fits_budget(opened, spent, batch_size, has))
    return "", _ask_group(study, opened.space, batch_size, k, beats, opened.settler) if k else []


def _fits_budget(opened: OpenStudy, spent: Spent, batch_size: int, has: int) -> int:
    """How many trials at `batch_size` the budget left has room for (0: none until the trials running now
    end): never past the trial limit nor the batch size's share of it, and no more than the examples or seconds
    left will pay for, counting what the trials running now will spend (a trial's examples are known in
    advance; its seconds are estimated from the trials so far, so the first group is of one)."""
    budget, n = opened.spec.budget, opened.data.n_train
    k = math.inf
    if budget.trials is not None:
        # at most half a batch size's share at once: its later trials are then proposed knowing how the first
        # ones ended (a group's members are all proposed before any has trained)
        share = math.ceil(budget.trials / len(opened.space.batch_sizes))
        k = min(k, budget.trials - spent.trials - spent.running, max(1, min(share - has, math.ceil(share / 2))))
    if budget.examples is not None and n:  # n = 0: a trainer of one's own, its examples known as it reports
        per_epoch, total, _ = plan(train_config(opened.spec.workload, batch_size, 1.0, 0.0), n)
        per_trial = total * n / per_epoch
        k = min(k, math.ceil((budget.examples - spent.examples) / per_trial - spent.running))
    if budget.seconds is not None:
        if not spent.trials:
            k = min(k, 0 if spent.running else 1)
        else:
            per_trial = max(spent.seconds / spent.trials, 1e-9)
            k = min(k, math.ceil((budget.seconds - spent.seconds) / per_trial - spent.running))
    return max(0, int(min(k, 1 << 30)))


def _ask_group(study: optuna.Study, space: SearchSpace, batch_size: int, k: int, beats: Heartbeats,
               settler: Settler) -> list[tuple[optuna.Trial, Hyperparams]]:
    """Ask Optuna for `k` trials at `batch_size` (re-queued trials come first and keep their own batch size),
    each beating from its ask on. Ctrl-C meanwhile leaves no trial unrecorded."""
    asked: list[tuple[optuna.Trial, Hyperparams | None]] = []
    sampler = study.sampler
    assert isinstance(sampler, BatchSizeSampler)
    sampler.pin(batch_size)
    try:
        for _ in range(k):
            with one_read(study):  # the ask's queue look-up and its sampler read the trials once
                trial = ask(study)
                asked.append((trial, None))
                kill_point("asked")
                beats.add(trial)
                kill_point("beat")
                asked[-1] = (trial, space.suggest(trial))
            kill_point("suggested")
    except KeyboardInterrupt:
        for trial, point in asked:
            interrupt_unstarted(study, trial, requeue_it=point is not None, settler=settler)
        raise
    finally:
        sampler.pin(None)
    return asked  # type: ignore[return-value]


def _by_batch_size(asked: list[tuple[optuna.Trial, Hyperparams]]) -> list[tuple[list[optuna.Trial], list[Hyperparams]]]:
    groups: dict[int, tuple[list[optuna.Trial], list[Hyperparams]]] = {}
    for trial, point in asked:
        trials, points = groups.setdefault(point.batch_size, ([], []))
        trials.append(trial)
        points.append(point)
    return list(groups.values())


def finish_study(opened: OpenStudy, stop_reason: str, *, interrupted: bool = False, trials_run: int = 0,
                 close: bool = True, status: str | None = None) -> StudyResult:
    """The study's result now. With `close`, its summary goes to the MLflow parent run, which is closed with
    `status` (default: KILLED if interrupted, else FINISHED)."""
    opened.settler.sweep(opened.study)  # MLflow runs a worker killed after telling Optuna left RUNNING
    table = from_study(opened.study, n_train=opened.data.n_train)
    spent = tally(opened.study.get_trials(deepcopy=False))
    summary = summarize(table, spent, stop_reason)
    if close:
        opened.tracker.close_study_run(opened.parent_run_id, summary,
                                       status=status or (RUN_KILLED if interrupted else RUN_FINISHED))
    return StudyResult(opened.spec.name, table, spent, stop_reason, opened.parent_run_id, interrupted,
                       trials_run, summary)


def _public_spec(spec: StudySpec) -> dict[str, Any]:
    """The spec as stored in the study and logged to MLflow: URLs without their passwords."""
    d = spec.to_dict()
    for key in ("storage", "tracking_uri"):
        d[key] = redact(d[key])
    return d


def _study_params(spec: StudySpec, data: Dataset) -> dict[str, Any]:
    return workload_params(spec.workload) | {
        "n_train": data.n_train, "batch_sizes": ",".join(map(str, spec.search.batch_sizes)),
        "lr_range": f"{spec.search.lr[0]:g}..{spec.search.lr[1]:g}",
        "momentum_range": f"{spec.search.momentum[0]:g}..{spec.search.momentum[1]:g}",
        "sampler": spec.search.sampler.name, "pruner": spec.search.pruner.name,
        "objective": spec.search.objective, "budget_trials": spec.budget.trials,
        "budget_examples": spec.budget.examples, "budget_seconds": spec.budget.seconds,
    }
