"""`bstune ui`: the MLflow UI over a study's tracking store, in a process group that stops with it.

`mlflow server` starts uvicorn and its workers (a dozen processes); they run in their own process group, which
is stopped whole (SIGTERM, then SIGKILL) when `bstune ui` gets Ctrl-C or SIGTERM, or ends any other way; on
Linux the server also gets SIGTERM when `bstune ui` is killed outright (SIGKILL, which it cannot handle). A
server that cannot start (port taken, store unusable) ends `bstune ui` with one line and a non-zero exit code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import IO

from bstune.errors import BstuneError
from bstune.tracking import artifact_root, training_experiments

READY_SECONDS = 180  # the server's imports alone take half a minute on a busy machine


def check_port(port: int) -> None:
    """BstuneError unless `port` is free on 127.0.0.1."""
    if not 1 <= port <= 65535:
        raise BstuneError(f"--port: {port} is not a port number; use 1 to 65535 (default 5000)")
    with socket.socket() as s:
        # as the server binds: the closed connections of a server that just stopped do not make the port taken
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise BstuneError(f"--port {port}: 127.0.0.1:{port} is taken ({e.strerror}); stop what serves it, or "
                              "pick another --port") from None


def serve(tracking_uri: str, port: int, echo: Callable[[str], None]) -> None:
    """Run the MLflow UI until a signal stops it (KeyboardInterrupt) or it stops by itself (BstuneError)."""
    check_port(port)
    pages = training_experiments(tracking_uri)  # tagged so the UI shows them as training runs
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", tracking_uri]
    root = artifact_root(tracking_uri)
    if root:
        cmd += ["--default-artifact-root", root]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | dict(os.environ)  # no job runners unless asked
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_terminated_with(os.getpid()))
        try:
            _wait_ready(proc, base, log)
            echo(f"MLflow UI on {base} (Ctrl-C to stop)")
            for name, experiment_id in pages:
                echo(f"  {name}: {base}/#/experiments/{experiment_id}?workflowType=machine_learning")
            while proc.poll() is None:
                time.sleep(0.5)
            raise BstuneError(f"the MLflow server stopped (exit code {proc.returncode}): {_last_line(log)}")
        finally:
            stop_group(proc)


def _wait_ready(proc: subprocess.Popen, base: str, log: IO[str]) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while True:
        if proc.poll() is not None:
            raise BstuneError(f"the MLflow server did not start (exit code {proc.returncode}): {_last_line(log)}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BstuneError(f"the MLflow server did not answer on {base} within {READY_SECONDS}s: "
                              f"{_last_line(log)}")
        time.sleep(0.3)


def _last_line(log: IO[str]) -> str:
    log.flush()
    log.seek(0)
    lines = [line.strip() for line in log.read().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "it printed nothing"


def _terminated_with(parent: int) -> Callable[[], None] | None:
    """Run in the server's process before it starts (Linux): SIGTERM it when `parent` dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return None

    def arm() -> None:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before the line above took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop every process of `proc`'s group (`proc` started it with start_new_session): SIGTERM, then SIGKILL
    to what is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            proc.poll()  # reaps the leader, so that only live members answer
            if not _group_alive(proc.pid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is left (zombies, which have exited, do not count)."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False
