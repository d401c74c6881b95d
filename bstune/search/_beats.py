"""Trials' heartbeats: each trial this worker runs beats from a thread (`Heartbeats`), and the trials of dead
workers are found and failed (`StaleTrials`), on any storage with Optuna's heartbeat API: an RDB storage, or
bstune's journal (`bstune.search._journal`), whose beats are trial system attributes.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from bstune.search._optuna import rdb_of, set_trial_user_attrs
from bstune.signals import kill_point


class Heartbeats:
    """Context manager: the heartbeat of each trial this worker claims, from its ask until it lets it go. The
    first beat is written at once, in the claim (`add`); then one thread beats for all of them every interval
    (as `optimize` does for its one trial), so a worker that dies at any point after the first beat has every
    trial of its group found stale and re-queued. Before the first beat, see `StaleTrials`."""

    def __init__(self, study: optuna.Study) -> None:
        self._storage = study._storage
        self._interval = self._storage.get_heartbeat_interval() or 0
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bstune-trial-beats", daemon=True)

    def __enter__(self) -> Heartbeats:
        if self._interval:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def add(self, trial: optuna.Trial) -> None:
        """The trial's first beat, now (a storage error propagates: the trial is then left to `StaleTrials`)."""
        if self._interval:
            self._storage.record_heartbeat(trial._trial_id)
        with self._lock:
            self._ids.add(trial._trial_id)

    def drop(self, trials: Sequence[optuna.Trial]) -> None:
        with self._lock:
            self._ids.difference_update(t._trial_id for t in trials)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = sorted(self._ids)
            for trial_id in ids:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a missed beat: the next may pass; if none does, the trial goes stale
                    pass


class StaleTrials:
    """Fails the RUNNING trials whose worker is gone, then runs the storage's stale-trial callback on each:
    those whose heartbeat is older than the grace period (Optuna's check), and those with no heartbeat at all
    (asked by a worker that died before its first beat), which Optuna's check never looks at: failed once this
    process has seen them without a beat for the grace period (their start time is another machine's clock).
    `mark(trial)` gives attributes written on each before it is failed (while it may still be written), so
    that they say what it ends as."""

    def __init__(self, grace_seconds: float, mark: Callable[[FrozenTrial], dict[str, Any]]) -> None:
        self._grace, self._mark = grace_seconds, mark
        self._unbeaten: dict[int, float] = {}  # trial id -> when first seen RUNNING without a heartbeat

    def fail(self, study: optuna.Study) -> None:
        storage = study._storage
        stale = storage._get_stale_trial_ids(study._study_id) if storage.get_heartbeat_interval() else []
        now = time.monotonic()
        self._unbeaten = {i: self._unbeaten.get(i, now) for i in running_without_heartbeat(study)}
        stale += [i for i, seen in self._unbeaten.items() if now - seen > self._grace]
        callback = storage.get_heartbeat_stale_trial_callback()
        for trial_id in stale:
            self._unbeaten.pop(trial_id, None)
            try:
                set_trial_user_attrs(storage, trial_id, self._mark(storage.get_trial(trial_id)))
                if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:  # it ended meanwhile, or another worker failed it
                continue
            kill_point("stale_failed")
            if callback is not None:
                callback(study, copy.deepcopy(storage.get_trial(trial_id)))


def running_without_heartbeat(study: optuna.Study) -> list[int]:
    """Ids of the study's RUNNING trials that have no heartbeat row."""
    rdb = rdb_of(study)
    if rdb is None:
        reads = getattr(study._storage, "running_without_heartbeat", None)  # the journal's
        return reads(study._study_id) if reads else []
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session) as session:
        rows = (session.query(models.TrialModel.trial_id)
                .outerjoin(models.TrialHeartbeatModel,
                           models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                .filter(models.TrialModel.study_id == study._study_id,
                        models.TrialModel.state == TrialState.RUNNING,
                        models.TrialHeartbeatModel.trial_heartbeat_id.is_(None))
                .all())
    return [r[0] for r in rows]


def heartbeat_ages(study: optuna.Study) -> dict[int, float]:
    """Seconds since each RUNNING trial's last heartbeat, by trial id, on the database's clock (the one the
    beats are written with); a trial with no heartbeat is absent. Reads only."""
    rdb = rdb_of(study)
    if rdb is None:
        reads = getattr(study._storage, "heartbeat_ages", None)  # the journal's
        return reads(study._study_id) if reads else {}
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session) as session:
        now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
        rows = (session.query(models.TrialHeartbeatModel.trial_id, models.TrialHeartbeatModel.heartbeat)
                .join(models.TrialModel, models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                .filter(models.TrialModel.study_id == study._study_id,
                        models.TrialModel.state == TrialState.RUNNING)
                .all())
    return {trial_id: (now - beat.replace(tzinfo=None)).total_seconds() for trial_id, beat in rows}
