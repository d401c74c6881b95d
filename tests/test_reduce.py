"""The paths that keep a large table's analysis small give the answer the plain ones give, on small tables:
the smoother's per-bin resamples (analysis/reduce.py), the fits made only where the smoother falls back,
the learning curves read as flat arrays (analysis/steps.py), and the CSV read by columns (tablecsv.py)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from bstune.analysis import analyze
from bstune.analysis.reduce import smooth_batch, smooth_reduced
from bstune.analysis.smooth import smooth_valley
from bstune.analysis.steps import _first_crossings, _Flat
from bstune.analysis.valley import resample_counts
from bstune.tablecsv import Columns, read_columns
from bstune.trials import CSV_STATES, MAX_BATCH_SIZE, State, TrialRecord, TrialTable, _read_trials, from_csv
from tests.simulate import simulate_trials, write_csv

# Sums of a few hundred float64 terms taken in another order differ by far less than this (relative).
ROUNDING = 1e-9


def _cliff(x: np.ndarray) -> np.ndarray:
    left = 0.06 * (1.0 + 0.35 * np.maximum(-4.0 - x, 0.0) ** 1.5)
    return np.minimum(np.where(x > -4.0, 0.06 * np.exp(4.0 * (x + 4.0)), left), 2.3)


def _valley(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-10.0, 0.0, size=n)
    y = _cliff(x) * np.exp(0.05 * rng.standard_normal(n))
    diverged = x > -1.0
    return x[~diverged], y[~diverged], x[diverged]


def test_per_bin_resamples_keep_the_data_fit_and_draw_the_same_bootstrap() -> None:
    x, y, walls = _valley(300, seed=3)
    n_boot = 500
    counts = resample_counts(len(x) + len(walls), n_boot, np.random.default_rng(1))
    plain = smooth_valley(x, y, walls, counts[:, :len(x)], counts[:, len(x):])
    reduced = smooth_reduced(x, y, walls, n_boot, np.random.default_rng(1))
    assert plain is not None and reduced is not None
    # the data's row: the same sums per bin, so the same fit up to the order of the additions
    assert abs(plain.log2_lr[0] - reduced.log2_lr[0]) <= ROUNDING
    assert abs(plain.value - reduced.value) <= ROUNDING * plain.value
    assert np.abs(plain.near[0] - reduced.near[0]).max() <= ROUNDING * 16
    # the data's plateau reaches as far as a quarter of the bootstrap's near-optimal sets: another draw of the
    # same bootstrap (the bound as for the quantiles below)
    assert np.abs(plain.plateau[0] - reduced.plateau[0]).max() <= 0.05
    # the resamples: another draw of the same bootstrap. Its replicates' sd is ~0.04 octave here, so the Monte
    # Carlo error of a 2.5% quantile from 500 draws is ~0.005 octave; 0.05 is ten times that.
    for a, b in ((plain.log2_lr[1:], reduced.log2_lr[1:]), (plain.plateau[1:, 0], reduced.plateau[1:, 0]),
                 (plain.plateau[1:, 1], reduced.plateau[1:, 1])):
        assert np.abs(np.quantile(a, [0.025, 0.5, 0.975]) - np.quantile(b, [0.025, 0.5, 0.975])).max() <= 0.05
        assert 0.75 <= b.std() / a.std() <= 1.33


def test_a_batch_size_past_the_threshold_is_reduced_and_agrees_with_the_plain_smoother() -> None:
    x, y, walls = _valley(400, seed=4)
    done = [TrialRecord(number=i, batch_size=64, lr=float(2.0**xi), momentum=0.9, value=float(yi),
                        state=State.COMPLETE) for i, (xi, yi) in enumerate(zip(x, y, strict=True))]
    diverged = [TrialRecord(number=1000 + i, batch_size=64, lr=float(2.0**w), momentum=0.9, value=None,
                            state=State.DIVERGED) for i, w in enumerate(walls)]
    plain = smooth_batch(done, diverged, 1.0, 200, np.random.default_rng(0))
    reduced = smooth_batch(done, diverged, 1.0, 200, np.random.default_rng(0), reduce_above=100)
    assert plain is not None and reduced is not None
    assert abs(plain.log2_lr[0] - reduced.log2_lr[0]) <= ROUNDING and abs(plain.value - reduced.value) <= ROUNDING
    assert np.all(reduced.log2_one_minus_m == math.log2(1.0 - 0.9))
    assert reduced.log2_lr.shape == plain.log2_lr.shape == (201,)


def test_a_batch_size_smoothed_on_its_own_does_not_depend_on_the_others() -> None:
    """Each batch size draws its own stream, and the pooled fit is made only where the smoother falls back:
    dropping two batch sizes leaves the others' optima and intervals exactly as they were."""
    table = simulate_trials("saturating", momentum=0.9, trials_per_batch=30, seed=5)
    whole = analyze(table, n_boot=50, seed=2)
    keep = {64, 256, 1024}
    part = analyze(TrialTable([r for r in table.records if r.batch_size in keep]), n_boot=50, seed=2)
    mine = {o.batch_size: o for o in whole.per_batch}
    for o in part.per_batch:
        assert o.fit == mine[o.batch_size].fit == "smooth"
        assert (o.lr, o.lr_interval, o.plateau, o.value) == (mine[o.batch_size].lr, mine[o.batch_size].lr_interval,
                                                             mine[o.batch_size].plateau, mine[o.batch_size].value)


