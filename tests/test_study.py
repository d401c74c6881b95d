"""Whole studies on real parts: SQLite Optuna storage, SQLite MLflow store, real (small) training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from bstune.cli import main
from bstune.search import run_study
from bstune.search.space import BatchSizeSampler, SearchSpace, WithinBatchSizePruner, make_pruner
from bstune.spec import Search, load_spec
from bstune.stores import load_study
from bstune.trials import trial_state
from tests import prefork
from tests.conftest import write_spec

PARAMS = {"batch_size", "lr", "momentum", "optimizer", "epochs", "accumulation_steps", "dataset", "model", "seed",
          "effective_lr", "noise_scale"}
METRICS = {"train_loss", "val_loss", "val_accuracy", "examples_seen", "optimizer_steps", "examples_per_second",
           "weight_distance", "grad_noise_scale"}


def _runs(spec) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("bstune.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("bstune.kind") == "trial"]
    return client, parents, children


def _study(spec) -> optuna.Study:
    return load_study(spec.storage, spec.name)  # waits while the study under test creates its store


def test_small_study_end_to_end(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as a script calling run_study sees them (the suite hides Optuna's)
        result = run_study(spec)
    assert not [str(w.message) for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    assert result.spent.trials == 6 and not result.interrupted
    assert "trial limit" in result.stop_reason
    sizes = [r.batch_size for r in result.table.records]
    assert sorted(sizes) == [16, 16, 16, 64, 64, 64], "every batch size gets its share of trials"
    done = result.table.completed()
    assert done and all(r.value is not None and r.value > 0 for r in done)
    assert all(len(r.curve) == 3 for r in done), "one learning-curve point per epoch"
    best = result.summary["best_per_batch_size"]
    assert set(best) == {"16", "64"}
    # Budget accounting: examples add up to what the trials report.
    assert result.spent.examples == sum(r.examples_seen for r in result.table.records) > 0


@pytest.mark.slow
def test_mlflow_parent_and_child_runs(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path))
    result = run_study(spec)
    client, parents, children = _runs(spec)
    assert len(parents) == 1 and parents[0].info.run_id == result.parent_run_id
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["bstune.study"] == "small"
    assert "budget.trials" in parent.data.metrics and parent.data.tags.get("bstune.best_trial") is not None
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "summary.json"} <= artifacts
    study = _study(spec)
    assert len(children) == len(study.trials) == 6
    by_number = {int(r.data.tags["bstune.trial"]): r for r in children}
    for t in study.trials:
        run = by_number[t.number]  # one MLflow run per Optuna trial, and each points at the other
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna.trial_id"] == str(t._trial_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["bstune.study"] == "small"
        assert run.data.tags["bstune.state"] == trial_state(t)
        assert PARAMS <= set(run.data.params)
        assert float(run.data.params["lr"]) == pytest.approx(t.user_attrs["lr"])
        assert int(run.data.params["batch_size"]) == t.params["batch_size"]
        if trial_state(t) == "COMPLETE":
            assert run.info.status == "FINISHED"
            assert METRICS <= set(run.data.metrics), set(METRICS) - set(run.data.metrics)
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
            assert steps == [1, 2, 3], "metrics are logged per epoch with step = epoch"


def _trial(b: int, values: list[float], state: TrialState = TrialState.COMPLETE):
    dists = {"batch_size": CategoricalDistribution([16, 64]), "lr": FloatDistribution(1e-3, 1, log=True)}
    return create_trial(
        params={"batch_size": b, "lr": 0.1}, distributions=dists,
        intermediate_values={i + 1: v for i, v in enumerate(values)},
        value=values[-1] if state == TrialState.COMPLETE else None, state=state,
    )


@pytest.mark.slow
def test_pruning_compares_only_the_same_batch_size(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/p.db"
    pruner = WithinBatchSizePruner(lambda b: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    study = optuna.create_study(storage=storage, pruner=pruner)
    # Large batches converge faster per epoch: B=64 trials are far better at epoch 1 than any B=16 trial.
    for v in (0.10, 0.12, 0.11):
        study.add_trial(_trial(64, [v, v / 2]))
    for v in (1.00, 1.10):
        study.add_trial(_trial(16, [v, v / 2]))
    # A B=16 trial at 0.9 is good *for B=16*: a median over all trials (0.11) would prune it; ours does not.
    study.enqueue_trial({"batch_size": 16})
    trial = study.ask()
    assert trial.suggest_categorical("batch_size", [16, 64]) == 16
    trial.report(0.9, 1)
    assert not trial.should_prune()
    plain = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    assert plain.prune(study, study._storage.get_trial(trial._trial_id)), "a global median would prune it"
    trial.report(1.5, 2)  # worse than both B=16 trials at epoch 2: pruned
    assert trial.should_prune()


@pytest.mark.slow
def test_percentile_pruner_keeps_the_best_three_quarters_of_the_batch_size(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, **{"search.pruner": {"name": "percentile", "percentile": 75,
                                                               "n_startup_trials": 4, "n_warmup_epochs": 0}}))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/p.db", pruner=make_pruner(spec.search, lambda b: 4))
    for v in (0.1, 0.2, 0.3, 0.4):
        study.add_trial(_trial(16, [v, v]))
    study.add_trial(_trial(64, [5.0, 5.0]))  # another batch size: not compared
    for value, pruned in ((0.25, False), (0.35, True)):  # 75th percentile of 0.1..0.4: 0.325
        study.enqueue_trial({"batch_size": 16})
        trial = study.ask()
        trial.suggest_categorical("batch_size", [16, 64])
        trial.report(value, 1)
        assert bool(trial.should_prune()) == pruned, value
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)


@pytest.mark.slow
def test_hyperband_is_sized_by_each_batch_size_s_run_length(tmp_path: Path) -> None:
    # With hold: steps a run lasts a different number of epochs at each batch size; Hyperband's brackets
    # must follow the batch size's own length, not the spec's epochs.
    spec = load_spec(write_spec(tmp_path, **{"workload.hold": "steps", "workload.steps": 120,
                                             "search.pruner": {"name": "hyperband", "min_resource": 1}}))
    epochs = {16: 4, 64: 15}
    pruner = make_pruner(spec.search, epochs.__getitem__)
    assert pruner.inner(16) is pruner.inner(16) and pruner.inner(16) is not pruner.inner(64)
    assert {b: pruner.inner(b)._max_resource for b in epochs} == epochs


@pytest.mark.slow
def test_batch_sizes_stay_covered_and_conditioned(tmp_path: Path) -> None:
    space = SearchSpace(Search(batch_sizes=(16, 32, 64)))
    sampler = BatchSizeSampler(optuna.samplers.RandomSampler(seed=0), space, seed=0)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", sampler=sampler)
    study.optimize(lambda t: space.suggest(t).lr, n_trials=12)
    counts = {b: sum(t.params["batch_size"] == b for t in study.trials) for b in (16, 32, 64)}
    assert counts == {16: 4, 32: 4, 64: 4}


@pytest.mark.slow
def test_diverged_trials_are_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, **{"search.lr": {"low": 200.0, "high": 400.0},
                                             "search.momentum": {"low": 0.9, "high": 0.9}, "budget.trials": 3}))
    result = run_study(spec)
    assert [r.state for r in result.table.records] == ["DIVERGED"] * 3
    assert all("loss" in r.reason for r in result.table.records)
    study = _study(spec)
    assert {t.state for t in study.trials} == {TrialState.PRUNED}  # samplers learn the region is bad
    _, _, children = _runs(spec)
    assert {r.data.tags["bstune.state"] for r in children} == {"DIVERGED"}
    assert {r.info.status for r in children} == {"FINISHED"}  # a measurement: its run ended as planned


@pytest.mark.parametrize("limit,expect", [({"trials": 60, "examples": 1000}, "example limit"),
                                          ({"trials": 60, "seconds": 0.05}, "training-time limit")])
@pytest.mark.slow
def test_trials_that_diverge_at_once_still_spend_the_budget(tmp_path: Path, limit: dict, expect: str) -> None:
    """Each diverged trial is charged the steps it took and its time, so such a study stops on that budget
    (the trial limit is only a backstop)."""
    spec = load_spec(write_spec(tmp_path, budget=limit, **{"search.lr": {"low": 300.0, "high": 900.0},
                                                           "search.momentum": {"low": 0.9, "high": 0.9}}))
    result = run_study(spec)
    assert expect in result.stop_reason and {r.state for r in result.table.records} == {"DIVERGED"}
    assert all(r.examples_seen >= 16 and r.train_seconds > 0 for r in result.table.records), "one step at least"


@pytest.mark.slow
@pytest.mark.fresh_stores
def test_a_study_writes_its_sqlite_stores_through_a_write_ahead_log(tmp_path: Path) -> None:
    import sqlite3

    spec = load_spec(write_spec(tmp_path, storage=f"sqlite:///{tmp_path}/optuna.db", **{"budget.trials": 2}))
    assert CliRunner().invoke(main, ["validate", str(tmp_path / "spec.yaml")]).exit_code == 0
    assert not list(tmp_path.glob("*.db")), "validate creates nothing"
    run_study(spec)
    for db in ("optuna.db", "mlflow.db"):
        with sqlite3.connect(tmp_path / db) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal", db


@pytest.mark.parametrize("limit,expect", [({"trials": None, "examples": 3000}, "example limit"),
                                          ({"trials": None, "seconds": 0.01}, "training-time limit")])
@pytest.mark.slow
def test_budget_limits_stop_the_study(tmp_path: Path, limit: dict, expect: str) -> None:
    spec = load_spec(write_spec(tmp_path, budget=limit))
    result = run_study(spec)
    assert expect in result.stop_reason
    # Each trial processes 3 epochs x 480 training examples = 1440; the limit is checked between trials.
    if "examples" in limit:
        assert result.spent.examples >= 3000 and result.spent.trials == 3
    else:
        assert result.spent.trials == 1


@pytest.mark.slow
def test_rerun_resumes_and_counts_what_was_spent(tmp_path: Path) -> None:
    path = write_spec(tmp_path, **{"budget.trials": 3})
    first = run_study(load_spec(path))
    assert first.trials_run == 3
    again = run_study(load_spec(path))
    assert again.trials_run == 0, "the budget is already spent"
    more = run_study(load_spec(write_spec(tmp_path, **{"budget.trials": 5})))
    assert more.trials_run == 2 and more.spent.trials == 5
    assert more.parent_run_id == first.parent_run_id, "one MLflow parent run per study, reopened on resume"
    _, parents, children = _runs(load_spec(path))
    assert len(parents) == 1 and len(children) == 5


@pytest.mark.slow
def test_resumed_study_must_keep_its_spec(tmp_path: Path) -> None:
    run_study(load_spec(write_spec(tmp_path, **{"budget.trials": 1})))
    code = CliRunner().invoke(main, ["study", str(write_spec(tmp_path, **{"workload.epochs": 5}))])
    assert code.exit_code == 2 and "workload.epochs" in code.output and "new name" in code.output


@pytest.mark.slow
def test_cli_prints_progress_and_summary(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["study", str(write_spec(tmp_path, **{"budget.trials": 4}))])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("trial ") >= 4 and "B=16" in out and "B=64" in out
    assert "best lr" in out and "spent: 4/4 trials" in out
    # two trials per batch size cannot say which batch size to use: one line says so, before what to run next
    assert out.index("Which batch size to use: not yet (") < out.index("next:")
    # then what to run next, for this study (its own tracking store, not the default one)
    path, spec = tmp_path / "spec.yaml", load_spec(tmp_path / "spec.yaml")
    steps = [line.removeprefix("next:").split("#")[0].split() for line in out[out.index("next:"):].splitlines()]
    assert steps == [["bstune", "analyze", str(path)], ["bstune", "report", str(path), "--batch-size", "B"],
                     ["bstune", "ui", "--tracking-uri", spec.tracking_uri]]


# --------------------------------------------------------------------------------------------------
# Killed and interrupted processes


def _slow_spec(tmp_path: Path, trials: int = 4, fuse: int = 1) -> Path:
    # Trials of about 1.2 s each on an idle machine (longer under load), so a signal sent 0.5 s after a trial's
    # run appears lands mid-trial; the re-runs that finish these studies pay for every second of it.
    return write_spec(tmp_path, **{"workload.n_train": 2000, "workload.epochs": 12, "search.batch_sizes": [16],
                                   "search.pruner": "none", "budget.trials": trials, "execution.fuse": fuse})


def _ignoring_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a script's `cmd &` starts it


def _start(path: Path, sigint_ignored: bool = False, fresh: bool = False) -> subprocess.Popen | prefork.Forked:
    """`bstune study PATH` in a process of its own, forked from one that has imported what a study imports
    (tests/prefork.py), or with `fresh` a new interpreter (the CLI must quiet MLflow's logging itself, and only a
    fresh interpreter imports MLflow after the CLI has started)."""
    # Without the MLflow log level an earlier in-process CLI call may have set: the CLI must quiet MLflow itself.
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bstune.cli", "study", str(path)]
    if fresh:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_ignoring_sigint if sigint_ignored else None)
    return prefork.start(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         sigint_ignored=sigint_ignored)


def _rerun(path: Path) -> None:
    """The same command again, in a process of its own, to its end: it must succeed."""
    rerun = prefork.run([sys.executable, "-m", "bstune.cli", "study", str(path)], capture_output=True,
                        text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr


def _wait_for_running_trial(spec, proc: subprocess.Popen | prefork.Forked, min_done: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.stdout.read()
        try:
            trials = _study(spec).trials
        except Exception:  # noqa: BLE001 - the process under test may be creating the study right now
            trials = []
        done = sum(t.state.is_finished() for t in trials)
        running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("mlflow_run_id")]
        if done >= min_done and running:
            time.sleep(0.5)  # well inside the trial
            return
        time.sleep(0.2)
    raise AssertionError("no trial started in time")


def _stopped_mid_trial(path: Path, sig: int = signal.SIGINT, sigint_ignored: bool = False,
                       fresh: bool = False) -> tuple[int, str]:
    """Start the study, send `sig` while a trial trains, and wait for the process: its exit code and output."""
    proc = _start(path, sigint_ignored, fresh)
    _wait_for_running_trial(load_spec(path), proc, min_done=0)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def _statuses(spec) -> tuple[str, dict[int, str]]:
    """The MLflow status of the study's parent run, and of each trial's run by trial number."""
    _, parents, children = _runs(spec)
    return parents[0].info.status, {int(r.data.tags["bstune.trial"]): r.info.status for r in children}


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path: Path) -> None:
    path = _slow_spec(tmp_path)
    spec = load_spec(path)
    proc = _start(path)
    _wait_for_running_trial(spec, proc, min_done=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = [t for t in _study(spec).trials if t.state == TrialState.RUNNING]
    assert len(killed) == 1
    time.sleep(2 * spec.heartbeat_seconds + 1)  # the heartbeat goes stale
    _rerun(path)
    trials = _study(spec).trials
    states = {t.number: trial_state(t) for t in trials}
    lost = [t for t in trials if states[t.number] == "LOST"]
    assert [t.number for t in lost] == [killed[0].number]
    retry = [t for t in trials if t.user_attrs.get("bstune.retry_of") == killed[0].number]
    assert len(retry) == 1 and retry[0].params == killed[0].params and states[retry[0].number] == "COMPLETE"
    counted = [n for n, s in states.items() if s not in ("LOST", "INTERRUPTED")]
    assert len(counted) == 4, "exactly the requested trials: none lost, none duplicated"
    assert len({t.number for t in trials}) == len(trials) == 5
    _, _, children = _runs(spec)
    assert len(children) == 5 and not [r for r in children if r.info.status == "RUNNING"]
    assert {r.info.status for r in children if r.data.tags["bstune.state"] == "LOST"} == {"KILLED"}


@pytest.mark.slow
def test_sigkill_mid_group_loses_every_member_and_each_runs_again(tmp_path: Path) -> None:
    path = _slow_spec(tmp_path, trials=4, fuse=2)
    spec = load_spec(path)
    proc = _start(path)
    _wait_for_running_trial(spec, proc, min_done=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = sorted(t.number for t in _study(spec).trials if t.state == TrialState.RUNNING)
    assert len(killed) == 2, "the second group of two was training"
    time.sleep(2 * spec.heartbeat_seconds + 1)  # the heartbeats go stale
    _rerun(path)
    trials = _study(spec).trials
    states = {t.number: trial_state(t) for t in trials}
    assert sorted(n for n, s in states.items() if s == "LOST") == killed
    retries = sorted(t.user_attrs["bstune.retry_of"] for t in trials if "bstune.retry_of" in t.user_attrs)
    assert retries == killed and len(trials) == 6
    assert sorted(states.values()).count("COMPLETE") == 4, "exactly the requested trials: none lost, none twice"


@pytest.mark.slow
def test_ctrl_c_mid_group_interrupts_every_member(tmp_path: Path) -> None:
    path = _slow_spec(tmp_path, trials=4, fuse=2)  # groups of two: at most half the batch size's share at once
    spec = load_spec(path)
    code, out = _stopped_mid_trial(path)
    assert code == 130, out
    finished = [t for t in _study(spec).trials if t.state.is_finished()]  # the first group may be done already
    assert [trial_state(t) for t in finished] in (["INTERRUPTED"] * 2, ["COMPLETE"] * 2 + ["INTERRUPTED"] * 2)
    parent, status = _statuses(spec)
    assert parent == "KILLED"
    assert {status[t.number] for t in finished if trial_state(t) == "INTERRUPTED"} == {"KILLED"}
    _rerun(path)
    states = [trial_state(t) for t in _study(spec).trials]
    assert sorted(states) == ["COMPLETE"] * 4 + ["INTERRUPTED"] * 2


@pytest.mark.slow
def test_ctrl_c_ends_cleanly_and_resumes(tmp_path: Path) -> None:
    path = _slow_spec(tmp_path, trials=2)
    spec = load_spec(path)
    code, out = _stopped_mid_trial(path, fresh=True)
    assert code == 130, out
    assert "INTERRUPTED" in out and "Traceback" not in out
    assert " INFO mlflow" not in out, out  # MLflow's table creation on a fresh store: noise on a terminal
    # The trial training when the signal came is INTERRUPTED (on a fast machine the first may be done by then).
    trials = [t for t in _study(spec).trials if t.state.is_finished()]
    states = [trial_state(t) for t in trials]
    assert states[-1] == "INTERRUPTED" and states[:-1] == ["COMPLETE"] * (len(states) - 1) and len(states) <= 2
    cut = trials[-1].number
    parent, status = _statuses(spec)
    assert parent == "KILLED" and status[cut] == "KILLED"
    _rerun(path)
    trials = _study(spec).trials
    assert sorted(trial_state(t) for t in trials) == ["COMPLETE", "COMPLETE", "INTERRUPTED"]
    retry = next(t for t in trials if t.user_attrs.get("bstune.retry_of") is not None)
    assert retry.user_attrs["bstune.retry_of"] == cut and retry.params == trials[cut].params
    assert trial_state(retry) == "COMPLETE"


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_ends_cleanly_as_ctrl_c_does(tmp_path: Path, sig: int, code: int) -> None:
    """SIGTERM (SLURM, docker stop, Kubernetes) ends a study as Ctrl-C does, with the shell's exit code; and
    Ctrl-C works on a study started with SIGINT ignored (a script's `bstune study ... &`)."""
    path = _slow_spec(tmp_path, trials=2)
    spec = load_spec(path)
    exit_code, out = _stopped_mid_trial(path, sig, sigint_ignored=True)
    assert exit_code == code, out
    assert "Traceback" not in out and "INTERRUPTED" in out, out
    trials = _study(spec).trials  # the first may be done by the time the signal comes, on a fast machine
    done, (cut, queued) = trials[:-2], trials[-2:]
    assert [trial_state(t) for t in done] == ["COMPLETE"] * len(done) and len(done) <= 1
    assert [(trial_state(t), t.state) for t in (cut, queued)] == [("INTERRUPTED", TrialState.FAIL),
                                                                  ("WAITING", TrialState.WAITING)]
    parent, status = _statuses(spec)
    assert parent == "KILLED" and status[cut.number] == "KILLED"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["start_trial", "end_trial"])
