"""`bstune` processes for the slow tests, forked from a server that has already imported what a study imports.

A `python -m bstune.cli study` process spends ~8 s of CPU importing torch, MLflow (its SQL store), Optuna and
scikit-learn before it does anything, and the crash and signal tests start dozens of them (a process per
kill). `start()` and `run()` give the same process without that cost: a server, started once per test process,
imports those modules (and does nothing else: no store opened, no thread started, no torch op run), then forks a
child per command. The child is a process of its own, as `subprocess.Popen` gives: its own pid, the test's
environment, working directory and stdin/stdout/stderr, default signal dispositions (SIGINT ignored if asked, as
a script's `cmd &` starts it), SIGKILL, SIGINT and SIGTERM taken as a fresh process takes them, its exit status
(-9 when SIGKILLed) and its processes (the workers it starts are real `python -m bstune.cli worker` processes).
It runs `bstune.cli` as `python -m bstune.cli` would, ends as the interpreter ends (threads joined, atexit run)
and never returns to the server's code.

What only a fresh interpreter shows is tested on real ones: that a study process imports nothing it does not
use, that the CLI quiets MLflow's logging itself (tests/test_study.py).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import runpy
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

# What a study process imports, in the order the CLI does (MLflow's logging level as the CLI sets it first).
PRELOAD = ("bstune.cli", "bstune.search.study", "bstune.search.workers", "bstune.search.checks", "bstune.run_spool",
           "bstune.train", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "optuna.storages", "sklearn.datasets")

CHILD_CPU = [0.0]  # CPU seconds of the forked processes that have ended (self + waited children), this process
_server: tuple[subprocess.Popen, str] | None = None


# --------------------------------------------------------------------------------------------------
# The server


def _serve(path: str) -> None:
    """Import, listen on `path`, fork a child per request; report each child's pid, then its wait status."""
    import importlib

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in PRELOAD:
        importlib.import_module(name)
    import sqlalchemy.orm

    sqlalchemy.orm.configure_mappers()  # MLflow's table classes: ~1 s of CPU in each process otherwise
    assert threading.active_count() == 1, "no thread may be running at a fork"
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(16)
    os.rename(path + ".tmp", path)  # ready
    conns: dict[int, socket.socket] = {}
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while os.getppid() == parent:
        for _key, _ in sel.select(timeout=0.02):
            conn, _ = listener.accept()
            pid = _fork(conn, listener, conns)
            if pid:
                conns[pid] = conn
        _reap(conns)