def test_first_crossings_of_flat_curves() -> None:
    # three trials: crosses 0.4 between its 2nd and 3rd points; at its first point; never
    steps = np.array([10.0, 20.0, 30.0, 10.0, 20.0, 10.0, 20.0])
    vals = np.array([1.0, 0.5, 0.2, 0.3, 0.1, 0.9, 0.8])
    cross, first = _first_crossings(_Flat(steps, vals, np.array([0, 0, 0, 1, 1, 2, 2])), 0.4)
    assert cross[0] == pytest.approx(20.0 + (0.5 - 0.4) / (0.5 - 0.2) * 10.0) and not first[0]
    assert cross[1] == 10.0 and first[1]
    assert math.isinf(cross[2]) and not first[2]


def _row_by_row(path: Path) -> list[TrialRecord]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return _read_trials(csv.reader(f), str(path))


@pytest.mark.parametrize("kind", ["curves", "one-row-per-trial", "no-number", "blank-line", "quoted-newline",
                                  "spaces"])
def test_the_columnar_read_gives_the_row_by_row_records(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "t.csv"
    table = simulate_trials("saturating", seed=6, trials_per_batch=6, curves=kind == "curves", epochs=4)
    write_csv(table, path)
    text = path.read_text()
    if kind == "no-number":  # each row its own trial, numbered by its line
        text = "\n".join(",".join(line.split(",")[1:6]) for line in text.splitlines() if line) + "\n"
    elif kind == "blank-line":
        text = text.replace("\n", "\n\n", 3)
    elif kind == "quoted-newline":
        head, first, rest = text.split("\n", 2)
        text = f"{head},note\n{first},\"two\nlines\"\n{rest}"
    elif kind == "spaces":
        text = text.replace(",COMPLETE,", ", COMPLETE ,", 2)
    path.write_text(text)
    records = from_csv(path).records
    assert records == _row_by_row(path)
    assert len(records) == len(table.records)
    # clean tables are read by columns; a blank line or a field over two lines goes row by row
    with open(path, newline="") as f:
        reader = csv.reader(f)
        cols = Columns(next(reader), "t")
        fast = read_columns(f, reader.line_num, cols, CSV_STATES, MAX_BATCH_SIZE)
    assert (fast is None) == (kind in ("blank-line", "quoted-newline"))
