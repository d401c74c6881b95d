"""The journal storage (journal:/// URLs): heartbeats and stale trials, a lock freed with its holder, a log
that a writer killed mid-append leaves readable and appendable, and the store checks; real files, real
Optuna studies, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import FrozenTrial, TrialState

from bstune.cli import main
from bstune.errors import BstuneError
from bstune.search._beats import StaleTrials, heartbeat_ages, running_without_heartbeat
from bstune.search._journal import BEAT, FlockLock, open_journal
from bstune.search._optuna import set_trial_user_attrs
from bstune.stores import check_storage, load_study, open_storage
from tests.conftest import read_only_folder, write_spec

optuna.logging.set_verbosity(optuna.logging.ERROR)
# some check what is created; they ask() outside optimize(), as bstune does, which Optuna warns of
pytestmark = [pytest.mark.fresh_stores, pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")]


def _study(path: Path, heartbeat: int | None = 1, on_lost=None) -> optuna.Study:  # noqa: ANN001
    storage = open_journal(str(path), heartbeat, on_lost, 2 * heartbeat if heartbeat else None)
    return optuna.create_study(study_name="j", storage=storage, load_if_exists=True)


def _beat_at(study: optuna.Study, trial: optuna.Trial, when: float) -> None:
    study._storage.set_trial_system_attr(trial._trial_id, BEAT, when)


def test_stale_trials_are_the_running_ones_whose_beat_is_older_than_the_grace_period(tmp_path: Path) -> None:
    study = _study(tmp_path / "o.journal")  # heartbeat 1 s, grace 2 s
    fresh, old, done, silent = (study.ask() for _ in range(4))
    study._storage.record_heartbeat(fresh._trial_id)
    _beat_at(study, old, time.time() - 10)
    _beat_at(study, done, time.time() - 10)
    study.tell(done, 1.0)
    study._storage.record_heartbeat(done._trial_id)  # a beat after the end, as RDBStorage takes it: ignored
    study._storage.get_all_trials(study._study_id)  # (replaying it raises nothing here, nor later)
    # another process opening the same journal sees the same (the beats are in the file, not in memory)
    other = _study(tmp_path / "o.journal")
    assert other._storage._get_stale_trial_ids(other._study_id) == [old._trial_id]
    assert running_without_heartbeat(other) == [silent._trial_id]
    ages = heartbeat_ages(other)
    assert set(ages) == {fresh._trial_id, old._trial_id}
    assert 0 <= ages[fresh._trial_id] < 2 < 9 < ages[old._trial_id] < 20


def test_the_stale_check_fails_them_marks_them_and_runs_the_callback_once(tmp_path: Path) -> None:
    lost: list[FrozenTrial] = []
    study = _study(tmp_path / "o.journal", on_lost=lambda _s, t: lost.append(t))
    stale_one, alive = study.ask(), study.ask()
    _beat_at(study, stale_one, time.time() - 10)
    study._storage.record_heartbeat(alive._trial_id)
    check = StaleTrials(2.0, lambda t: {"bstune.state": "LOST", "number": t.number})
    check.fail(study)
    check.fail(_study(tmp_path / "o.journal"))  # a second worker's check: it is failed already
    assert [t.number for t in lost] == [stale_one.number]
    assert lost[0].state == TrialState.FAIL and lost[0].user_attrs == {"bstune.state": "LOST", "number": 0}
    assert _study(tmp_path / "o.journal").trials[1].state == TrialState.RUNNING


def test_attributes_written_together_and_a_finished_trial_refused(tmp_path: Path) -> None:
    study = _study(tmp_path / "o.journal")
    trial = study.ask()
    size = (tmp_path / "o.journal").stat().st_size
    set_trial_user_attrs(study._storage, trial._trial_id, {"a": 1, "b": [2, 3], "c": "x"})
    assert (tmp_path / "o.journal").read_bytes()[size:].count(b"\n") == 3  # one line each, one append
    study.tell(trial, 0.5)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_trial_user_attrs(study._storage, trial._trial_id, {"d": 4})
    study.ask()  # nothing of the refused write is replayed later as this process's own failure
    assert _study(tmp_path / "o.journal").trials[0].user_attrs == {"a": 1, "b": [2, 3], "c": "x"}


def test_a_torn_last_line_is_skipped_then_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "o.journal"
    study = _study(path)
    first = study.ask()
    with open(path, "ab") as f:  # what a writer killed in the middle of its append leaves
        f.write(b'{"op_code":8,"worker_id":"dead","trial_id":0,"user_attr":{"x"')
    reader = _study(path)
    assert [t.number for t in reader.trials] == [first.number]  # read as if the line were not there
    set_trial_user_attrs(reader._storage, first._trial_id, {"after": 1})
    second = reader.ask()
    assert path.read_bytes().endswith(b"\n") and b'"worker_id":"dead"' not in path.read_bytes()
    again = _study(path)  # the whole journal replays: nothing lost, nothing merged into a broken line
    assert [t.number for t in again.trials] == [first.number, second.number]
    assert again.trials[0].user_attrs == {"after": 1}


@pytest.mark.slow  # a real process, killed
def test_the_journal_lock_is_freed_when_its_holder_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "o.journal"
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(path) + ".flock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = FlockLock(str(path))
        got = threading.Event()
        waiter = threading.Thread(target=lambda: (lock.acquire(), got.set()), daemon=True)
        waiter.start()
        assert not got.wait(0.5)  # held by the other process: waits
        os.kill(holder.pid, signal.SIGKILL)
        assert got.wait(5)  # freed by the kernel at once, no grace period
        lock.release()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(("content", "expect"), [
    (b"SQLite format 3\x00" + bytes(100), "is a SQLite database, not a journal"),
    (b"epoch,loss\n1,0.5\n", "is not an Optuna journal"),
    (b'{"a": 1}\n', "its first line is not a journal operation"),
])
def test_a_file_that_is_not_a_journal_is_one_line_and_left_as_it_is(tmp_path: Path, content: bytes,
                                                                      expect: str) -> None:
    path = tmp_path / "o.journal"
    path.write_bytes(content)
    with pytest.raises(BstuneError, match=expect):
        check_storage(f"journal:///{path}")
    assert path.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["o.journal"]


def test_a_missing_folder_and_a_folder_named_as_the_journal_are_one_line_each(tmp_path: Path) -> None:
    with pytest.raises(BstuneError, match=r"storage: folder .*nowhere does not exist"):
        check_storage(f"journal:///{tmp_path}/nowhere/o.journal")
    with pytest.raises(BstuneError, match="is a folder"):
        check_storage(f"journal:///{tmp_path}")
    with pytest.raises(BstuneError, match="names no file"):
        check_storage("journal:///")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # chattr, a process
def test_a_read_only_folder_is_one_line_and_nothing_written(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    with read_only_folder(folder), pytest.raises(BstuneError, match=f"storage: {folder} is read-only"):
        check_storage(f"journal:///{folder}/o.journal")
    assert list(folder.iterdir()) == []


def test_a_study_not_in_the_journal_is_named_and_nothing_created(tmp_path: Path) -> None:
    with pytest.raises(BstuneError, match="does not exist"):
        load_study(f"journal:///{tmp_path}/o.journal", "j")
    assert list(tmp_path.iterdir()) == []
    open_storage(f"journal:///{tmp_path}/o.journal").create_new_study([optuna.study.StudyDirection.MINIMIZE], "x")
    with pytest.raises(BstuneError, match="studies there: x"):
        load_study(f"journal:///{tmp_path}/o.journal", "j")


def test_the_cli_refuses_a_sqlite_file_named_as_a_journal_in_one_line(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, storage=f"journal:///{tmp_path}/o.db")
    (tmp_path / "o.db").write_bytes(b"SQLite format 3\x00" + bytes(100))
    out = CliRunner().invoke(main, ["validate", str(spec)])
    assert out.exit_code == 2 and out.output.count("\n") == 1 and "not a journal" in out.output, out.output
