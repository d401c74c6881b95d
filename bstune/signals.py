"""How bstune's processes take signals.

SIGINT (Ctrl-C) and SIGTERM (what `kill`, SLURM, `docker stop` and Kubernetes send) stop a study the same
way: a KeyboardInterrupt in the main thread, which every command already handles (the running trial recorded
INTERRUPTED and queued again, the MLflow runs closed). Only the exit code tells them apart, as the shell
would: 130 after SIGINT, 143 after SIGTERM. SIGINT is handled even when the process started with it ignored
(a script's `cmd &`), and since a handled signal is reset to its default in a child at exec, the processes
bstune starts take Ctrl-C too.

A first signal is held while the main thread is in library code that must not be cut in two, and raised as
soon as it is back in bstune's: in a finalizer, a KeyboardInterrupt is swallowed ("Exception ignored in ...":
the Ctrl-C is lost); in SQLAlchemy's code it can leave a connection mid-transaction, the database locked for
the finish path; in Optuna's own code (between its trial's creation and the objective, or in its tell) it
leaves the trial RUNNING with its heartbeat thread keeping the process alive. The library code in question is
whatever is innermost, so a Ctrl-C in training (torch, called from bstune) interrupts at once. `held()` holds
a signal the same way around writes of bstune's own that must not be cut in two. A second signal while one is
held interrupts at once, so a write stuck on a lock can still be stopped.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_FRAGILE_MODULES = ("sqlalchemy.", "alembic.", "optuna.")
_RETRY_SECONDS = 0.02
_received: list[int] = []  # the signals taken since `handled()` began, first first
_held = 0  # depth of held() blocks in the main thread
_pending: int | None = None  # a signal held, to be raised once out of held() or the fragile code
_redelivering = False  # the next signal is a held one sent again, not a second one


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _pending, _redelivering
    again, _redelivering = _redelivering, False
    if not again:
        _received.append(signum)
        if _pending is not None:  # a second signal: at once
            _pending = None
            raise KeyboardInterrupt
    if _held or _in_fragile_code(frame):
        _pending = signum
        if not _held:
            retry = threading.Timer(_RETRY_SECONDS, _redeliver, (signum,))
            retry.daemon = True
            try:
                retry.start()
            except RuntimeError:  # no new threads while the interpreter shuts down: now, then
                _pending = None
                raise KeyboardInterrupt from None
        return
    _pending = None
    raise KeyboardInterrupt


def _redeliver(signum: int) -> None:
    global _redelivering
    if _pending is None:
        return
    _redelivering = True
    os.kill(os.getpid(), signum)


def _in_fragile_code(frame: FrameType | None) -> bool:
    """Whether the main thread is in a finalizer, or its innermost code of either bstune's or a library's that
    must not be cut in two is a library's (a frame of torch or the standard library decides nothing)."""
    innermost_fragile: bool | None = None
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if frame.f_code.co_name == "__del__" or name == "weakref":
            return True
        if innermost_fragile is None:
            if name.startswith(_FRAGILE_MODULES):
                innermost_fragile = True
            elif name.startswith("bstune."):
                innermost_fragile = False
        frame = frame.f_back
    return bool(innermost_fragile)


@contextmanager
def handled() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (elsewhere: no change)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _received.clear()
    _pending = None
    for s in STOP_SIGNALS:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        _pending = None  # a signal still held goes with the handlers
        for s, h in before.items():
            signal.signal(s, h)


def exit_code() -> int:
    """The shell's code for the first stop signal taken: 143 after SIGTERM, else 130 (SIGINT, or a
    KeyboardInterrupt raised by other means)."""
    return 128 + (_received[0] if _received else signal.SIGINT)


def what_stopped() -> str:
    """'SIGTERM' or 'Ctrl-C': for the line a command prints when it stops."""
    return "SIGTERM" if _received and _received[0] == signal.SIGTERM else "Ctrl-C"


@contextmanager
def held() -> Iterator[None]:
    """Hold a first SIGINT/SIGTERM until the block ends, then raise its KeyboardInterrupt there."""
    global _held, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            _pending = None
            raise KeyboardInterrupt


KILL_AT = "BSTUNE_KILL_AT"  # test hook: "POINT" or "POINT:N"
_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Test hook for crash consistency: SIGKILL this process here when the environment variable BSTUNE_KILL_AT
    names this point ("end_state"), or names it with a count ("end_state:3") and this is its N-th time. Costs
    one lookup when unset. The points are listed in docs/scale-out.md."""
    wanted = os.environ.get(KILL_AT)
    if not wanted or not wanted.partition(":")[0] == name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] >= int(wanted.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)
