"""`bstune ui`: a real MLflow server over a real store, started and stopped the way a person would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from bstune.cli import main
from bstune.tracking import KIND_TAG, TRAINING, Tracker

pytestmark = pytest.mark.slow  # real studies and subprocesses: the slow suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A store holding a study's parent run, in an experiment made without the UI's kind tag (as older
    bstune made them)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.create_experiment("bstune")
    Tracker(uri).open_study_run("small", None, {"lr_range": "0.01..1"}, "name: small\n")
    return uri


def _group_of_child(pid: int) -> list[int]:
    """The processes of the group led by `pid`'s child (the server `bstune ui` started)."""
    stats = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, ppid, pgrp = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state != "Z":
            stats[int(entry)] = (int(ppid), int(pgrp))
    leaders = [p for p, (ppid, _) in stats.items() if ppid == pid]
    return [p for p, (_, pgrp) in stats.items() if leaders and pgrp == leaders[0]]


def _start_ui(uri: str, port: int) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "bstune.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [proc.stdout.readline()]
    assert lines[0].startswith("MLflow UI on"), lines[0] + proc.stdout.read()
    lines.append(proc.stdout.readline())
    return proc, lines


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _gone(pids: list[int], seconds: float = 30) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if not _group_of_any(pids):
            return True
        time.sleep(0.2)
    return False


def _group_of_any(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except (OSError, IndexError):
            pass
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_links_the_study_and_a_signal_stops_every_process_it_started(store: str, sig: int) -> None:
    port = _free_port()
    proc, lines = _start_ui(store, port)
    experiment = MlflowClient(store).get_experiment_by_name("bstune")
    assert lines[1].split() == ["bstune:", f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
                                           "?workflowType=machine_learning"], lines
    assert experiment.tags[KIND_TAG] == TRAINING, "an experiment made before the tag is tagged"
    assert _answers(port)
    group = _group_of_child(proc.pid)
    assert group, "the server runs in its own process group"
    proc.send_signal(sig)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert _gone(group), f"left running: {_group_of_any(group)}"
    assert not _answers(port)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_ui_takes_its_server_with_it(store: str) -> None:
    """SIGKILL cannot be handled: the server, in a process group of its own, is told by the kernel instead."""
    port = _free_port()
    proc, _ = _start_ui(store, port)
    group = _group_of_child(proc.pid)
    proc.kill()
    proc.wait()
    assert _gone(group), f"left running: {_group_of_any(group)}"
    assert not _answers(port)


def test_ui_whose_server_dies_says_so_and_stops_the_rest(store: str) -> None:
    port = _free_port()
    proc, _ = _start_ui(store, port)
    group = _group_of_child(proc.pid)
    os.kill(min(group), signal.SIGKILL)  # the server's first process: `mlflow server` itself
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2 and out.strip().splitlines()[-1].startswith("error: the MLflow server stopped"), out
    assert _gone(group), f"left running: {_group_of_any(group)}"


def test_ui_on_a_taken_or_impossible_port_is_one_line_and_exit_2(store: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        out = CliRunner().invoke(main, ["ui", "--tracking-uri", store, "--port", str(taken)])
    assert out.exit_code == 2 and out.output.startswith(f"error: --port {taken}: 127.0.0.1:{taken} is taken")
    out = CliRunner().invoke(main, ["ui", "--tracking-uri", store, "--port", "-1"])
    assert out.exit_code == 2 and out.output.startswith("error: --port: -1 is not a port number"), out.output
    assert len(out.output.splitlines()) == 1
