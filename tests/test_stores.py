"""The stores checked for what they are (an Optuna database, an MLflow database; sound, writable, not each
other) before anything is written, each problem one line; and what a study does with a missing store."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bstune.cli import main
from bstune.errors import BstuneError
from bstune.stores import MLFLOW, check_sqlite_store, creating, load_study, open_storage
from tests import prefork
from tests.conftest import read_only_folder, small_spec, write_spec

pytestmark = pytest.mark.fresh_stores  # these tests check what is created, and when

TINY = {"workload.epochs": 1, "workload.n_train": 200, "search.pruner": "none", "budget.trials": 2}
SQLITE = "sqlite:///{}/optuna.db"  # the tests of SQLite files name theirs (BSTUNE_TEST_STORAGE may say journal)


def _run(*args: str) -> tuple[int, str]:
    out = CliRunner().invoke(main, list(args))
    return out.exit_code, out.output


def _one_line_error(code: int, out: str, *expect: str) -> None:
    assert code == 2 and "Traceback" not in out, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(e in lines[0] for e in expect), out


def _digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "" for p in paths]


@pytest.mark.slow  # real studies and subprocesses
def test_a_garbled_optuna_database_is_one_line_everywhere(tmp_path: Path) -> None:
    path = write_spec(tmp_path, storage=SQLITE.format(tmp_path), **TINY)
    assert _run("study", str(path))[0] == 0
    db = tmp_path / "optuna.db"
    data = bytearray(db.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = os.urandom(4096)  # garbage in the middle: the header is fine
    db.write_bytes(bytes(data))
    for command in (["validate"], ["study"], ["status"], ["analyze", "--no-mlflow", "--json", "-"]):
        _one_line_error(*_run(command[0], str(path), *command[1:]), f"storage: {db} is not a sound SQLite database")
    db.write_bytes(os.urandom(8192))  # garbage throughout
    _one_line_error(*_run("validate", str(path)), "file is not a database")


@pytest.mark.slow  # real studies and subprocesses
def test_swapped_stores_are_refused_before_either_is_written(tmp_path: Path) -> None:
    path = write_spec(tmp_path, storage=SQLITE.format(tmp_path), **TINY)
    assert _run("study", str(path))[0] == 0
    optuna_db, mlflow_db = tmp_path / "optuna.db", tmp_path / "mlflow.db"
    before = _digest(optuna_db, mlflow_db)
    swapped = ["--storage", f"sqlite:///{mlflow_db}", "--tracking-uri", f"sqlite:///{optuna_db}"]
    _one_line_error(*_run("study", str(path), *swapped), f"storage: {mlflow_db} is an MLflow tracking store",
                    "swapped?")
    _one_line_error(*_run("study", str(path), "--tracking-uri", f"sqlite:///{optuna_db}"),
                    f"tracking_uri: {optuna_db} is an Optuna storage, not an MLflow tracking store")
    assert _digest(optuna_db, mlflow_db) == before, "nothing was written to either"
    spec = small_spec(tmp_path, **TINY) | {"storage": f"sqlite:///{mlflow_db}"}
    path.write_text(yaml.safe_dump(spec))
    _one_line_error(*_run("validate", str(path)), "swapped?")


@pytest.mark.slow  # real studies and subprocesses
def test_a_read_only_store_folder_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    folder = tmp_path / "stores"
    folder.mkdir()
    path = write_spec(tmp_path, **TINY, storage=f"sqlite:///{folder}/optuna.db",
                      tracking_uri=f"sqlite:///{folder}/mlflow.db")
    with read_only_folder(folder):
        _one_line_error(*_run("validate", str(path)), f"storage: {folder} is read-only")
        _one_line_error(*_run("study", str(path)), f"storage: {folder} is read-only")
    assert list(folder.iterdir()) == []


@pytest.mark.slow  # real studies and subprocesses
def test_a_lost_tracking_store_is_said_in_one_line(tmp_path: Path) -> None:
    """The MLflow store deleted while the Optuna storage stays: the study goes on with a new parent run, and
    says which trials MLflow no longer has."""
    path = write_spec(tmp_path, **TINY)
    assert _run("study", str(path))[0] == 0
    (tmp_path / "mlflow.db").unlink()
    path.write_text(yaml.safe_dump(small_spec(tmp_path, **TINY | {"budget.trials": 3})))
    # in a process of its own: this one's MLflow keeps the deleted file open
    done = prefork.run([sys.executable, "-m", "bstune.cli", "study", str(path)], capture_output=True, text=True,
                       timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    (warning,) = [line for line in out.splitlines() if line.startswith("warning:")]
    assert "MLflow parent run" in warning and "the 2 trials run before it are in the Optuna storage only" in warning


@pytest.mark.slow  # real studies and subprocesses
def test_the_default_store_folder_is_made_and_only_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec copied into a fresh folder, naming no stores: mlruns/ is made. A named folder that is not there
    stays an error (it is usually a typo)."""
    spec = {k: v for k, v in small_spec(tmp_path, **TINY).items() if k not in ("storage", "tracking_uri")}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    code, out = _run("validate", "spec.yaml")
    assert code == 0 and not (tmp_path / "mlruns").exists(), out
    code, out = _run("study", "spec.yaml")
    assert code == 0, out
    assert (tmp_path / "mlruns" / "optuna.db").exists() and (tmp_path / "mlruns" / "mlflow.db").exists()
    _one_line_error(*_run("study", "spec.yaml", "--storage", f"sqlite:///{tmp_path}/typo/optuna.db"),
                    f"folder {tmp_path}/typo does not exist")


