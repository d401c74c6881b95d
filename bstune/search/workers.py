"""Scale-out: several worker processes running one study, on this machine and on others.

bstune builds no scheduler. The Optuna storage is the distributed engine: every worker claims its trials
through it (under the claim lock, `claim.py`), so no trial runs twice; the MLflow store is the shared log.

`launch` (behind `bstune study SPEC --workers N`) creates the study and its MLflow parent run once, then
starts each worker as a subprocess running `python -m bstune.cli worker SPEC --index i`: the very command a
remote machine runs to join (`run_worker`). Subprocesses rather than multiprocessing because
- local and remote workers then run one code path, and nothing is pickled across;
- a worker's environment (CUDA_VISIBLE_DEVICES, thread counts) is fixed before Python and CUDA start;
- each worker has its own output pipe (its lines are shown prefixed with [wI]) and its own process to signal.
Workers run in their own session, so a terminal's Ctrl-C reaches only the launcher, which passes exactly one
SIGINT to each worker; they record their trials INTERRUPTED and re-queue them. SIGTERM to the launcher does
the same. A worker still running `STOP_GRACE_SECONDS` after its SIGINT gets SIGTERM, then SIGKILL (its trial
is then found LOST and re-queued). Workers take SIGINT whatever the launcher's own disposition (`bstune.signals`).
A worker whose launcher dies (killed, terminal closed) interrupts itself the same way instead of running on
unattended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from bstune import signals
from bstune.errors import BstuneError
from bstune.search.status import worker_id
from bstune.search.study import (
    INTERRUPTED,
    OpenStudy,
    StudyResult,
    finish_study,
    open_study,
    run_study,
    stores_failing,
)
from bstune.spec import StudySpec
from bstune.stores import grace_seconds
from bstune.tracking import RUN_FAILED
from bstune.trials import Attr, exhausted, tally


@dataclass(frozen=True)
class WorkerPlan:
    """How to start one worker: its index, the --device it gets, and what to add to its environment."""

    index: int
    device: str
    env: dict[str, str] = field(default_factory=dict)


def check_device(device: str) -> None:
    """BstuneError unless `device` is auto or a device this machine has."""
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BstuneError(f"--device: {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise BstuneError(f"--device {device}: this machine has no CUDA device; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise BstuneError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")


def plan_workers(workers: int | None, trials_per_device: int | None, device: str = "auto",
                 n_gpus: int | None = None, visible: str | None = None, cpus: int | None = None) -> list[WorkerPlan]:
    """The workers to start. With GPUs (device auto or cuda) they are pinned round-robin, one GPU each, via
    CUDA_VISIBLE_DEVICES; `trials_per_device` K means K workers per GPU (K in all on a CPU). On the CPU the
    cores are shared out, so that N workers do not each start a thread per core."""
    if workers is not None and trials_per_device is not None:
        raise BstuneError("--workers and --trials-per-device: give one of them "
                          "(--trials-per-device K runs K workers per GPU, --workers N runs N in all)")
    for name, value in (("--workers", workers), ("--trials-per-device", trials_per_device)):
        if value is not None and value < 1:
            raise BstuneError(f"{name}: must be at least 1, got {value}")
    check_device(device)
    if n_gpus is None:
        import torch

        n_gpus = torch.cuda.device_count()
    pin = device in ("auto", "cuda") and n_gpus > 0
    n = workers or (trials_per_device * (n_gpus if pin else 1) if trials_per_device else 1)
    if n == 1:
        return [WorkerPlan(0, device)]
    if pin:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        ids = visible.split(",") if visible else [str(k) for k in range(n_gpus)]
        return [WorkerPlan(i, "cuda", {"CUDA_VISIBLE_DEVICES": ids[i % n_gpus].strip()}) for i in range(n)]
    on_cpu = device == "cpu" or (device == "auto" and n_gpus == 0)
    threads = max(1, (cpus or os.cpu_count() or 1) // n)
    env = {"OMP_NUM_THREADS": str(threads)} if on_cpu and "OMP_NUM_THREADS" not in os.environ else {}
    return [WorkerPlan(i, device, env) for i in range(n)]


@dataclass
class Launched:
    """What a launch ended with: the study's result, and an error with its exit code if it failed."""

    result: StudyResult
    error: str = ""
    exit_code: int = 0


def launch(spec: StudySpec, spec_file: str, plans: list[WorkerPlan], echo: Callable[[str], None]) -> Launched:
    """Create the study once, run one worker process per plan until the budget is spent, close the study."""
    from bstune.search.progress import ConsoleProgress

    with stores_failing(spec):
        return _launch(spec, spec_file, plans, echo, open_study(spec, progress=ConsoleProgress(spec.search.objective)))