def _reap(conns: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        conn = conns.pop(pid, None)
        if conn is not None:
            cpu = usage.ru_utime + usage.ru_stime
            try:
                conn.sendall(f"{os.waitstatus_to_exitcode(status)} {cpu:.3f}\n".encode())
            except OSError:
                pass  # its client is gone
            conn.close()


def _fork(conn: socket.socket, listener: socket.socket, conns: dict[int, socket.socket]) -> int:
    """Fork a child for the request on `conn`; the child's pid here (0 if the request was unreadable)."""
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(data)
    except (OSError, ValueError):
        conn.close()
        return 0
    pid = os.fork()
    if pid == 0:
        for c in (listener, conn, *conns.values()):
            c.close()
        _child(request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    return pid


def _child(request: dict[str, Any], fds: list[int]) -> None:
    """Become the process the request asks for, run it, and end as the interpreter ends."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            if fd > 2:
                os.close(fd)
        signal.signal(signal.SIGINT, signal.SIG_IGN if request["sigint_ignored"] else signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.argv = [request["module"], *request["args"]]
        code = _run_module(request["module"])
    except BaseException:  # noqa: BLE001 - a child never returns into the server's loop
        traceback.print_exc()
    finally:
        os._exit(code)


def _run_module(module: str) -> int:
    """`python -m module`: its exit code; then the interpreter's own end (threads joined, atexit, flushes)."""
    code: Any = 0
    sys.modules.pop(module, None)  # as under `python -m`, the module runs as __main__ only (no import of it yet)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - as the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    threading._shutdown()  # noqa: SLF001 - what the interpreter does first at its end
    atexit._run_exitfuncs()  # noqa: SLF001
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code or 0


# --------------------------------------------------------------------------------------------------
# The client: a Popen-like handle on a forked child


def _server_path() -> str:
    """The server of this process, started on first use (it exits when this process does)."""
    global _server
    if _server is None or _server[0].poll() is not None:
        path = os.path.join(tempfile.mkdtemp(prefix="bstune-prefork-"), "sock")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        proc = subprocess.Popen([sys.executable, "-m", "tests.prefork", path], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
        end = time.monotonic() + 300
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the prefork server did not start (exit code {proc.poll()})")
            time.sleep(0.05)
        _server = (proc, path)
    return _server[1]


def stop_server() -> None:
    """End this process's server (it would end with this process anyway)."""
    global _server
    if _server is not None:
        _server[0].kill()
        _server[0].wait()
        shutil.rmtree(os.path.dirname(_server[1]), ignore_errors=True)
        _server = None


class Forked:
    """`subprocess.Popen(cmd, ...)` for `[sys.executable, "-m", module, *args]`, forked by the server: `pid`,
    `returncode`, `poll`, `wait`, `communicate`, `send_signal`, `kill`, and `stdout`/`stderr` for PIPE."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 stdout: Any = None, stderr: Any = None, text: bool = False, sigint_ignored: bool = False) -> None:
        assert cmd[0] == sys.executable and cmd[1] == "-m", cmd
        self.args, self.returncode, self.stdout, self.stderr = cmd, None, None, None
        theirs, mine, self._closing = [], {}, []
        for name, spec in (("stdin", subprocess.DEVNULL), ("stdout", stdout), ("stderr", stderr)):
            if spec == subprocess.PIPE:
                r, w = os.pipe()
                mine[name] = r
                theirs.append(w)
                self._closing.append(w)
            elif spec == subprocess.DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
                theirs.append(fd)
                self._closing.append(fd)
            elif spec == subprocess.STDOUT:
                theirs.append(theirs[1])
            elif spec is None:
                theirs.append({"stdin": 0, "stdout": 1, "stderr": 2}[name])
            else:
                theirs.append(spec if isinstance(spec, int) else spec.fileno())
        request = {"module": cmd[2], "args": cmd[3:], "env": dict(os.environ if env is None else env),
                   "cwd": str(cwd or os.getcwd()), "sigint_ignored": sigint_ignored}
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(_server_path())
        socket.send_fds(self._conn, [json.dumps(request).encode()], theirs)
        for fd in self._closing:
            os.close(fd)
        self._said = b""
        self.pid = int(self._line(None))
        for name, fd in mine.items():
            setattr(self, name, open(fd, "r" if text else "rb", **({"encoding": "utf-8"} if text else {})))

    def _line(self, timeout: float | None) -> str | None:
        """The server's next line, waiting up to `timeout` seconds (None: as long as it takes)."""
        end = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._said:
            left = None if end is None else max(0.0, end - time.monotonic())
            self._conn.settimeout(left)
            try:
                chunk = self._conn.recv(4096)
            except (TimeoutError, BlockingIOError):
                return None
            if not chunk:
                raise RuntimeError("the prefork server went away")
            self._said += chunk
        line, _, self._said = self._said.partition(b"\n")
        return line.decode()

    def poll(self) -> int | None:
        return self.wait(timeout=0, raising=False)

    def wait(self, timeout: float | None = None, raising: bool = True) -> int | None:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                if raising:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                return None
            code, cpu = line.split()
            self.returncode = int(code)
            CHILD_CPU[0] += float(cpu)
            self._conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        """Read stdout and stderr (those that are pipes) to their ends, then wait; as Popen's."""
        end = None if timeout is None else time.monotonic() + timeout
        streams = [s for s in (self.stdout, self.stderr) if s is not None]
        got: dict[int, list[bytes]] = {id(s): [] for s in streams}
        sel = selectors.DefaultSelector()
        for s in streams:
            sel.register(s.fileno(), selectors.EVENT_READ, s)
        while sel.get_map():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    got[id(key.data)].append(chunk)
                else:
                    sel.unregister(key.fd)
        self.wait(None if end is None else max(0.0, end - time.monotonic()))
        out = []
        for s in (self.stdout, self.stderr):
            if s is None:
                out.append(None)
                continue
            raw = b"".join(got[id(s)])
            text = isinstance(s, io.TextIOWrapper)
            out.append((s.read() if text else b"") + (raw.decode() if text else raw))
            s.close()
        return out[0], out[1]


def start(cmd: list[str], **kwargs: Any) -> Forked:
    """`subprocess.Popen(cmd, ...)` for a `python -m ...` command (stdout, stderr, env, cwd, text as Popen's;
    `sigint_ignored` for Popen's preexec_fn that ignores SIGINT)."""
    return Forked(cmd, **kwargs)


def run(cmd: list[str], capture_output: bool = False, timeout: float | None = None,
        **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, ...)` for a `python -m ...` command; killed (and raising) past `timeout`."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = Forked(cmd, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


if __name__ == "__main__":
    _serve(sys.argv[1])