def test_a_store_another_study_is_creating_is_checked_once_it_is_made(tmp_path: Path) -> None:
    """Two studies started at once: the second's check of a store the first is creating (its tables half made,
    under `creating`'s lock) waits for the first, then finds the whole store."""
    url = f"sqlite:///{tmp_path}/mlflow.db"
    outcome: list[str] = []

    def check() -> None:
        try:
            check_sqlite_store(url, "tracking_uri", MLFLOW)
            outcome.append("ok")
        except BstuneError as e:
            outcome.append(str(e))

    with creating(url):
        db = sqlite3.connect(tmp_path / "mlflow.db")
        db.execute("CREATE TABLE alembic_version (version_num TEXT)")
        db.commit()
        other = threading.Thread(target=check)
        other.start()
        time.sleep(0.2)
        assert not outcome  # it waits for the store to be made
        for table in ("experiments", "runs", "metrics"):
            db.execute(f"CREATE TABLE {table} (id INTEGER)")
        db.commit()
        db.close()
    other.join(timeout=10)
    assert outcome == ["ok"]
    # a file of other tables that nobody is creating is still an error, at once
    other_db = sqlite3.connect(tmp_path / "other.db")
    other_db.execute("CREATE TABLE mine (x)")
    other_db.commit()
    other_db.close()
    with pytest.raises(BstuneError, match="holds other tables"):
        check_sqlite_store(f"sqlite:///{tmp_path}/other.db", "tracking_uri", MLFLOW)
    # nor does the process that holds the lock itself wait (on itself) for a file of other tables
    outcome.clear()
    url = f"sqlite:///{tmp_path}/other.db"

    def create_and_check() -> None:
        with creating(url):
            check()

    own = threading.Thread(target=create_and_check, daemon=True)
    own.start()
    own.join(timeout=10)
    assert len(outcome) == 1 and "holds other tables" in outcome[0]


@pytest.mark.slow  # real studies and subprocesses
def test_two_studies_started_at_once_on_fresh_stores_both_run(tmp_path: Path) -> None:
    path = write_spec(tmp_path, **TINY | {"budget.trials": 4})
    cmd = [sys.executable, "-m", "bstune.cli", "study", str(path)]
    procs = [prefork.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("Traceback" in out or "migration" in out for out in outs), outs


def test_a_table_read_with_only_what_it_holds_is_the_full_read(tmp_path: Path) -> None:
    """`load_table` reads a study's trials with a few plain queries (memory that scales); the table is the one
    Optuna's full trials give, state by state (a lost trial, a pruned one without a value, a waiting one)."""
    import json

    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from bstune.search._optuna import trial_summaries
    from bstune.search.status import read_status
    from bstune.spec import load_spec
    from bstune.stores import load_study, load_table
    from bstune.trials import from_study, tally

    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="small", storage=url)
    dists = {"batch_size": CategoricalDistribution([16, 64]), "lr": FloatDistribution(1e-3, 1.0, log=True)}
    curve = json.dumps([{"epoch": 1, "value": 2.0, "optimizer_steps": 8, "examples_seen": 128}])
    for n, (state, value, extra) in enumerate([(TrialState.COMPLETE, 1.5, {"bstune.state": "COMPLETE"}),
                                               (TrialState.PRUNED, None, {"bstune.state": "DIVERGED"}),
                                               (TrialState.FAIL, None, {"bstune.state": "LOST"}),
                                               (TrialState.COMPLETE, float("inf"), {})]):
        study.add_trial(create_trial(state=state, value=value, params={"batch_size": [16, 64][n % 2], "lr": 0.1},
                                     distributions=dists, intermediate_values={1: 2.0},
                                     user_attrs={"lr": 0.1, "momentum": 0.5, "curve": curve, "examples_seen": 128,
                                                 "train_seconds": 0.25, **extra}))
    study.enqueue_trial({"batch_size": 16})
    full = from_study(load_study(url, "small"))
    assert load_table(url, "small").records == full.records and len(full.records) == 4
    light = trial_summaries(study, ("bstune.state", "examples_seen", "train_seconds"))
    assert tally(light) == tally(study.trials)
    spec = load_spec(write_spec(tmp_path)).with_overrides(storage=url)
    assert read_status(load_study(url, "small"), spec).states.counts == {"COMPLETE": 2, "DIVERGED": 1, "LOST": 1,
                                                                          "WAITING": 1}


def test_a_store_being_created_is_read_once_its_creator_is_done(tmp_path: Path) -> None:
    # `bstune status` (or a poller) opening the store while a study creates it would create its tables a
    # second time, under the creator's feet: it waits for the create lock, then finds the study
    import optuna

    url = f"sqlite:///{tmp_path}/optuna.db"
    made = threading.Event()

    def create() -> None:
        with creating(url):
            storage = open_storage(url)
            made.set()
            time.sleep(0.5)
            optuna.create_study(study_name="s", storage=storage)

    creator = threading.Thread(target=create)
    creator.start()
    made.wait(30)
    assert load_study(url, "s").study_name == "s"
    creator.join()