def _launch(spec: StudySpec, spec_file: str, plans: list[WorkerPlan], echo: Callable[[str], None],
            opened: OpenStudy) -> Launched:
    echo(f"study {spec.name}: starting {len(plans)} workers"
         + "".join(f"; w{p.index} on GPU {p.env['CUDA_VISIBLE_DEVICES']}" for p in plans
                   if "CUDA_VISIBLE_DEVICES" in p.env))
    lock = threading.Lock()  # one line at a time from the workers' relays
    procs: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []
    interrupted = False
    try:
        for plan in plans:
            procs.append(_spawn(spec, spec_file, plan))
            readers.append(_relay(procs[-1].stdout, f"[w{plan.index}] ", echo, lock))
    except KeyboardInterrupt:
        interrupted = True
        _interrupt(procs)

    def on_exit(i: int, code: int) -> None:
        note = _exit_note(code, spec.heartbeat_seconds)
        if note:
            with lock:
                echo(f"[w{plans[i].index}] {note}")

    interrupted = _wait_all(procs, on_exit) or interrupted
    for r in readers:
        r.join()

    ids = {worker_id(proc.pid) for proc in procs}
    trials = opened.study.get_trials(deepcopy=False)
    ran = sum(t.state.is_finished() and t.user_attrs.get(Attr.WORKER) in ids for t in trials)
    if interrupted:
        return Launched(finish_study(opened, INTERRUPTED, interrupted=True, trials_run=ran),
                        exit_code=signals.exit_code())
    spent_reason = exhausted(spec.budget, tally(trials))
    if spent_reason:
        return Launched(finish_study(opened, spent_reason, trials_run=ran))
    codes = [proc.returncode for proc in procs]
    error = (f"the workers stopped before the budget was spent (exit codes {codes}); see their output above, "
             f"then run the same command to resume")
    result = finish_study(opened, "workers stopped early", trials_run=ran, status=RUN_FAILED)
    return Launched(result, error, exit_code=2 if 2 in codes else 1)


def run_worker(spec: StudySpec, device: str, index: int | None = None, parent_pid: int | None = None) -> int:
    """One worker of an existing study (`bstune worker`): trials until the budget is spent. Its exit code."""
    from bstune.search.progress import ConsoleProgress

    if parent_pid:
        _watch_parent(parent_pid)
    out = _Unbroken(sys.stdout)
    index = zlib.crc32(worker_id().encode()) % 100_000 if index is None else index
    try:
        progress = ConsoleProgress(spec.search.objective, out, budget=spec.budget)
        result = run_study(spec, device=device, progress=progress, worker=index, join=True)
    except KeyboardInterrupt:  # before its loop began: nothing of it is in the study yet
        return signals.exit_code()
    n = result.trials_run
    out.write(f"worker {index} ({worker_id()}): ran {n} trial{'' if n == 1 else 's'}; {result.stop_reason}\n")
    out.flush()
    return signals.exit_code() if result.interrupted else 0


def _spawn(spec: StudySpec, spec_file: str, plan: WorkerPlan) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bstune.cli", "worker", spec_file, "--index", str(plan.index),
           "--device", plan.device, "--parent-pid", str(os.getpid())]
    if spec.execution.fuse:
        cmd += ["--fuse", str(spec.execution.fuse)]
    # URLs go by environment, not argv: a password in a command line is visible to every user in `ps`.
    env = {**os.environ, **plan.env, "PYTHONUNBUFFERED": "1",
           "BSTUNE_STORAGE": spec.storage, "BSTUNE_TRACKING_URI": spec.tracking_uri}
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


STOP_GRACE_SECONDS = 30.0  # after its SIGINT, what a worker has to record its trial before SIGTERM (then SIGKILL)


def _wait_all(procs: list[subprocess.Popen], on_exit: Callable[[int, int], None],
              grace: float = STOP_GRACE_SECONDS) -> bool:
    """Wait until every worker has exited; True if Ctrl-C (or SIGTERM) came meanwhile. Each passes one SIGINT to
    each worker still running (a second one stops them at once: their trials are found LOST later); workers
    still running `grace` seconds after their first SIGINT get SIGTERM, and SIGKILL `grace` seconds later."""
    interrupted = False
    running = dict(enumerate(procs))
    stopped_at: float | None = None
    escalate = [(grace, signal.SIGTERM), (2 * grace, signal.SIGKILL)]
    while running:
        try:
            for i, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[i]
                    on_exit(i, proc.returncode)
            if stopped_at is not None and escalate and time.monotonic() - stopped_at > escalate[0][0]:
                _signal_all(list(running.values()), escalate.pop(0)[1])
            time.sleep(0.2)
        except KeyboardInterrupt:
            interrupted = True
            stopped_at = stopped_at or time.monotonic()
            _interrupt(list(running.values()))
    return interrupted


def _interrupt(procs: list[subprocess.Popen]) -> None:
    _signal_all(procs, signal.SIGINT)


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)


def _relay(stream: Any, prefix: str, echo: Callable[[str], None], lock: threading.Lock) -> threading.Thread:
    def run() -> None:
        for line in stream:
            with lock:
                echo(prefix + line.rstrip("\n"))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _exit_note(code: int, heartbeat_seconds: int) -> str:
    # A Ctrl-C handled inside an eval() (namedtuple does one) makes `python -m` exit by SIGINT, not with 130:
    # the worker still recorded its trial and re-queued it.
    if code == -signal.SIGINT:
        return ""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return (f"worker killed ({name}); a live worker retries its trial once its heartbeat is "
                f"{grace_seconds(heartbeat_seconds)}s old")
    return "" if code in (0, 130) else f"worker exited with code {code}"


def _watch_parent(pid: int) -> None:
    """Interrupt this worker (as Ctrl-C would) once the process that started it is gone."""
    def run() -> None:
        while os.getppid() == pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=run, name="bstune-parent-watch", daemon=True).start()


class _Unbroken:
    """stdout that keeps a worker going when its launcher (the reader of its pipe) is gone."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        try:
            self._stream.write(text)
        except (OSError, ValueError):
            pass

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def isatty(self) -> bool:
        return False
