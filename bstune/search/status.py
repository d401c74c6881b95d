"""A study seen from outside while it runs: trials by state, budget spent and left, and the workers alive.

Every worker records that it is alive once per heartbeat in the study's system attributes (key
`bstune.worker:<host>:<pid>`), and says goodbye when it stops. A worker is alive while that record is fresh:
it beats from a thread, so it stays fresh through long trials and while it waits for other workers'
trials. Each trial names its worker in the user attribute `bstune.worker`. Reading a status writes nothing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from bstune.errors import redact
from bstune.search._beats import heartbeat_ages
from bstune.search._optuna import (
    set_study_system_attr,
    study_system_attrs,
    trial_id,
    trial_summaries,
)
from bstune.spec import Budget, StudySpec
from bstune.stores import grace_seconds
from bstune.trials import Attr, Spent, StateCounts, describe, exhausted, tally, trial_state

WORKER_KEY = "bstune.worker:"


def worker_id(pid: int | None = None) -> str:
    """A worker process on this host (default: this process) as host:pid."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def alive_seconds(heartbeat_seconds: int) -> float:
    """How old a worker's last beat may be while it counts as alive (the grace period, plus slack for a busy host)."""
    return grace_seconds(heartbeat_seconds) + 2


class WorkerBeat:
    """Context manager: records this worker in the study every `interval` seconds until it exits."""

    def __init__(self, study: optuna.Study, index: int, device: str, interval: float) -> None:
        self._study, self._interval = study, interval
        self._key = WORKER_KEY + worker_id()
        self._record: dict[str, Any] = {"index": index, "device": device, "started": time.time(), "stopped": False}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bstune-worker-beat", daemon=True)

    def __enter__(self) -> WorkerBeat:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record["stopped"] = True
        self._write()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._write()

    def _write(self) -> None:
        try:
            set_study_system_attr(self._study, self._key, {**self._record, "seen": time.time()})
        except Exception:  # noqa: BLE001 - a missed beat only makes `status` doubt; the next one may pass
            pass


@dataclass(frozen=True)
class Worker:
    id: str
    index: int
    device: str
    seen: float
    trial: int | None  # the trial it is training, None while it waits or claims


@dataclass
class StudyStatus:
    name: str
    storage: str  # redacted
    states: StateCounts
    spent: Spent
    budget: Budget
    stop_reason: str
    workers: list[Worker] = field(default_factory=list)
    orphaned: list[int] = field(default_factory=list)  # RUNNING trials whose worker is not alive
    never_beat: list[int] = field(default_factory=list)  # of those, the ones with no heartbeat at all


def read_status(study: optuna.Study, spec: StudySpec, now: float | None = None) -> StudyStatus:
    """The study's state now. Reads only: no stale-trial check, nothing written."""
    now = time.time() if now is None else now
    trials = trial_summaries(study, (Attr.STATE, Attr.WORKER, Attr.EXAMPLES, Attr.SECONDS))
    states = StateCounts.of(trial_state(t) for t in trials)
    spent = tally(trials)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    beats = heartbeat_ages(study) if running else {}
    workers = []
    for key, rec in study_system_attrs(study).items():
        if not key.startswith(WORKER_KEY) or rec.get("stopped"):
            continue
        if now - rec.get("seen", 0) > alive_seconds(spec.heartbeat_seconds):
            continue
        wid = key[len(WORKER_KEY):]
        mine = [t.number for t in running if t.user_attrs.get(Attr.WORKER) == wid]
        workers.append(Worker(wid, int(rec.get("index", 0)), str(rec.get("device", "?")), rec["seen"],
                              min(mine, default=None)))
    workers.sort(key=lambda w: (w.index, w.id))
    alive = {w.id for w in workers}
    # A trial beats from its ask on, under the claim lock: one with no heartbeat lost its worker in between.
    never_beat = sorted(t.number for t in running if trial_id(t) not in beats)
    orphaned = sorted({t.number for t in running if t.user_attrs.get(Attr.WORKER) not in alive} | set(never_beat))
    return StudyStatus(study.study_name, redact(spec.storage), states, spent, spec.budget,
                       exhausted(spec.budget, spent) or "", workers, orphaned, never_beat)


def format_status(st: StudyStatus, heartbeat_seconds: int, now: float | None = None) -> str:
    """The status as a few lines of text."""
    now = time.time() if now is None else now
    counts = ", ".join(f"{n} {s}" for s, n in st.states.ordered())
    lines = [f"study {st.name} in {st.storage}", f"trials: {counts or 'none yet'}"]
    spent = f"budget spent: {describe(st.budget, st.spent)}"
    lines.append(f"{spent}; {st.stop_reason}" if st.stop_reason else f"{spent}; left: {_left(st.budget, st.spent)}")
    lines.append(f"workers alive: {len(st.workers)}")
    for w in st.workers:
        doing = f"training trial {w.trial}" if w.trial is not None else "waiting"
        lines.append(f"  w{w.index:<3d} {w.id:<28s} {w.device:<8s} {doing} (seen {max(0.0, now - w.seen):.0f}s ago)")
    if st.orphaned:
        grace = grace_seconds(heartbeat_seconds)
        never = f"; {', '.join(map(str, st.never_beat))} never beat: {grace}s after a worker first sees them" \
            if st.never_beat else ""
        who = "a worker marks them" if st.workers else "no worker is running; the next run of the study marks them"
        lines.append(f"running trials without a live worker: {', '.join(map(str, st.orphaned))} ({who} LOST and "
                     f"re-queues them once their heartbeat is {grace}s old{never})")
    return "\n".join(lines)


def _left(b: Budget, s: Spent) -> str:
    parts = []
    if b.trials is not None:
        parts.append(f"{max(0, b.trials - s.trials)} trials" + (f" ({s.running} running)" if s.running else ""))
    if b.examples is not None:
        parts.append(f"{max(0.0, b.examples - s.examples):,.0f} examples")
    if b.seconds is not None:
        parts.append(f"{max(0.0, b.seconds - s.seconds):.0f}s training")
    return ", ".join(parts) or "no limit set"
