"""The study's progress while it runs: on a terminal a live line (trials done, budget spent, ETA, best so far),
in a log a `progress:` line every so often."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from bstune.search import ConsoleProgress, run_study
from bstune.search.space import Hyperparams
from bstune.spec import Budget, load_spec
from bstune.trials import Spent
from tests.conftest import write_spec

pytestmark = pytest.mark.slow  # real studies and subprocesses: the slow suite


def test_a_log_gets_progress_lines_with_budget_eta_and_best(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, **{"budget.trials": 3}))
    out = io.StringIO()
    result = run_study(spec, progress=ConsoleProgress("val_loss", out, live=False, budget=spec.budget,
                                                      summary_every=0.0))
    lines = [line for line in out.getvalue().splitlines() if line.startswith("progress: ")]
    assert lines, out.getvalue()
    assert "\r" not in out.getvalue()
    last = lines[-1]
    assert last.startswith("progress: 3/3 trials, 100% of budget, ETA 0s, best val_loss="), last
    best = float(re.search(r"best val_loss=([0-9.e+-]+)", last)[1])
    assert abs(best - result.table.best().value) <= 1e-3 * abs(result.table.best().value)
    assert any(re.match(r"progress: 1/3 trials, 33% of budget, ETA ", line) for line in lines), lines


def test_a_terminal_gets_a_live_study_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out = io.StringIO()
    p = ConsoleProgress("val_accuracy", out, live=True, budget=Budget(trials=10, seconds=100.0))
    p.budget_spent(Spent(trials=2, examples=0, seconds=10.0))  # a resumed study: 2 trials spent before
    point = Hyperparams(batch_size=32, lr=0.1, momentum=0.9)
    p.trial_started(2, point)
    p.trial_finished(2, point, "COMPLETE", 0.91, 5.0, "")
    p.budget_spent(Spent(trials=3, examples=0, seconds=16.0))
    p.epoch_done(3, point, 1, 4, 0.5)
    text = out.getvalue()
    assert "\r\033[K" in text and "progress:" not in text  # no log lines on a terminal
    assert "| study: 2/10 trials, 20% of budget, ETA -" in text  # nothing done yet this run: no pace
    assert "study: 3/10 trials, 30% of budget, ETA " in text and "best val_accuracy=0.91" in text
    eta = p.eta()
    assert eta is not None and eta > 0
    p.trial_finished(3, point, "COMPLETE", 0.95, 1.0, "")
    assert p.best == 0.95  # maximized


def test_a_live_line_never_wraps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrapped line cannot be rewritten in place: live lines are cut to the terminal's width."""
    monkeypatch.setenv("COLUMNS", "60")
    out = io.StringIO()
    p = ConsoleProgress("val_loss", out, live=True, budget=Budget(trials=10))
    p.budget_spent(Spent(trials=0, examples=0, seconds=0.0))
    p.epoch_done(0, Hyperparams(batch_size=32, lr=0.1, momentum=0.9), 1, 4, 0.5)
    assert [len(part) for part in out.getvalue().split("\r\033[K") if part] == [59]


def test_a_resumed_study_shows_the_best_of_every_run_so_far(tmp_path: Path) -> None:
    """The best so far is the study's (earlier runs' and other workers' trials too), not this process's only."""
    path = write_spec(tmp_path, **{"budget.trials": 2})
    first = run_study(load_spec(path))
    spec = load_spec(write_spec(tmp_path, **{"budget.trials": 3}))
    progress = ConsoleProgress("val_loss", io.StringIO(), live=False, budget=spec.budget)
    progress.trial_started = lambda number, config: seen.append(progress.best)  # what it knew as each began
    seen: list[float | None] = []
    run_study(spec, progress=progress)
    assert seen and seen[0] == first.table.best().value
