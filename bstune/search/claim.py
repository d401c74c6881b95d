"""The claim lock: makes "is there budget left? then take a trial" one step across all workers of a study.

Without it two workers can both see the last free trial and both start one (the trial limit overshoots),
and on SQLite two workers can both pop the same re-queued trial, or both fail and re-queue the same lost
trial: pysqlite reads before it takes the write lock, so Optuna's SELECT ... FOR UPDATE protects nothing
there. A worker holds the lock from the budget check until its new trial exists and has its batch size.

- SQLite or a journal (one machine): an exclusive flock on a file beside it (`optuna.db.lock`,
  `optuna.journal.claim-lock`).
- PostgreSQL (several machines): a session advisory lock. The server frees it when the holder's
  connection ends, and this session's TCP keep-alives make that happen within ~30 s of a power loss.
- Any other storage: no lock; the trial limit may then overshoot by the trials claimed at the same moment.

A worker that dies holding the lock frees it with its process (the kernel closes the file and the socket).
"""

from __future__ import annotations

import fcntl
import hashlib
import time
from typing import Any

import sqlalchemy
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from bstune.stores import file_store, journal_path

_POLL_SECONDS = 0.05  # polling, not blocking, so Ctrl-C and a parent's death always get through


class ClaimLock:
    """acquire() / release() (idempotent) around claiming a trial; close() when the worker stops."""

    def __init__(self, storage_url: str, study_name: str) -> None:
        self._url = storage_url
        self._held = False
        self._file: Any = None
        self._conn: Any = None
        self._key = int.from_bytes(hashlib.blake2b(f"bstune.claim:{study_name}".encode(), digest_size=8).digest(),
                                   "big", signed=True)
        db = file_store(storage_url)
        # a journal's own name.lock is Optuna's symlink lock, which a tool opening the journal with Optuna's
        # backend would create (and, after its grace period, break): the claim lock is named apart
        suffix = ".claim-lock" if journal_path(storage_url) is not None else ".lock"
        self._path = None if db is None or str(db) in ("", ":memory:") else db.with_name(db.name + suffix)
        self._postgres = storage_url.startswith("postgresql")

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for the lock (at most `timeout` seconds, if given); True once it is held."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._held:
            if self._try():
                self._held = True
            elif end is not None and time.monotonic() >= end:
                return False
            else:
                time.sleep(_POLL_SECONDS)
        return True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        elif self._conn is not None:
            try:
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            except DBAPIError:  # the session is gone, and its lock with it
                self._disconnect()

    def close(self) -> None:
        self.release()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._disconnect()

    def _try(self) -> bool:
        if self._path is not None:
            if self._file is None:
                self._file = open(self._path, "a")  # held open for the worker's life
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
        if self._postgres:
            if self._conn is None:
                self._conn = _connect(self._url)
            try:
                return bool(self._conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"),
                                               {"k": self._key}).scalar())
            except DBAPIError:  # the session was lost (server restart, network): a new one on the next try
                self._disconnect()
                return False
        return True

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn.engine.dispose()
                self._conn = None


def _connect(url: str) -> Any:
    engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    for setting in ("tcp_keepalives_idle = 10", "tcp_keepalives_interval = 5", "tcp_keepalives_count = 3"):
        conn.execute(sqlalchemy.text(f"SET {setting}"))
    return conn
