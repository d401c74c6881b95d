"""Whole studies of a user's own workload: a model and data set by entry point on bstune's trainer, and a
training loop of one's own; every trial a finished MLflow child run, and `bstune analyze` fits lr* at each
batch size. Also bstune's Python API with callables, as docs/own-model.md shows it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner

from bstune.cli import main
from bstune.trials import State

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

HERE = Path(__file__).parent


def _spec(tmp_path: Path, name: str, workload: dict, trials: int = 18, pruner: str = "median",
          batch_sizes: tuple[int, ...] = (8, 16, 32)) -> Path:
    shutil.copy(HERE / "own_workload.py", tmp_path / "wine.py")
    spec = {
        "name": name,
        "workload": {"epochs": 3, **workload},
        "search": {"batch_sizes": list(batch_sizes), "lr": {"low": 0.003, "high": 1.0},
                   "sampler": {"name": "tpe", "n_startup_trials": 2},
                   "pruner": {"name": pruner, "n_startup_trials": 2, "n_warmup_epochs": 1}},
        "budget": {"trials": trials},
        "storage": f"sqlite:///{tmp_path}/optuna.db",
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _child_runs(tmp_path: Path, study: str) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["bstune"], output_format="list")
    return [r for r in runs if r.data.tags.get("bstune.study") == study and "mlflow.parentRunId" in r.data.tags]


def _study_and_analysis(path: Path, name: str, trials: int) -> tuple[list, str]:
    r = CliRunner().invoke(main, ["study", str(path)])
    assert r.exit_code == 0, r.output
    children = _child_runs(path.parent, name)
    assert len(children) == trials
    assert all(c.info.status in ("FINISHED", "FAILED") for c in children)  # ended, none left RUNNING
    assert all(c.data.tags.get("bstune.state") in set(State) for c in children)
    a = CliRunner().invoke(main, ["analyze", str(path), "--json", "-", "--no-mlflow"])
    assert a.exit_code == 0, a.output
    return children, a.output


def _fitted_batch_sizes(output: str) -> set[int]:
    table = output.split("Optimum per batch size")[1].split("Fits of lr*(B)")[0]
    return {int(m[1]) for m in re.finditer(r"^\s+(\d+)\s+\d+\s+\d+\s+\d+\s+\S+\s+([\d.e-]+)\s", table, re.M)}


def test_a_users_model_and_data_run_as_a_study_and_analyze_fits_lr_star(tmp_path: Path) -> None:
    path = _spec(tmp_path, "wine", {"model": "wine.py:model", "dataset": "wine.py:data"})
    children, output = _study_and_analysis(path, "wine", 18)
    done = [c for c in children if c.data.tags["bstune.state"] == State.COMPLETE]
    assert done and all("val_accuracy" in c.data.metrics and "weight_distance" in c.data.metrics for c in done)
    assert children[0].data.params["model"] == f"{tmp_path.resolve()}/wine.py:model"
    assert _fitted_batch_sizes(output) == {8, 16, 32}


def test_a_training_loop_of_ones_own_runs_as_a_study(tmp_path: Path) -> None:
    path = _spec(tmp_path, "wine-loop", {"trainer": "wine.py:trainer"}, trials=12, pruner="none")
    children, output = _study_and_analysis(path, "wine-loop", 12)
    done = [c for c in children if c.data.tags["bstune.state"] == State.COMPLETE]
    assert done and all(c.data.metrics["examples_seen"] > 0 for c in done)
    assert _fitted_batch_sizes(output) == {8, 16, 32}


def test_a_loop_of_ones_own_is_pruned_and_an_error_in_it_fails_that_trial_only(tmp_path: Path) -> None:
    (tmp_path / "toy.py").write_text(
        "def trainer(trial):\n"
        "    if trial.lr > 0.3:\n"
        "        raise ValueError(f'lr {trial.lr:.3g} is too hot for me')\n"
        "    for epoch in range(1, trial.epochs + 1):\n"
        "        trial.report(epoch, trial.lr + 1.0 / epoch, examples=100 * epoch)\n"
        "        if trial.should_stop():\n"
        "            break\n")
    path = _spec(tmp_path, "toy", {"trainer": "toy.py:trainer", "epochs": 4}, trials=10,
                 batch_sizes=(8,))
    r = CliRunner().invoke(main, ["study", str(path)])
    assert r.exit_code == 0, r.output
    runs = _child_runs(tmp_path, "toy")
    states = {c.data.tags["bstune.state"]: c for c in runs}
    assert len(runs) == 10 and set(states) == {State.FAILED, State.COMPLETE, State.PRUNED}, set(states)
    assert "ValueError: lr" in states[State.FAILED].data.tags["bstune.reason"]
    done = states[State.COMPLETE]  # the last value reported is the objective; every report logged
    lr = float(done.data.params["lr"])
    assert done.data.metrics["final_objective"] == pytest.approx(lr + 0.25)
    assert done.data.metrics["examples_seen"] == 400


def test_the_python_api_example_in_the_docs_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (HERE.parent / "docs" / "own-model.md").read_text()
    code = re.search(r"```python\n(.*?)```", text.split("## From Python")[1], re.S)[1]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/own-model.md", "exec"), scope)  # noqa: S102 - the documented example, as is
    result, analysis = scope["result"], scope["analysis"]
    assert result.spent.trials == 8 and not result.interrupted
    assert {o.batch_size for o in analysis.per_batch if o.lr is not None} == {16, 64}
    assert (tmp_path / "mlruns" / "mlflow.db").exists()


def test_sigterm_interrupts_a_loop_of_ones_own_and_the_study_resumes(tmp_path: Path) -> None:
    import signal

    from bstune.spec import load_spec
    from tests.test_study import _rerun, _start, _statuses, _study, _wait_for_running_trial

    (tmp_path / "sleepy.py").write_text(
        "import time\n"
        "def trainer(trial):\n"
        "    for epoch in range(1, trial.epochs + 1):\n"
        "        time.sleep(0.3)  # an epoch of training\n"
        "        trial.report(epoch, 1.0 / epoch + trial.lr, examples=100 * epoch)\n"
        "        if trial.should_stop():\n"
        "            break\n")
    path = _spec(tmp_path, "sleepy", {"trainer": "sleepy.py:trainer", "epochs": 20}, trials=2, pruner="none",
                 batch_sizes=(8,))
    spec = load_spec(path)
    proc = _start(path)
    _wait_for_running_trial(spec, proc, min_done=0)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    interrupted = [t for t in _study(spec).trials if t.user_attrs.get("bstune.state") == State.INTERRUPTED]
    assert len(interrupted) == 1
    assert _statuses(spec)[1][interrupted[0].number] == "KILLED"
    _rerun(path)
    retry = [t for t in _study(spec).trials if t.user_attrs.get("bstune.retry_of") == interrupted[0].number]
    assert len(retry) == 1 and retry[0].user_attrs["bstune.state"] == State.COMPLETE
    assert retry[0].params == interrupted[0].params
