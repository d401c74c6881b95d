"""Errors of the world, not tracebacks: a full disk under the stores, outputs into a read-only file system.
One line naming the file and the cause, exit 2, and a study that resumes cleanly once the cause is gone.

The file systems are real: a small tmpfs, or one mounted read-only (as root a chmod stops no write); where
mounting is not permitted the tests skip.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bstune.spec import load_spec
from tests import prefork
from tests.chaos import check_consistent
from tests.conftest import write_spec
from tests.simulate import simulate_trials, write_csv

pytestmark = pytest.mark.slow


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs, unmounted afterwards."""
    folder = tmp_path / "fs"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _bstune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return prefork.run([sys.executable, "-m", "bstune.cli", *args], capture_output=True, text=True,
                       timeout=900, cwd=cwd)


def _one_line_error(run: subprocess.CompletedProcess, *words: str) -> str:
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    line = run.stderr.strip()
    assert line.startswith("error: ") and all(w in line for w in words), line
    return line


def test_a_full_disk_under_the_stores_is_one_line_and_the_study_resumes(small_fs: Path) -> None:
    path = write_spec(small_fs, **{"budget.trials": 40, "search.pruner": "none"})
    line = _one_line_error(_bstune("study", str(path)), "run the same command")
    assert "No space left on device" in line or "disk is full" in line, line
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)  # the cause gone
    resumed = _bstune("study", str(path))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    check_consistent(load_spec(path), 40)


def test_outputs_into_a_read_only_file_system_are_one_line(small_fs: Path, tmp_path: Path) -> None:
    spec_file = write_spec(tmp_path, **{"budget.trials": 16, "search.pruner": "none"})
    assert _bstune("study", str(spec_file)).returncode == 0
    trials = tmp_path / "trials.csv"
    write_csv(simulate_trials("saturating", batch_sizes=(32, 64, 128), trials_per_batch=12, seed=3), trials)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    out = small_fs / "out"
    _one_line_error(_bstune("analyze", "--csv", str(trials), "--json", str(out / "a.json"), cwd=tmp_path),
                    str(out), "Read-only file system")
    _one_line_error(_bstune("report", str(spec_file), "--no-mlflow", "--out", str(out), cwd=tmp_path),
                    str(out), "Read-only file system")
    assert not out.exists(), "nothing half-written"
