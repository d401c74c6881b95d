"""The trial runs' MLflow writes off the trainer's critical path: a spool file on disk and a writer process.

With a SQLite tracking store (one machine: the embedded default), a study's trainer does not write its trials'
MLflow runs itself (each run costs tens of ms of ORM work, which holds the GIL: a thread gains nothing). It
appends each write as one JSON line to its own spool file beside the store (`mlflow.db.spool/`), a few
microseconds, and a writer process (`python -m bstune.run_spool`) applies the lines to MLflow in order.

Why nothing is lost, whoever is killed (the full argument: docs/scale-out.md, "The trial runs' writer"):

- a line is in the spool (the page cache) once `write` returns: a SIGKILL of the trainer keeps it;
- whoever applies a spool (its writer, or a repair) holds the spool's apply lock, applies its lines strictly in
  order from the position recorded in `<spool>.pos`, and records the new position only after the lines' writes
  are in MLflow; a kill in between leaves the last batch to be applied again, and applying a line twice changes
  nothing (a run is looked up by its trial's tag before one is made, a metric logged twice with its timestamp
  is kept once, tags and a run's status are set to the same values);
- the trainer holds its spool's owner lock while it lives: a spool whose owner lock is free belongs to a dead
  process, and is repaired (`repair_orphans`: applied to its end, then each ended trial named in it settled by
  the caller, so a late line cannot leave its run disagreeing with Optuna) before any trial is settled;
- the trainer restarts its writer if it dies, and at the end of the study waits until its spool is applied (or
  applies the rest itself): a study's runs are all in MLflow when it returns.

The trainer never waits on a writer that is still starting (importing MLflow takes it a second or more of CPU):
until its writer says it is ready, the trainer applies its spool itself, under the same apply lock, where it
needs a run's id (at a trial's end). It starts the writer only once that has cost it `START_SECONDS`, about what
the writer's start costs: a short study (the test suite's) never pays for a second process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from bstune.stores import sqlite_path

POLL_SECONDS = 0.005  # how often the writer looks for new lines, and the trainer for a run id it waits for
CLOSE_SECONDS = 120.0  # how long the trainer waits for its writer to apply the spool at the end of a study
START_SECONDS = 1.0  # the trainer's own applying, in all, after which it starts a writer process
RUNS_LOCK = "runs.lock"  # in a study's spool folder: held while a trial run is made or a trial settled
READY = b"ready"  # what the writer says once it can apply (MLflow imported, its store open)


def spool_folder(tracking_uri: str, experiment: str, study_name: str) -> Path | None:
    """Where a study's spools live: beside its SQLite tracking store, one folder per study (its repairs touch
    only its own runs); None for other stores (written directly)."""
    db = sqlite_path(tracking_uri)
    if db is None or str(db) in ("", ":memory:"):
        return None
    key = hashlib.blake2b(f"{experiment}\0{study_name}".encode(), digest_size=6).hexdigest()
    return db.with_name(db.name + ".spool") / key


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` (made if missing); yields False if not blocking and it is held elsewhere."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def _positions(pos: Path) -> tuple[int, int]:
    """(applied up to, being applied up to) from a spool's .pos file."""
    try:
        done, applying = pos.read_text().split()
        return int(done), int(applying)
    except (FileNotFoundError, ValueError):
        return 0, 0


def _record(pos: Path, done: int, applying: int) -> None:
    tmp = pos.with_name(pos.name + ".tmp")
    tmp.write_text(f"{done} {applying}")
    os.replace(tmp, pos)


def apply_pending(log: Path, tracker: Any, run_ids: dict[int, str], fresh: bool,
                  on_start: Callable[[int, str], None] | None = None,
                  defer: Callable[[list[dict[str, Any]]], bool] | None = None) -> tuple[int, bool]:
    """Apply the spool's complete lines not yet applied, under its apply lock; (lines applied, whether its
    owner closed it). `run_ids` (trial id -> run id) is what this applier made; `fresh`: nothing of this spool
    may have been applied past the recorded position by another applier (else every run is looked up first);
    `defer(lines)`: leave them for a later call, all together."""
    pos = log.with_suffix(".pos")
    with _locked(log.with_suffix(".lock")):
        if not log.exists():
            return 0, True
        done, applying = _positions(pos)
        with open(log, "rb") as f:
            f.seek(done)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]  # a line still being written is left for later
        if not data:
            return 0, False
        end = done + len(data)
        lines = _parsed(data.splitlines())
        if defer is not None and defer(lines):  # nothing applied: nothing to record
            return 0, False
        _record(pos, done, end)
        closed = _apply(lines, tracker, run_ids, look_up=not fresh or applying > done, on_start=on_start,
                        folder=log.parent)
        _record(pos, end, end)
        return len(lines), closed


