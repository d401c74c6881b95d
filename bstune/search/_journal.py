"""Optuna's JournalStorage (its file backend) with what bstune needs of a storage on one machine: heartbeats,
a lock the kernel frees when its holder dies, and a log that a process killed mid-write does not corrupt.

Optuna 5.1's `JournalStorage` implements no `BaseHeartbeat`: `JournalHeartbeatStorage` adds it. A trial's
beat is its system attribute `bstune:heartbeat` (seconds since the epoch, this machine's clock: the journal
is a file on one machine, so every worker reads the same clock); stale = RUNNING with a beat older than the
grace period, as Optuna's `RDBStorage._get_stale_trial_ids` has it.

Optuna's file locks (a symlink, or a file opened O_EXCL) outlive a SIGKILLed holder: the others wait out
their grace period (30 s) and then break it. `FlockLock` is an `fcntl.flock` on a file beside the journal,
released by the kernel with its holder's process.

A process killed in the middle of an append leaves a line with no newline at the end of the journal. Optuna's
reader skips such a last line; but the next append would be written after it, and the merged line fails to
parse: that operation would be lost and every later read raise. `SoundFileBackend` cuts a torn last line off
under the lock before appending (its writer is dead, and its operation was never acknowledged).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.storages.journal._file import BaseJournalFileLock
from optuna.storages.journal._storage import UNUPDATABLE_MSG, JournalOperation
from optuna.trial import FrozenTrial, TrialState

BEAT = "bstune:heartbeat"
LOCK_SUFFIX = ".flock"


class FlockLock(BaseJournalFileLock):
    """An exclusive `flock` on `<journal>.flock`: blocking, and freed by the kernel when the holder dies."""

    def __init__(self, journal_path: str) -> None:
        self._path = journal_path + LOCK_SUFFIX
        self._fd: int | None = None
        self._threads = threading.Lock()  # flock excludes open files, not the threads sharing one

    def acquire(self) -> bool:
        self._threads.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        return True

    def release(self) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


class SoundFileBackend(JournalFileBackend):
    """Optuna's file backend under a `FlockLock`, cutting a torn last line off before it appends, and
    appending each batch of operations with one `write` (no fsync: a killed process loses nothing written,
    a power cut may lose the last operations, as the SQLite store's write-ahead log without sync does)."""

    def __init__(self, file_path: str, fsync: bool = False) -> None:
        super().__init__(file_path, FlockLock(file_path))
        self._fsync = fsync

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
        self._lock.acquire()
        try:
            fd = os.open(self._file_path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            try:
                cut_torn_tail(fd)
                while data:
                    data = data[os.write(fd, data):]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            self._lock.release()


def cut_torn_tail(fd: int) -> int:
    """Truncate the file to its last newline if it does not end with one (call under the lock); the bytes cut."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    end = size
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            end = start + nl + 1
            break
        end = start
    os.ftruncate(fd, end)
    return size - end


class JournalHeartbeatStorage(JournalStorage, BaseHeartbeat):
    """JournalStorage with Optuna's heartbeat API: `record_heartbeat` writes the trial's beat, and
    `_get_stale_trial_ids` finds the RUNNING trials whose beat is older than the grace period."""

    def __init__(self, backend: Any, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 failed_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        super().__init__(backend)
        self._interval = heartbeat_interval
        self._grace = grace_period if grace_period is not None else 2 * (heartbeat_interval or 0)
        self._callback = failed_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        """The trial's beat, appended without reading the journal first. Under a worker id of its own: a beat
        that lands after the trial ended (another worker failed it) is skipped on replay, as RDBStorage's
        beat is written whatever the trial's state, instead of raising in this process."""
        log = {"op_code": JournalOperation.SET_TRIAL_SYSTEM_ATTR, "worker_id": self._replay_result.worker_id + ":beat",
               "trial_id": trial_id, "system_attr": {BEAT: time.time()}}
        with self._thread_lock:
            self._backend.append_logs([log])

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if BEAT in t.system_attrs and now - t.system_attrs[BEAT] > self._grace]

    def get_heartbeat_interval(self) -> int | None:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._callback

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Several user attributes in one append (`_optuna.set_trial_user_attrs`)."""
        self._append_to_trial(trial_id, [(JournalOperation.SET_TRIAL_USER_ATTR, {"user_attr": {k: v}})
                                         for k, v in attrs.items()])

    def set_trial_intermediate_values(self, trial_id: int, values: dict[int, float]) -> None:
        """Several reports in one append (`_optuna.report_values`)."""
        self._append_to_trial(trial_id, [(JournalOperation.SET_TRIAL_INTERMEDIATE_VALUE,
                                          {"step": step, "intermediate_value": v}) for step, v in values.items()])

    def _append_to_trial(self, trial_id: int, ops: list[tuple[int, dict[str, Any]]]) -> None:
        """Operations on one unfinished trial in one append. UpdateFinishedTrialError if it has ended; one that
        another process ends between this check and the append drops them, as it would a single write of
        another worker's: they are written under a worker id of their own, so that replaying them never
        raises in a later, unrelated call of this process (Optuna raises on its own worker's operations)."""
        if not ops:
            return
        with self._thread_lock:
            self._sync_with_backend()
            trial = self._replay_result.get_trial(trial_id)
            if trial.state.is_finished():
                raise UpdateFinishedTrialError(UNUPDATABLE_MSG.format(trial_number=trial.number))
            worker = self._replay_result.worker_id + ":batch"
            self._backend.append_logs([{"op_code": op, "worker_id": worker, "trial_id": trial_id, **fields}
                                       for op, fields in ops])
            self._sync_with_backend()

    def heartbeat_ages(self, study_id: int) -> dict[int, float]:
        """Seconds since each RUNNING trial's last beat, by trial id (a trial with none is absent)."""
        now = time.time()
        return {t._trial_id: now - t.system_attrs[BEAT]
                for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if BEAT in t.system_attrs}

    def running_without_heartbeat(self, study_id: int) -> list[int]:
        return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if BEAT not in t.system_attrs]


def open_journal(path: str, heartbeat_seconds: int | None = None, on_lost: Any = None,
                 grace_seconds: int | None = None, fsync: bool = False) -> JournalHeartbeatStorage:
    """The journal at `path` (created if absent), with heartbeats every `heartbeat_seconds` if given."""
    return JournalHeartbeatStorage(SoundFileBackend(path, fsync), heartbeat_seconds, grace_seconds, on_lost)
