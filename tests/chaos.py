"""Crash consistency, checked: what a study must look like after any number of SIGKILLs, and a chaos soak.

`check_consistent(spec, budget)`: the study finished its budget exactly, every trial's `bstune.state`
agrees with Optuna's state, nothing is RUNNING in Optuna or MLflow, and each ended trial has exactly one
MLflow run, closed with its state. `soak(...)`: `bstune study SPEC --workers N` re-run whenever it exits,
a worker (now and then the launcher) SIGKILLed at random moments and at random named points of a trial's
life (BSTUNE_KILL_AT), for a bounded time; then re-run in peace until it finishes.

    python -m tests.chaos --trials 200 --seconds 150 --workers 2 DIR   # the soak of issue 31, by hand
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from optuna.trial import TrialState

from bstune.spec import StudySpec, load_spec
from bstune.stores import load_study
from bstune.tracking import RUN_STATUS
from bstune.trials import RETRIED_STATES, TOLD_AS, counts_as_trial, trial_state
from tests import prefork

# Every named point of a trial's life at which BSTUNE_KILL_AT can SIGKILL a worker (bstune.signals.kill_point).
POINTS = ("parent_run", "asked", "beat", "suggested", "point", "run_started", "run_recorded", "epoch", "end_state",
          "end_run", "told", "stale_failed", "settled_run")


def check_consistent(spec: StudySpec, budget: int) -> dict[str, int]:
    """Assert the study is finished and whole; its counts by state."""
    study = load_study(spec.storage, spec.name)
    trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], "no Optuna trial left RUNNING"
    ended = [t for t in trials if t.state.is_finished()]
    states = {t.number: trial_state(t) for t in ended}
    assert sum(counts_as_trial(t) for t in ended) == budget, f"exactly the budget counted: {Counter(states.values())}"
    for t in ended:
        assert t.user_attrs.get("bstune.state") == states[t.number], f"trial {t.number}: bstune.state agrees"
        assert TOLD_AS[states[t.number]] == t.state.name, f"trial {t.number}: {states[t.number]} vs {t.state.name}"
    retries = Counter(t.user_attrs["bstune.retry_of"] for t in trials if "bstune.retry_of" in t.user_attrs)
    by_number = {t.number: t for t in trials}
    for n, k in retries.items():
        assert k == 1 and states.get(n) in RETRIED_STATES, f"trial {n}: re-run once, and only if not counted"
    unretried = [n for n, s in states.items() if s in RETRIED_STATES and n not in retries]
    assert not unretried, f"every LOST or INTERRUPTED trial re-queued: {unretried}"
    assert all(by_number[n] for n in retries)

    client = MlflowClient(spec.tracking_uri)
    parent = study.user_attrs["mlflow_parent_run_id"]
    exp = client.get_experiment_by_name(spec.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=50_000)
    assert client.get_run(parent).info.status != "RUNNING", "the study's parent run closed"
    studies = client.search_runs([exp.experiment_id], f"tags.`bstune.study` = '{spec.name}' and "
                                 "tags.`bstune.kind` = 'study'")
    assert [r.info.run_id for r in studies] == [parent], "one parent run"
    by_trial = Counter(r.data.tags["optuna.trial_id"] for r in runs)
    want = Counter(str(t._trial_id) for t in ended)
    assert by_trial == want, ("one MLflow run per ended trial, and no other: runs for trial ids "
                              f"{dict(by_trial - want)} too many, {dict(want - by_trial)} missing; "
                              f"{_runs_of(runs, by_trial - want + (want - by_trial))}")
    ids = {str(t._trial_id): t for t in ended}
    for r in runs:
        state = states[ids[r.data.tags["optuna.trial_id"]].number]
        assert (r.info.status, r.data.tags["bstune.state"]) == (RUN_STATUS[state], state), f"run of a {state} trial"
    return dict(Counter(states.values()))


def _runs_of(runs: list[Any], trial_ids: Counter) -> list[tuple[str, str, str]]:
    """(trial id, run status, bstune.state) of the runs of these trials, for an assertion's message."""
    return [(r.data.tags["optuna.trial_id"], r.info.status, r.data.tags.get("bstune.state", ""))
            for r in runs if r.data.tags["optuna.trial_id"] in trial_ids]


def _cmd(spec_file: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "bstune.cli", "study", str(spec_file), "--workers", str(workers)]


def _training(spec_file: Path) -> set[int]:
    """The pids of the workers with a trial RUNNING now."""
    spec = load_spec(spec_file)
    try:
        study = load_study(spec.storage, spec.name)  # waits while the study creates its store
    except Exception:  # noqa: BLE001 - not created yet
        return set()
    return {t.user_attrs.get("worker_pid") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def soak(spec_file: Path, workers: int, seconds: float, seed: int = 0, log: Any = None,
         peace_runs: int = 10, min_kills: int = 5) -> dict[str, int]:
    """SIGKILLs for `seconds` (longer, up to 4x, until `min_kills` landed mid-trial), then re-runs without them
    until the command succeeds. Counts of what was done."""
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = Counter({"runs": 0, "worker killed": 0, "killed mid-trial": 0, "launcher killed": 0,
                    "killed at a point": 0, "peace runs": 0})
    start = time.monotonic()

    def chaos() -> bool:
        t = time.monotonic() - start
        return t < seconds or (done["killed mid-trial"] < min_kills and t < 4 * seconds)

    while chaos():
        point = f"{rng.choice(POINTS)}:{rng.randint(1, 4)}" if rng.random() < 0.5 else ""
        proc = prefork.start(_cmd(spec_file, workers), env={**env, "BSTUNE_KILL_AT": point},
                             stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        done["runs"] += 1
        while proc.poll() is None and chaos():
            time.sleep(rng.uniform(1.0, 5.0))
            victims = _children(proc.pid)
            if not victims or proc.poll() is not None:  # still opening the study, or done
                continue
            if rng.random() < 0.1:
                proc.kill()
                done["launcher killed"] += 1
                continue
            busy = _training(spec_file)
            training = [v for v in victims if v in busy]
            if not training and rng.random() > 0.15:  # mostly mid-trial: a worker still starting costs no trial
                continue
            victim = rng.choice(training or victims)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            done["worker killed"] += 1
            done["killed mid-trial"] += victim in busy
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        done["killed at a point"] += bool(point) and proc.returncode != 0  # or by us
        if proc.returncode == 0 and not point and not chaos():
            break
    for _ in range(peace_runs):  # the workers of a killed launcher interrupt themselves within a few seconds
        time.sleep(3)
        run = prefork.run(_cmd(spec_file, workers), env=env, stdout=log or subprocess.DEVNULL,
                          stderr=subprocess.STDOUT, timeout=1800)
        done["peace runs"] += 1
        if run.returncode == 0:
            return dict(done)
    raise AssertionError(f"the study did not finish in {peace_runs} runs after the chaos")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from tests.conftest import write_spec

    a.folder.mkdir(parents=True, exist_ok=True)
    path = write_spec(a.folder, heartbeat_seconds=2, **{"budget.trials": a.trials, "workload.epochs": 2,
                                                        "workload.n_train": 400})
    t0 = time.time()
    with open(a.folder / "soak.log", "w") as log:
        done = soak(path, a.workers, a.seconds, a.seed, log)
    counts = check_consistent(load_spec(path), a.trials)
    print(f"soak of {a.seconds:.0f}s, {a.workers} workers, {a.trials} trials: {done}; finished in "
          f"{time.time() - t0:.0f}s, consistent; trials by state: {counts}")


if __name__ == "__main__":
    main()