def _apply(lines: list[dict], tracker: Any, run_ids: dict[int, str], look_up: bool,
           on_start: Callable[[int, str], None] | None, folder: Path) -> bool:
    """Apply lines in order; a run's writes are gathered by the tracker and written at its end, or below."""
    closed = False
    for r in lines:
        op, tid = r["op"], r.get("trial_id")
        if op == "close":
            closed = True
        elif op == "settle":
            tracker.flush_all()
            settle_trial(folder, tracker, r["parent"], r["study"], r["number"], tid, r["state"], r["reason"])
            run_ids.pop(tid, None)
        elif op == "start":
            with _locked(folder / RUNS_LOCK):  # a settle elsewhere makes its run before this looks, or finds this
                found = tracker.trial_runs(r["parent"], tid) if look_up or _settled(folder, tid).exists() else []
                if found:  # made by an applier killed before its params were written, or by a settle
                    run_ids[tid] = found[0].info.run_id
                    tracker.log_params(run_ids[tid], r["params"])
                else:
                    run_ids[tid] = tracker.start_trial(r["parent"], r["study"], r["number"], tid, r["params"])
            if on_start is not None:
                on_start(tid, run_ids[tid])
        else:
            run_id = run_ids.get(tid) or _look_up(tracker, r["parent"], tid)
            if run_id is None:  # its start was never spooled (it cannot be): nothing to write to
                continue
            run_ids[tid] = run_id
            if op == "epoch":
                tracker.log_epoch(run_id, r["epoch"], r["values"], r["histogram"], ts=r["ts"])
            elif op == "end":
                tracker.end_trial(run_id, r["state"], r["reason"], r["final"], ts=r["ts"])
    tracker.flush_all()  # what the lines wrote is in MLflow before their position is recorded
    return closed


def settle_trial(folder: Path | None, tracker: Any, parent_id: str, study_name: str, number: int, trial_id: int,
                 state: str, reason: str) -> None:
    """`tracker.settle_trial` (a trial's run made to agree with how it ended, made if missing), such that a
    writer applying the trial's start later uses that run rather than make a second one: where the trial runs
    are spooled (`folder`), the trial is marked settled and settled under the study's run lock, which a writer
    holds while it looks for marks and makes runs (a live worker's start may wait seconds in its spool)."""
    if folder is None:
        tracker.settle_trial(parent_id, study_name, number, trial_id, state, reason)
        return
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / RUNS_LOCK):
        _settled(folder, trial_id).touch()  # first: a settle killed after making its run leaves the mark
        tracker.settle_trial(parent_id, study_name, number, trial_id, state, reason)


def _settled(folder: Path, trial_id: int) -> Path:
    return folder / f"{trial_id}.settled"


def _look_up(tracker: Any, parent: str, trial_id: int) -> str | None:
    found = tracker.trial_runs(parent, trial_id)
    return found[0].info.run_id if found else None


def remove(log: Path) -> None:
    for path in (log, log.with_suffix(".pos"), log.with_suffix(".lock"), log.with_suffix(".err")):
        path.unlink(missing_ok=True)


def _parsed(lines: Iterable[bytes]) -> list[dict[str, Any]]:
    """A spool's lines as records; one cut short by a full disk (then joined to the next) is skipped: its trial
    stopped with that write's error, is RUNNING, and is settled as a lost one."""
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def ended_trials(log: Path) -> set[int]:
    """The trials that have an end in a spool (read whole: done once per dead process's spool)."""
    with open(log, "rb") as f:
        return {r["trial_id"] for r in _parsed(f) if r["op"] in ("end", "settle")}


