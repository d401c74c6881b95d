"""The trial runs' spool and writer process (bstune.run_spool): applied in order, once in effect, whoever dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from bstune.run_spool import SpooledRuns, apply_pending, repair_orphans, settle_trial, spool_folder
from bstune.tracking import Tracker

pytestmark = pytest.mark.slow  # a real MLflow store (its tables take seconds to make) and writer processes


def _tracker(tmp_path: Path) -> tuple[Tracker, str]:
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "spool")
    parent = tracker.open_study_run("s", None, {}, "name: s\n")
    return tracker, parent


def _spool_two_trials(runs: SpooledRuns, parent: str) -> None:
    for tid in (7, 8):
        handle = runs.start_trial(parent, "s", tid, tid, {"lr": 0.1, "batch_size": 16})
        for epoch in (1, 2):
            runs.log_epoch(handle, epoch, {"val_loss": 1.0 / epoch})
        runs.end_trial(handle, "COMPLETE", "", {"final_val_loss": 0.5})


def _check_two_runs(tracker: Tracker, parent: str) -> None:
    runs = tracker.trial_runs(parent)
    assert sorted(r.data.tags["optuna.trial_id"] for r in runs) == ["7", "8"], "one run per trial"
    for r in runs:
        assert (r.info.status, r.data.tags["bstune.state"], r.data.params["lr"]) == ("FINISHED", "COMPLETE", "0.1")
        history = tracker.client.get_metric_history(r.info.run_id, "val_loss")
        assert sorted(m.step for m in history) == [1, 2], "each epoch's metric once"


def test_a_dead_workers_spool_is_applied_once_however_often_it_is_repaired(tmp_path: Path) -> None:
    tracker, parent = _tracker(tmp_path)
    folder = spool_folder(tracker.uri, "spool", "s")
    runs = SpooledRuns(folder, tracker)
    runs._start_writer = lambda: None  # no writer: as if the worker died before its writer applied anything
    _spool_two_trials(runs, parent)
    log = runs.log
    assert repair_orphans(folder, tracker) == set(), "a live worker's spool is not touched"
    runs._owner.close()  # the worker dies: its owner lock is freed
    apply_pending(log, tracker, {}, fresh=False)
    log.with_suffix(".pos").write_text("0 0")  # killed before the position was recorded: all applied again
    assert repair_orphans(folder, tracker) == {7, 8}, "the trials that ended in it, for the caller to settle"
    assert not log.exists(), "a repaired spool is removed"
    _check_two_runs(tracker, parent)


def _ready(runs: SpooledRuns) -> None:
    """Wait until the writer says it is ready (MLflow imported: seconds on a loaded machine)."""
    end = time.monotonic() + 120
    while not runs._ready and time.monotonic() < end:
        runs._read_run_ids()
        time.sleep(0.05)
    assert runs._ready, "the writer started"


def test_a_short_study_applies_its_spool_itself_and_starts_no_writer(tmp_path: Path) -> None:
    tracker, parent = _tracker(tmp_path)
    runs = SpooledRuns(spool_folder(tracker.uri, "spool", "s"), tracker)
    runs.start_after = 1e9
    _spool_two_trials(runs, parent)
    assert runs.run_id(8, wait=True) and runs._writer is None, "no writer to wait for: applied here"
    runs.close()
    assert not runs.log.exists()
    _check_two_runs(tracker, parent)


def test_the_writer_process_killed_midway_is_restarted_and_loses_nothing(tmp_path: Path) -> None:
    tracker, parent = _tracker(tmp_path)
    runs = SpooledRuns(spool_folder(tracker.uri, "spool", "s"), tracker)
    runs._start_writer()
    _ready(runs)
    handle = runs.start_trial(parent, "s", 7, 7, {"lr": 0.1, "batch_size": 16})
    assert runs.run_id(handle, wait=True), "the writer reports the run it made"
    os.kill(runs._writer.pid, signal.SIGKILL)
    runs._writer.wait()
    for epoch in (1, 2):  # the first line after the kill starts a new writer, which takes up the spool
        runs.log_epoch(handle, epoch, {"val_loss": 1.0 / epoch})
    _ready(runs)
    runs.end_trial(handle, "COMPLETE", "", {"final_val_loss": 0.5})
    handle = runs.start_trial(parent, "s", 8, 8, {"lr": 0.1, "batch_size": 16})
    for epoch in (1, 2):
        runs.log_epoch(handle, epoch, {"val_loss": 1.0 / epoch})
    runs.end_trial(handle, "COMPLETE", "", {"final_val_loss": 0.5})
    start = time.monotonic()
    runs.close()
    assert time.monotonic() - start < 60 and not runs.log.exists(), "closed: applied, then removed"
    _check_two_runs(tracker, parent)


def test_a_trial_settled_elsewhere_before_its_spooled_start_is_applied_keeps_one_run(tmp_path: Path) -> None:
    """A live worker's start waits in its spool for up to a few seconds (its writer writes a short run whole). If
    the trial is declared lost meanwhile, another worker settles it and makes its run: the writer then uses that
    run, without the look-up it skips once it knows no other applier wrote its spool."""
    tracker, parent = _tracker(tmp_path)
    folder = spool_folder(tracker.uri, "spool", "s")
    runs = SpooledRuns(folder, tracker)
    runs._start_writer = lambda: None
    handle = runs.start_trial(parent, "s", 7, 7, {"lr": 0.1, "batch_size": 16})
    runs.log_epoch(handle, 1, {"val_loss": 1.0})
    settle_trial(folder, Tracker(tracker.uri, "spool"), parent, "s", 7, 7, "LOST", "no heartbeat")  # elsewhere
    apply_pending(runs.log, tracker, {}, fresh=True)
    runs.settle_trial(parent, "s", 7, 7, "LOST", "no heartbeat")  # the worker finds its trial taken away
    runs.close()
    (run,) = tracker.trial_runs(parent, 7)
    assert (run.info.status, run.data.tags["bstune.state"], run.data.params["lr"]) == ("KILLED", "LOST", "0.1")
    assert [m.step for m in tracker.client.get_metric_history(run.info.run_id, "val_loss")] == [1]
