"""Shared fixtures: every test gets its own real Optuna storage and MLflow store under tmp_path."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

# BLAS on one thread (set before numpy loads it), in this process and the studies it starts: the suite runs as two
# processes on two cores (-n 2), and the analysis' small matrices gain nothing from a second thread that only
# waits on a busy core (bstune's CLI holds the analysis to one the same way).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

warnings.filterwarnings("ignore", module="optuna")
for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)


# The Optuna storage of small_spec's studies: SQLite, or with BSTUNE_TEST_STORAGE=journal a journal file (the
# suite's studies run on either; tests that name optuna.db themselves stay on SQLite).
STORAGE = {"sqlite": "sqlite:///{}/optuna.db", "journal": "journal:///{}/optuna.journal"}[
    os.environ.get("BSTUNE_TEST_STORAGE", "sqlite")]


def small_spec(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A study that runs in seconds: synthetic data, a small MLP, 3 epochs, two batch sizes."""
    spec: dict[str, Any] = {
        "name": "small",
        "workload": {"dataset": "synthetic", "n_train": 600, "model": "mlp", "width": 32, "epochs": 3,
                     "optimizer": "sgd", "lr_schedule": "cosine"},
        "search": {"batch_sizes": [16, 64], "lr": {"low": 0.01, "high": 1.0},
                   "momentum": {"low": 0.0, "high": 0.9},
                   "sampler": {"name": "tpe", "n_startup_trials": 2},
                   "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_epochs": 1}},
        "budget": {"trials": 6},
        "storage": STORAGE.format(tmp_path),
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "heartbeat_seconds": 1,
    }
    for key, value in overrides.items():
        node = spec
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return spec


def write_spec(tmp_path: Path, **overrides: Any) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(small_spec(tmp_path, **overrides), sort_keys=False))
    return path


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    return write_spec(tmp_path)


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on 2 shared cores: a second intra-op thread only waits for the first (~10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(name="one_thread")
def _one_thread_fixture() -> Iterator[None]:
    """`one_thread` for a whole test: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with one_thread():
        yield


@contextmanager
def read_only_folder(folder: Path) -> Iterator[None]:
    """``folder`` read-only within the block (root writes through file modes: for it, an immutable folder;
    skips the test where that cannot be made)."""
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("cannot make a folder read-only for root here (chattr +i)")
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


@pytest.fixture(scope="session")
def _empty_tracking_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow store made once, as bstune makes one: each new store runs MLflow's schema migrations,
    seconds of CPU that would otherwise be paid by every test that runs a study."""
    from bstune.tracking import Tracker

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracker = Tracker(f"sqlite:///{db}")
    tracker.client.search_experiments(max_results=1)
    tracker.client._tracking_client.store.engine.dispose()  # closed: its WAL folded into the file
    return db


@pytest.fixture(autouse=True)
def _tracking_store(request: pytest.FixtureRequest) -> None:
    """tmp_path/mlflow.db (small_spec's tracking store) starts as a copy of the empty store, unless the test is
    marked `fresh_stores` (it checks what is created, and when)."""
    if "tmp_path" not in request.fixturenames or request.node.get_closest_marker("fresh_stores"):
        return
    target = request.getfixturevalue("tmp_path") / "mlflow.db"
    if not target.exists():
        shutil.copyfile(request.getfixturevalue("_empty_tracking_store"), target)


# The slow suite's longest tests, longest first (wall seconds on 2 idle cores, docs/ci-time.md). pytest-xdist's
# worksteal hands each worker a contiguous part of the list and later steals from their ends, so a long test late
# in the list starts last and runs alone: these go first, dealt to the workers' parts in turn.
LONGEST_FIRST = ("test_chaos_soak_of_sigkills_loses_nothing_and_counts_nothing_twice",
                 "test_four_workers_one_killed_run_exactly_the_budget",
                 "test_a_full_disk_under_the_stores_is_one_line_and_the_study_resumes",
                 "test_status_then_ctrl_c_stops_every_worker_cleanly",
                 "test_sigterm_to_a_launcher_started_in_the_background_stops_every_worker_cleanly",
                 "test_workers_of_a_sigkilled_launcher_stop_at_once",
                 "test_example_budget_is_overspent_by_at_most_the_trials_in_flight",
                 "test_ctrl_c_ends_cleanly_and_resumes",
                 "test_sigterm_interrupts_a_loop_of_ones_own_and_the_study_resumes",
                 "test_cli_report_writes_it_and_logs_it_to_the_parent_run",
                 "test_each_example_runs_as_a_short_study",
                 "test_the_fused_checks_hold_with_another_cpu_s_kernels",
                 "test_outputs_into_a_read_only_file_system_are_one_line",
                 "test_html_report_renders_with_its_plots")


@pytest.hookimpl(trylast=True)  # after `-m` has deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """LONGEST_FIRST at the heads of the parts pytest-xdist first deals its workers (len // workers left each),
    in turn; the other tests keep their order. Without xdist: the longest first."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    first = sorted((i for i in items if getattr(i, "originalname", i.name) in rank),
                   key=lambda i: rank[getattr(i, "originalname", i.name)])
    if not first:
        return
    rest = iter([i for i in items if getattr(i, "originalname", i.name) not in rank])
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    ordered: list[pytest.Item] = []
    left = len(items)
    for w in range(workers):
        size = left // (workers - w)
        part = first[w::workers]  # all of them, even where a small selection has more of them than room
        part += list(itertools.islice(rest, max(0, size - len(part))))
        ordered += part
        left -= size
    items[:] = ordered + list(rest)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The study processes' fork server (tests/prefork.py), if this process started one."""
    prefork = sys.modules.get("tests.prefork")
    if prefork is not None:
        prefork.stop_server()