def repair_orphans(folder: Path | None, tracker: Any) -> set[int]:
    """Apply the spools of dead processes (their owner lock free) to their end and remove them; the ids of the
    trials with an end in them, which the caller settles in MLflow as Optuna has them (a writer's late line
    may have closed a run its trial then did not end as)."""
    ended: set[int] = set()
    if folder is None or not folder.is_dir():
        return ended
    for log in sorted(folder.glob("*.log")):
        with _locked(log, blocking=False) as orphan:
            if not orphan or not log.exists():
                continue
            apply_pending(log, tracker, {}, fresh=False)
            ended |= ended_trials(log)
            remove(log)
    return ended


class SpooledRuns:
    """The trainer's side: the Tracker's trial-run calls, each spooled as one line (handles are trial ids).
    `close()` at the end of the study: waits until the spool is applied, then removes it."""

    def __init__(self, folder: Path, tracker: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.tracker, self.folder = tracker, folder
        self.log = folder / f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}.log"
        self._owner = open(self.log, "ab", buffering=0)
        fcntl.flock(self._owner, fcntl.LOCK_EX)  # held for this process's life: the spool is not an orphan
        self._run_ids: dict[int, str] = {}
        self._writer: subprocess.Popen | None = None
        self._ready = False  # the writer has said READY
        self._said = b""  # what the writer has said (READY, then trial id, run id lines), not yet read whole
        self._parent = ""
        self.start_after = START_SECONDS
        self._applied_here = 0.0  # seconds this process spent applying its own spool
        self._made: dict[int, str] = {}  # the runs applied here: trial id -> run id

    def _spool(self, record: dict[str, Any]) -> None:
        line = memoryview((json.dumps(record, default=str) + "\n").encode())
        while line:  # one write, but a full disk may take part of it first
            line = line[self._owner.write(line):]
        self._restart_if_died()

    def _restart_if_died(self) -> None:
        if self._writer is not None and self._writer.poll() is not None:
            self._start_writer()

    def _start_writer(self) -> None:
        """Start the writer; one that was killed (by a signal) is started again, its spool intact. One that failed
        (the store's error, in its .err file) stops the study: the trainer's error line says why."""
        if self._writer is not None and self._writer.returncode > 0:
            err = self.log.with_suffix(".err")
            why = err.read_text().strip().splitlines()[-1:] if err.exists() else []
            raise RuntimeError(f"its writer process failed ({why[0] if why else 'no message'})")
        cmd = [sys.executable, "-m", "bstune.run_spool", str(self.log), self.tracker.uri,
               self.tracker.experiment_name, str(os.getpid())]
        self._read_run_ids()  # a writer that died: what it said before
        self._said, self._ready = b"", False
        with open(self.log.with_suffix(".err"), "wb") as err:
            self._writer = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        os.set_blocking(self._writer.stdout.fileno(), False)

    def _read_run_ids(self) -> None:
        """The run ids the writer has reported so far (its pipe read without waiting)."""
        if self._writer is None:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self._writer.stdout.fileno(), 65536):
                self._said += chunk
        *lines, self._said = self._said.split(b"\n")
        for line in lines:
            if line == READY:
                self._ready = True
                continue
            tid, run_id = line.split()
            self._run_ids[int(tid)] = run_id.decode()

    def _apply_here(self) -> None:
        """Apply the spool in this process (no writer yet, or one still starting); start the writer once this
        has cost `start_after` seconds in all."""
        start = time.perf_counter()
        apply_pending(self.log, self.tracker, self._made, fresh=self._writer is None,
                      on_start=self._run_ids.__setitem__)
        self._applied_here += time.perf_counter() - start
        if self._writer is None and self._applied_here >= self.start_after:
            self._start_writer()

    def run_id(self, handle: Any, wait: bool = False) -> str | None:
        """The MLflow run id of a trial, once the writer has made its run (else None); with `wait`, waits for it
        (at the end of a trial: this keeps the trainer at most a group ahead of its writer). Without a writer
        ready to apply, the trainer applies its spool itself rather than wait, with `wait` or not (a trial's start
        looks: its run is in MLflow, and on its trial, while it trains, as without a spool)."""
        end = time.monotonic() + CLOSE_SECONDS
        while True:
            self._read_run_ids()
            if int(handle) in self._run_ids or time.monotonic() > end:
                return self._run_ids.get(int(handle))
            self._restart_if_died()
            if not self._ready:
                self._apply_here()
                return self._run_ids.get(int(handle))
            if not wait:
                return None
            time.sleep(POLL_SECONDS)

    def start_trial(self, parent_id: str, study_name: str, number: int, trial_id: int,
                    params: dict[str, Any]) -> int:
        self._parent = parent_id
        self._spool({"op": "start", "trial_id": trial_id, "parent": parent_id, "study": study_name,
                     "number": number, "params": params, "ts": int(time.time() * 1000)})
        return trial_id

    def log_epoch(self, handle: int, epoch: int, values: dict[str, float | None],
                  histogram: dict[str, Any] | None = None) -> None:
        self._spool({"op": "epoch", "trial_id": handle, "parent": self._parent, "epoch": epoch, "values": values,
                     "histogram": histogram, "ts": int(time.time() * 1000)})

    def end_trial(self, handle: int, state: str, reason: str = "", final: dict[str, float] | None = None) -> None:
        self._spool({"op": "end", "trial_id": handle, "parent": self._parent, "state": state, "reason": reason,
                     "final": final, "ts": int(time.time() * 1000)})

    def settle_trial(self, parent_id: str, study_name: str, number: int, trial_id: int, state: str,
                     reason: str) -> None:
        """After this process's own spooled writes of the trial (it was taken away from this worker)."""
        self._spool({"op": "settle", "trial_id": trial_id, "parent": parent_id, "study": study_name,
                     "number": number, "state": state, "reason": reason})

    def close(self) -> None:
        """Wait until the writer has applied the whole spool (or apply what is left here: a writer still starting
        is stopped, not waited for), then remove it."""
        self._owner.write(b'\n{"op": "close"}\n')  # (a line cut short before it stays apart)
        self._read_run_ids()
        end = time.monotonic() + CLOSE_SECONDS
        while self._ready and self._writer.poll() is None and time.monotonic() < end:
            self._read_run_ids()  # its pipe must not fill while it finishes
            time.sleep(POLL_SECONDS)
        if self._writer is not None and self._writer.poll() is None:
            self._writer.kill()
            self._writer.wait()
        self._read_run_ids()
        apply_pending(self.log, self.tracker, {}, fresh=False)
        remove(self.log)
        self._owner.close()