def test_ctrl_c_outside_training_loses_no_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A Ctrl-C that lands in MLflow's start or end of a trial's run (not in train()) is handled as in training:
    the trial INTERRUPTED, its MLflow run closed, its config queued again; the re-run completes the study. (On
    a SQLite store the trainer's side of a trial's run is its spool, `SpooledRuns`: the signal lands there.)"""
    from bstune.run_spool import SpooledRuns as Tracker

    spec = load_spec(write_spec(tmp_path, **{"budget": {"trials": 2}}))
    real = getattr(Tracker, where)
    calls = []

    def ctrl_c_once(self, *args, **kwargs):  # the signal arrives as the first trial's run starts or ends
        calls.append(args)
        if len(calls) == 1 and where == "start_trial":
            raise KeyboardInterrupt
        out = real(self, *args, **kwargs)
        if len(calls) == 1:
            raise KeyboardInterrupt  # end_trial: after the run was marked FINISHED
        return out

    monkeypatch.setattr(Tracker, where, ctrl_c_once)
    result = run_study(spec)
    assert result.interrupted
    (t,) = _study(spec).trials[:1]
    assert t.state == TrialState.FAIL and trial_state(t) == "INTERRUPTED"
    waiting = [w for w in _study(spec).trials if w.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs["bstune.retry_of"] == 0
    assert waiting[0].system_attrs["fixed_params"] == t.params, "queued with the interrupted trial's config"
    _, _, children = _runs(spec)
    # closed as KILLED, not left FINISHED or RUNNING; made and closed if the signal came before it was made
    assert [(r.info.status, r.data.tags["bstune.state"]) for r in children] == [("KILLED", "INTERRUPTED")]
    monkeypatch.setattr(Tracker, where, real)
    rerun = run_study(spec)
    assert not rerun.interrupted and rerun.spent.trials == 2
    trials = _study(spec).trials
    assert [trial_state(x) for x in trials] == ["INTERRUPTED", "COMPLETE", "COMPLETE"]
    assert trials[1].params == t.params, "the retry ran first, with the interrupted trial's config"


@pytest.mark.slow
def test_ctrl_c_before_the_first_trial_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while a study opens (its stores, its data) exits as the shell would, with one line, not click's
    'Aborted!' and exit code 1."""
    import bstune.search.checks

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bstune.search.checks, "load_dataset", ctrl_c)
    out = CliRunner().invoke(main, ["study", str(write_spec(tmp_path))])
    assert out.exit_code == 130, out.output
    assert "interrupted (Ctrl-C)" in out.output and "Aborted" not in out.output


