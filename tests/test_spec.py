"""Bad input: one line naming the field and the fix, exit code 2, no traceback, nothing created."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bstune.cli import main
from bstune.errors import first_line
from bstune.spec import load_spec
from tests.conftest import small_spec

pytestmark = pytest.mark.fresh_stores  # these tests check what is created, and when

BAD_SPECS = [
    # (overrides, words the one-line message must contain)
    ({"workload.datset": "digits"}, ["workload.datset", "did you mean 'dataset'"]),
    ({"workload.epochs": "ten"}, ["workload.epochs", "integer"]),
    ({"search.lr": {"low": 1.0, "high": 0.01}}, ["search.lr", "swap"]),
    ({"search.lr": {"low": -0.1, "high": 1.0}}, ["search.lr.low", "> 0"]),
    ({"search.lr": {"low": 0.0, "high": 1.0}}, ["search.lr.low", "> 0"]),
    ({"search.momentum": {"low": 0.0, "high": 1.0}}, ["search.momentum", "[0, 1)"]),
    ({"search.momentum": {"low": -0.5, "high": 0.9}}, ["search.momentum", "[0, 1)"]),
    ({"search.batch_sizes": [16, 0]}, ["search.batch_sizes[1]", "positive integers"]),
    ({"search.batch_sizes": [16, 2.5]}, ["search.batch_sizes[1]", "positive integers"]),
    ({"search.batch_sizes": {"min": 512, "max": 16}}, ["search.batch_sizes", "swap"]),
    ({"workload.dataset": "imagenet"}, ["workload.dataset", "digits, cifar10, synthetic"]),
    ({"search.sampler": "tpee"}, ["search.sampler.name", "did you mean 'tpe'"]),
    ({"search.pruner": {"name": "medain"}}, ["search.pruner.name", "did you mean 'median'"]),
    ({"budget": {"trails": 3}}, ["budget.trails", "did you mean 'trials'"]),
    ({"budget": {}}, ["budget", "no limit"]),
    ({"workload.optimizer": "sgdd"}, ["workload.optimizer", "did you mean 'sgd'"]),
    ({"storage": "notaurl"}, ["storage: 'notaurl' is not a database URL", "sqlite:///"]),
    ({"storage": "postgresql://u:pw@127.0.0.1:port/db"}, ["storage: 'postgresql://u:***@", "not a database URL"]),
    ({"storage": "sqlite://optuna.db"}, ["storage: 'sqlite://optuna.db' names no file", "sqlite:///"]),
    ({"tracking_uri": "sqlite://"}, ["tracking_uri: 'sqlite://' names no file", "sqlite:///"]),
    ({"storage": "http://127.0.0.1:5000"}, ["storage: 'http://127.0.0.1:5000' is not a database URL", "'http'"]),
    # checked against the data: synthetic n_train 600, a fifth held out for validation
    ({"search.batch_sizes": [16, 1024]}, ["bad.yaml: search.batch_sizes", "[1024]", "training set (480"]),
    ({"workload.accumulation_steps": 3}, ["bad.yaml: search.batch_sizes", "[16, 64] not divisible"]),
    ({"workload.dataset": "cifar10", "workload.model": "cnn", "workload.data_dir": "/nonexistent/bstune"},
     ["bad.yaml: workload.data_dir", "no CIFAR-10 data", "download"]),
]


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def _no_state(tmp_path: Path) -> None:
    assert not (tmp_path / "optuna.db").exists(), "an Optuna storage was created for bad input"
    assert not (tmp_path / "mlflow.db").exists(), "an MLflow store was created for bad input"


@pytest.mark.parametrize("overrides,words", BAD_SPECS, ids=[w[0] for _, w in BAD_SPECS])
@pytest.mark.parametrize("command", ["validate", "study"])
def test_bad_spec_is_one_line_exit_2(tmp_path: Path, overrides: dict, words: list[str], command: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(small_spec(tmp_path, **overrides)))
    code, out = _run([command, str(path)])
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert "Traceback" not in out
    _no_state(tmp_path)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    code, out = _run(["study", str(tmp_path / "nope.yaml")])
    assert code == 2 and "no such file" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nworkload:\n  epochs: 3\n   model: mlp\n")
    code, out = _run(["validate", str(bad)])
    assert code == 2 and "invalid YAML" in out and "line 4" in out, out


# Nothing listens on port 1: the connection is refused at once. MLflow alone retries a database that does
# not answer for about two minutes, printing as it goes.
@pytest.mark.parametrize(("field", "url", "start"), [
    ("storage", "postgresql://bstune:s3cret@127.0.0.1:1/bstune", "error: storage: cannot connect"),
    ("tracking_uri", "postgresql://bstune:s3cret@127.0.0.1:1/x", "error: tracking_uri: cannot connect"),
    ("tracking_uri", "http://127.0.0.1:1",
     "error: tracking_uri: cannot reach the MLflow store at http://127.0.0.1:1 (Connection refused);"),
], ids=["storage-database", "tracking-database", "tracking-server"])
def test_unreachable_store_is_one_line(tmp_path: Path, field: str, url: str, start: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(small_spec(tmp_path, **{field: url})))
    code, out = _run(["study", str(path)])
    assert code == 2, out
    assert out.startswith(start) and out.count("\n") == 1, out
    if "s3cret" in url:
        assert "s3cret" not in out and "***" in out, out
    _no_state(tmp_path)


def test_missing_storage_folder(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(small_spec(tmp_path, storage=f"sqlite:///{tmp_path}/no/such/dir/o.db")))
    code, out = _run(["study", str(path)])
    assert code == 2 and "storage: folder" in out and "does not exist" in out, out
    _no_state(tmp_path)


@pytest.mark.slow
def test_console_script_exits_2_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(small_spec(tmp_path, **{"search.lr": {"low": 2, "high": 1}})))
    proc = subprocess.run([sys.executable, "-m", "bstune.cli", "study", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    _no_state(tmp_path)


def test_validate_names_what_it_checked(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(small_spec(tmp_path, **{"search.batch_sizes": [32], "budget.examples": 1234567,
                                                             "search.momentum": {"low": 0.9, "high": 0.9}})))
    code, out = _run(["validate", str(path)])
    assert code == 0, out
    assert "synthetic/mlp (480 training examples)" in out and "momentum 0.9 (held)" in out, out
    assert "budget: trials 6, examples 1,234,567\n" in out and "None" not in out, out
    assert "analyze` needs 2 or more batch sizes" in out, out
    _no_state(tmp_path)


def test_shipped_specs_validate() -> None:
    for path in sorted(Path("studies").glob("*.yaml")):
        spec = load_spec(path)
        assert spec.name and spec.search.batch_sizes, path


def test_powers_of_two_range_and_numbers_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nsearch:\n  batch_sizes: {min: 10, max: 100}\n  lr: {low: 1e-4, high: 1e-1}\n"
                    "budget: {trials: 2}\n")
    spec = load_spec(path)
    assert spec.search.batch_sizes == (16, 32, 64)
    assert spec.search.lr == (1e-4, 1e-1)
    assert spec.search.direction == "minimize"


def test_first_line_quotes_whole_words_and_buried_os_errors() -> None:
    cut = first_line(ValueError("postgresql://u:pw@h/db " + "abcdefg " * 40), limit=60)
    assert cut.endswith("abcdefg ...") and len(cut) <= 64 and "pw" not in cut, cut
    buried = ValueError("HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: /api/x (Caused by "
                        "NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f>: Failed to establish "
                        "a new connection: [Errno 111] Connection refused'))")
    assert first_line(buried, limit=100) == "Connection refused"
    assert first_line(ValueError("abc def"), limit=3) == "abc ..."  # a word ending at the limit is kept
    missing = OSError("x" * 300 + " [Errno 2] No such file or directory: '/data/x.db'")
    assert first_line(missing) == "No such file or directory: '/data/x.db'"


def test_first_line_quotes_why_optunas_commit_failed() -> None:
    import sqlite3

    import optuna

    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e
    except optuna.exceptions.StorageInternalError as wrapped:
        assert first_line(wrapped) == "database or disk is full"