def _serve(log: Path, tracking_uri: str, experiment: str, owner: int) -> None:
    """The writer process: apply the spool as lines come, until its owner closes it or dies."""
    from bstune.tracking import Tracker

    tracker = Tracker(tracking_uri, experiment)
    run_ids: dict[int, str] = {}
    print(READY.decode(), flush=True)

    def started(trial_id: int, run_id: str) -> None:
        print(trial_id, run_id, flush=True)

    def defer(lines: list[dict[str, Any]]) -> bool:
        """Starts and epochs are written a few seconds at a time: a short trial's run is then made and written
        whole at its end, its params, metrics and tags in one write (MLflow costs ~10 ms a write on SQLite, and
        a fused group's trials come many a second); an end, a settle or a close at once. The trainer waits for
        a run's id only after its end is spooled."""
        return (all(r["op"] in ("start", "epoch") for r in lines) and "ts" in lines[0]
                and time.time() - lines[0]["ts"] / 1000 < tracker.flush_seconds)

    fresh = False  # a writer restarted after another one died looks its first runs up
    size = -1
    while True:
        if os.getppid() != owner:  # its trainer is gone: what is left is repaired by the next claim or run
            return
        try:
            grown = log.stat().st_size != size
        except FileNotFoundError:
            return
        if not grown:
            time.sleep(POLL_SECONDS)
            continue
        size = log.stat().st_size
        n, closed = apply_pending(log, tracker, run_ids, fresh=fresh, on_start=started, defer=defer)
        if closed:
            return
        if n:
            fresh = True
        else:  # deferred: looked at again in a while, grown or not
            size = -1
            time.sleep(10 * POLL_SECONDS)


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the trainer's to handle
    try:
        _serve(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
    except BrokenPipeError:  # its trainer is gone
        pass
    except Exception as e:  # noqa: BLE001 - the store's error, as one line for the trainer to report
        from bstune.errors import first_line

        sys.stderr.write(f"{type(e).__name__}: {first_line(e)}\n")
        sys.exit(1)
