"""Several workers on one study, on the SQLite storage (one machine): real commands in subprocesses.

The scenarios (`check_*`) run again on PostgreSQL in tests/test_postgres.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from optuna.trial import FrozenTrial, TrialState

from bstune.cli import main
from bstune.errors import BstuneError
from bstune.search import ClaimLock, SilentProgress, plan_workers, run_study
from bstune.spec import StudySpec, load_spec
from bstune.trials import counts_as_trial, tally, trial_state
from tests import prefork
from tests.conftest import write_spec
from tests.test_study import _runs, _study

pytestmark = pytest.mark.slow  # real studies and subprocesses: the slow suite


@dataclass(frozen=True)
class Stores:
    storage: str
    tracking_uri: str
    password: str = ""  # in both URLs (PostgreSQL only): it must show up nowhere


@pytest.fixture
def stores(tmp_path: Path) -> Stores:
    return Stores(f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db")


def _spec(tmp_path: Path, stores: Stores, **overrides: Any) -> tuple[Path, StudySpec]:
    # The URLs go on the command line, not in the spec file: the file is the user's and may hold anything.
    # Heartbeats of 3 s (not 1): on a loaded 2-core machine a live worker can miss 2 s of them.
    # One trial at a time per worker unless a test says otherwise: these tests count trials in flight.
    path = write_spec(tmp_path, heartbeat_seconds=3, **{"execution.fuse": 1, **overrides})
    return path, load_spec(path).with_overrides(storage=stores.storage, tracking_uri=stores.tracking_uri)


def _cmd(stores: Stores, *args: str) -> list[str]:
    return [sys.executable, "-m", "bstune.cli", *args, "--storage", stores.storage,
            "--tracking-uri", stores.tracking_uri]


def _start(cmd: list[str], cwd: Path, sigint_ignored: bool = False) -> tuple[prefork.Forked, str]:
    """Start the launcher (as a script's `cmd &` does with `sigint_ignored`), forked from a process that has
    imported what it imports (tests/prefork.py; its workers are new interpreters); return it once it has created
    the study, with what it printed until then."""
    proc = prefork.start(cmd, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, sigint_ignored=sigint_ignored)
    head = []
    for line in proc.stdout:
        head.append(line)
        if line.startswith("study ") and "starting" in line:
            break
    return proc, "".join(head)


def _status(path: Path, stores: Stores) -> str:
    result = CliRunner().invoke(main, ["status", str(path), "--storage", stores.storage])
    assert result.exit_code == 0, result.output
    return result.output


# Never prunes (no batch size reaches its startup trials), yet reads the reports, so each trial's epochs done
# show in Optuna (with no pruner a study writes no reports)
NEVER_PRUNES = {"name": "median", "n_startup_trials": 10_000}


def _wait_for_running(spec: StudySpec, proc: prefork.Forked, n: int, to_go: int = 4,
                      timeout: float = 300) -> list[FrozenTrial]:
    """Wait until n trials train at once, each with an epoch done and `to_go` or more left (so what the test
    does next lands mid-trial, however fast the machine); return those, least advanced first."""
    study = _study(spec)  # one storage for all the polling: opening one costs the workers CPU time
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.stdout.read()
        running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING
                   and "mlflow_run_id" in t.user_attrs
                   and 1 <= len(t.intermediate_values) <= spec.workload.epochs - to_go]
        if len(running) >= n:
            return sorted(running, key=lambda t: len(t.intermediate_values))
        time.sleep(0.2)
    raise AssertionError(f"{n} trials were not running at once in time")


def _check_one_run_per_trial(spec: StudySpec, trials: list[FrozenTrial]) -> None:
    _, parents, children = _runs(spec)
    assert len(parents) == 1, "the launcher created the study's parent run once"
    started = [t for t in trials if t.state != TrialState.WAITING]
    assert sorted(r.data.tags["optuna.trial_id"] for r in children) == sorted(str(t._trial_id) for t in started)
    assert {t.user_attrs["mlflow_run_id"] for t in started} == {r.info.run_id for r in children}
    assert not [r.info.run_id for r in children if r.info.status == "RUNNING"], "no MLflow run left RUNNING"


def _snapshot(spec: StudySpec) -> tuple:
    study = _study(spec)
    system = study._storage.get_study_system_attrs(study._study_id)
    trials = [(t.number, t.state, t.user_attrs, t.system_attrs, t.datetime_complete) for t in study.trials]
    db = spec.storage.removeprefix("sqlite:///")
    raw = hashlib.sha256(Path(db).read_bytes()).hexdigest() if spec.storage.startswith("sqlite") else ""
    return study.user_attrs, system, trials, raw


# --------------------------------------------------------------------------------------------------


def test_four_workers_one_killed_run_exactly_the_budget(tmp_path: Path, stores: Stores) -> None:
    check_four_workers_one_killed(tmp_path, stores)


def test_example_budget_is_overspent_by_at_most_the_trials_in_flight(tmp_path: Path, stores: Stores) -> None:
    check_example_budget(tmp_path, stores)


def check_four_workers_one_killed(tmp_path: Path, stores: Stores) -> tuple[StudySpec, list[str]]:
    """4 workers run exactly the budget, though one is killed mid-trial: its trial is retried once.
    Returns the spec and what the commands printed."""
    # Trials of a few seconds (an idle machine runs ~30 of these epochs a second), so two run at once.
    path, spec = _spec(tmp_path, stores, **{"workload.n_train": 500, "workload.epochs": 60,
                                            "search.pruner": NEVER_PRUNES, "budget.trials": 8})
    proc, head = _start(_cmd(stores, "study", str(path), "--workers", "4"), tmp_path)
    victim = _wait_for_running(spec, proc, n=2)[0]
    pid = victim.user_attrs["worker_pid"]
    if stores.password and Path(f"/proc/{pid}/cmdline").exists():
        assert stores.password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), "URLs go by environment"
    os.kill(pid, signal.SIGKILL)
    out = head + proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out

    trials = _study(spec).trials
    states = {t.number: trial_state(t) for t in trials}
    assert all(t.state.is_finished() for t in trials)
    assert sum(counts_as_trial(t) for t in trials) == 8, "exactly the budget: the lost trial is not counted"
    assert len({t.number for t in trials}) == len(trials) == 9, "no trial number twice"
    assert [n for n, s in states.items() if s == "LOST"] == [victim.number], out
    retries = [t for t in trials if t.user_attrs.get("bstune.retry_of") == victim.number]
    assert len(retries) == 1, "exactly one worker re-queued the lost trial"
    assert retries[0].params == victim.params and states[retries[0].number] == "COMPLETE", out
    assert len({t.user_attrs["bstune.worker"] for t in trials}) >= 3, "the trials were shared out"
    _check_one_run_per_trial(spec, trials)
    client, parents, _ = _runs(spec)
    assert parents[0].info.status == "FINISHED"
    lost = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert lost.info.status == "KILLED" and lost.data.tags["bstune.state"] == "LOST"
    assert "worker killed (SIGKILL)" in out and f"trial {victim.number} was lost with its worker" in out
    assert out.count("spent: 8/8 trials") == 1, "one summary, from the launcher"
    assert sum(f"[w{i}] " in out for i in range(4)) >= 3, "each worker's lines, prefixed"

    before = _snapshot(spec)
    status = _status(path, stores)
    assert "budget spent: 8/8 trials" in status and "workers alive: 0" in status and "1 LOST" in status
    assert _snapshot(spec) == before, "status changes nothing"
    return spec, [out, status]


def check_example_budget(tmp_path: Path, stores: Stores) -> None:
    """Workers stop taking trials once the recorded spend reaches the budget."""
    per_trial = 3 * 800  # epochs x training examples (1000, less 20% for validation); no pruning
    budget = 2 * per_trial + 1
    path, spec = _spec(tmp_path, stores, **{"workload.n_train": 1000, "search.pruner": NEVER_PRUNES,
                                            "execution.fuse": 2, "budget": {"trials": None, "examples": budget}})
    run = prefork.run(_cmd(stores, "study", str(path), "--workers", "2"), cwd=tmp_path, capture_output=True,
                      text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    trials = _study(spec).trials
    assert all(t.state.is_finished() for t in trials)
    assert {t.user_attrs["examples_seen"] for t in trials} == {per_trial}
    spent = tally(trials)
    # A worker takes trials (groups of up to 2) only while the recorded spend and what its trials in flight
    # will spend are under the budget; the 2 workers' groups in flight at that moment may each add a trial.
    assert budget <= spent.examples < budget + 2 * per_trial
    assert "example limit reached" in run.stdout
    sizes = Counter(t.params["batch_size"] for t in trials)
    assert abs(sizes[16] - sizes[64]) <= 1, "the batch-size rotation holds across workers"
    _check_one_run_per_trial(spec, trials)


def test_status_then_ctrl_c_stops_every_worker_cleanly(tmp_path: Path) -> None:
    stores = Stores(f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db")
    # Long trials (an idle machine runs 30-70 of these epochs a second), all interrupted before they end; the
    # workers start their trials apart, so each trial's window to be caught in must be long.
    path, spec = _spec(tmp_path, stores, **{"workload.n_train": 500, "workload.epochs": 2000,
                                            "search.batch_sizes": [16], "search.pruner": NEVER_PRUNES,
                                            "budget.trials": 6})
    proc, head = _start(_cmd(stores, "study", str(path), "--workers", "2"), tmp_path)
    _wait_for_running(spec, proc, n=2, to_go=1500)  # seconds for `status` while both still train
    live = _status(path, stores)
    assert "workers alive: 2" in live and live.count("training trial") == 2 and "2 RUNNING" in live, live
    assert "trials (2 running)" in live

    _wait_for_running(spec, proc, n=2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the launcher; it passes one SIGINT to each worker
    out = head + proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out
    assert "Traceback" not in out and out.count("\nspent: ") == 1, out
    assert "worker killed" not in out and "worker exited" not in out, out
    trials = _study(spec).trials
    interrupted = sorted(t.number for t in trials if trial_state(t) == "INTERRUPTED")
    assert len(interrupted) == 2 and not [t for t in trials if t.state == TrialState.RUNNING]
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["bstune.retry_of"] for t in queued) == interrupted, "both re-queued, once each"
    _check_one_run_per_trial(spec, trials)
    _, parents, children = _runs(spec)
    assert parents[0].info.status == "KILLED"
    assert {r.info.status for r in children if r.data.tags["bstune.state"] == "INTERRUPTED"} == {"KILLED"}
    after = _status(path, stores)
    assert "workers alive: 0" in after and "2 WAITING" in after


def _long_trials(tmp_path: Path, stores: Stores) -> tuple[Path, StudySpec]:
    return _spec(tmp_path, stores, **{"workload.n_train": 500, "workload.epochs": 400, "search.batch_sizes": [16],
                                      "search.pruner": NEVER_PRUNES, "budget.trials": 6})


def test_sigterm_to_a_launcher_started_in_the_background_stops_every_worker_cleanly(tmp_path: Path) -> None:
    """SIGTERM (SLURM, docker stop) to a launcher that a script started with `&` (SIGINT ignored, which its
    workers would inherit): every trial INTERRUPTED and re-queued, every MLflow run closed, exit code 143."""
    stores = Stores(f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db")
    path, spec = _long_trials(tmp_path, stores)
    proc, head = _start(_cmd(stores, "study", str(path), "--workers", "2"), tmp_path, sigint_ignored=True)
    _wait_for_running(spec, proc, n=2)
    proc.send_signal(signal.SIGTERM)
    out = head + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out
    assert "Traceback" not in out and "worker killed" not in out and "worker exited" not in out, out
    trials = _study(spec).trials
    interrupted = sorted(t.number for t in trials if trial_state(t) == "INTERRUPTED")
    assert len(interrupted) == 2 and not [t for t in trials if t.state == TrialState.RUNNING]
    assert sorted(t.user_attrs["bstune.retry_of"] for t in trials if t.state == TrialState.WAITING) == interrupted
    _check_one_run_per_trial(spec, trials)
    assert _runs(spec)[1][0].info.status == "KILLED"


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_of_a_sigkilled_launcher_stop_at_once(tmp_path: Path) -> None:
    """A launcher killed outright (SIGKILL, started in the background so SIGINT is ignored): its workers see it
    gone, interrupt their trials (INTERRUPTED, re-queued, runs closed) and exit instead of running the rest of
    the budget as orphans."""
    stores = Stores(f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db")
    path, spec = _long_trials(tmp_path, stores)
    proc, _ = _start(_cmd(stores, "study", str(path), "--workers", "2"), tmp_path, sigint_ignored=True)
    pids = [t.user_attrs["worker_pid"] for t in _wait_for_running(spec, proc, n=2)]
    proc.kill()
    proc.communicate(timeout=60)
    end = time.time() + 120
    while time.time() < end and any(_alive(pid) for pid in pids):
        time.sleep(0.5)
    assert not any(_alive(pid) for pid in pids), "the workers outlived their launcher"
    trials = _study(spec).trials
    assert sorted(trial_state(t) for t in trials) == ["INTERRUPTED", "INTERRUPTED", "WAITING", "WAITING"]
    assert not [r for r in _runs(spec)[2] if r.info.status == "RUNNING"], "no trial's run left RUNNING"


class _StallsTrialZero(SilentProgress):
    """At trial 0's second epoch, does what another worker's heartbeat check does to a trial whose worker
    stalled: fails it in the storage."""

    def __init__(self, spec: StudySpec) -> None:
        self.spec, self.notes = spec, []

    def epoch_done(self, number: int, config: Any, epoch: int, epochs: int, value: float) -> None:
        if number == 0 and epoch == 2:
            study = _study(self.spec)
            study._storage.set_trial_state_values(study.trials[0]._trial_id, TrialState.FAIL)

    def note(self, text: str) -> None:
        self.notes.append(text)


def test_a_worker_whose_trial_was_declared_lost_drops_it_and_goes_on(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, **{"budget.trials": 3, "search.pruner": "none"}))
    progress = _StallsTrialZero(spec)
    result = run_study(spec, progress=progress)
    assert not result.interrupted and result.spent.trials == 3
    states = [trial_state(t) for t in _study(spec).trials]
    assert states == ["LOST", "COMPLETE", "COMPLETE", "COMPLETE"], "trial 0 was left to whoever took it"
    assert result.trials_run == 3
    assert [n for n in progress.notes if n.startswith("trial 0 was declared lost while this worker ran it")]


def test_claim_lock_excludes_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    check_claim_lock(f"sqlite:///{tmp_path}/optuna.db")


def check_claim_lock(url: str) -> None:
    """One holder at a time, and a holder killed with SIGKILL frees the lock."""
    a, b = ClaimLock(url, "s"), ClaimLock(url, "s")
    assert a.acquire() and not b.acquire(timeout=0.2), "one holder at a time"
    if url.startswith("postgresql"):  # one lock per study (SQLite: one per database file)
        other = ClaimLock(url, "another study")
        assert other.acquire(timeout=5)
        other.close()
    a.release()
    assert b.acquire(timeout=5)
    b.close()
    code = "import os, time; from bstune.search import ClaimLock; lock = ClaimLock(os.environ['URL'], 's'); " \
           "lock.acquire(); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "URL": url}, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not a.acquire(timeout=0.2)
    finally:
        holder.kill()
        holder.wait()
    assert a.acquire(timeout=30), "a killed holder frees the lock"
    a.close()


def test_workers_are_pinned_round_robin_and_share_the_cpu() -> None:
    plans = plan_workers(None, 2, "auto", n_gpus=2, visible="3,5")
    assert [(p.device, p.env["CUDA_VISIBLE_DEVICES"]) for p in plans] == [("cuda", "3"), ("cuda", "5")] * 2
    plans = plan_workers(3, None, "auto", n_gpus=2, visible="")
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "1", "0"]
    assert [p.index for p in plans] == [0, 1, 2]
    cpu = plan_workers(None, 3, "auto", n_gpus=0, cpus=2)
    assert len(cpu) == 3 and {p.device for p in cpu} == {"auto"}, "on a CPU, K per device is K in all"
    if "OMP_NUM_THREADS" not in os.environ:
        assert {p.env["OMP_NUM_THREADS"] for p in cpu} == {"1"}
        assert {p.env["OMP_NUM_THREADS"] for p in plan_workers(2, None, "cpu", n_gpus=0, cpus=8)} == {"4"}
    assert plan_workers(None, None, "auto", n_gpus=2) == plan_workers(1, None, "auto", n_gpus=2)
    assert len(plan_workers(None, None, "auto", n_gpus=2)) == 1, "one worker unless asked for more"
    with pytest.raises(BstuneError, match="give one of them"):
        plan_workers(2, 2)
    with pytest.raises(BstuneError, match="--workers: must be at least 1"):
        plan_workers(0, None)


@pytest.mark.fresh_stores
def test_bad_scale_out_input_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    path = write_spec(tmp_path)
    for args in (["study", str(path), "--workers", "2", "--trials-per-device", "2"],
                 ["study", str(path), "--workers", "2", "--device", "nonsense"],
                 ["worker", str(path)],
                 ["status", str(path)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "bstune study" in result.output, "status on a study that is not there says how to start it"
    assert not list(tmp_path.glob("*.db")), "nothing created"