@pytest.mark.slow
def test_ctrl_c_while_a_trial_is_asked_leaves_it_a_closed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between a trial's ask and its point: INTERRUPTED in Optuna and in its MLflow run (made and closed
    KILLED), so every ended trial has its one run; the re-run finishes the study whole."""
    from bstune.search.space import SearchSpace
    from tests.chaos import check_consistent

    spec = load_spec(write_spec(tmp_path, **{"budget": {"trials": 2}}))
    real = SearchSpace.suggest

    def ctrl_c(self, trial):
        raise KeyboardInterrupt

    monkeypatch.setattr(SearchSpace, "suggest", ctrl_c)
    assert run_study(spec).interrupted
    (t,) = _study(spec).trials
    assert t.state == TrialState.FAIL and trial_state(t) == "INTERRUPTED"
    _, _, children = _runs(spec)
    assert [(r.info.status, r.data.tags["bstune.state"]) for r in children] == [("KILLED", "INTERRUPTED")]
    monkeypatch.setattr(SearchSpace, "suggest", real)
    run_study(spec)
    check_consistent(spec, 2)


@pytest.mark.slow
def test_a_study_process_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    """Every study, worker and re-run is a process that imports before it trains: scikit-learn (the digits
    come from its file), matplotlib (the plots are the report's) and torch._dynamo (bstune's own training never
    compiles unless asked) cost ~5 s of CPU together and are left out of a default study's."""
    path = write_spec(tmp_path, **{"workload.dataset": "digits", "workload.n_train": 300, "budget.trials": 2,
                                   "search.pruner": "none"})
    code = ("import sys\nfrom bstune.cli import main\n"
            f"try:\n    main(['study', {str(path)!r}])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('loaded:', sorted(m for m in ('sklearn', 'matplotlib', 'torch._dynamo') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "loaded: []" in run.stdout, run.stdout[-2000:]
