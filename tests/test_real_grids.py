"""The real reference grids (benchmarks/real_grids.py) and the analysis on studies drawn from them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import real_grids
from benchmarks.real_coverage import (
    MomentumTally,
    Tally,
    draw_study,
    ref_alpha,
    reference,
    score,
    score_momentum,
)
from benchmarks.real_grids import GRIDS, Grid, load, mnist1d_dataset, read_rows, write
from bstune.analysis import analyze


def test_mnist1d_is_generated_offline_with_its_papers_shape():
    pytest.importorskip("mnist1d")  # the optional 'bench' extra
    ds = mnist1d_dataset()
    assert tuple(ds.train_x.shape) == (4000, 40) and tuple(ds.val_x.shape) == (1000, 40)
    assert ds.num_classes == 10 and set(ds.train_y.unique().tolist()) == set(range(10))


@pytest.mark.parametrize("name", ["digits-sgd", "digits-momentum", "digits-adam"])
def test_the_cached_digits_grids_are_whole(name):
    rows = load(name)
    g = GRIDS[name]
    assert len(rows) == len(g.batch_sizes) * len(g.log2_lrs) * len(g.momenta) * 8
    assert {(r["batch_size"], r["momentum"], r["seed"]) for r in rows} == {
        (b, m, s) for b in g.batch_sizes for m in g.momenta for s in range(8)}
    done = [r for r in rows if r["state"] == "COMPLETE"]
    assert all(math.isfinite(r["value"]) and len(r["epoch_values"].split()) == g.epochs for r in done)
    assert all(math.isnan(r["value"]) for r in rows if r["state"] == "DIVERGED")


@pytest.mark.slow
def test_lr_star_intervals_hold_the_multi_seed_reference_on_real_digits_studies():
    rows = load("digits-sgd")
    sizes = sorted({r["batch_size"] for r in rows})
    t = Tally()
    for i in range(8):
        seed = 4 + i % 4  # the report's seeds, never the study's own in its reference
        ref = reference(rows, [s for s in range(8) if s != seed], np.random.default_rng(seed))
        a = analyze(draw_study(rows, seed, sizes, 24, np.random.default_rng(100 + i)), n_boot=100, seed=i)
        score(t, a, ref, ref_alpha(ref, sizes), seed)
    assert np.mean(t.lr_hold) >= 0.8 and not any(t.outside)
    assert np.median(t.lr_width) < 3.5


@pytest.mark.slow
def test_a_stopped_build_resumes_from_its_partial_file_without_retraining(tmp_path, monkeypatch):
    monkeypatch.setattr(real_grids, "GRID_DIR", tmp_path)
    grid = Grid("tiny", "digits", "sgd", (512,), (-3.0, -2.0), (0.9,), epochs=1)
    # a group kept from a stopped build, marked by a value no training gives
    kept = [{"batch_size": 512, "lr": 2.0**x, "momentum": 0.9, "seed": 0, "state": "COMPLETE", "value": 123.0,
             "epoch_values": "123"} for x in grid.log2_lrs]
    write(grid.path.with_suffix(".partial"), kept)
    real_grids.build(grid, [0, 1], [512])
    rows = read_rows(grid.path)
    assert not grid.path.with_suffix(".partial").exists() and not list(tmp_path.glob("*.tmp"))
    assert [r["value"] for r in rows if r["seed"] == 0] == [123.0, 123.0]
    trained = [r for r in rows if r["seed"] == 1]
    assert len(trained) == 2 and all(0 < r["value"] < 5 for r in trained)


def test_the_momentum_reference_is_the_lowest_momentum_curve_and_studies_are_scored_against_it():
    rows = load("digits-momentum")
    ref = reference(rows, list(range(1, 8)), np.random.default_rng(0))
    for b in GRIDS["digits-momentum"].batch_sizes:
        lows = {m: float(c.min()) for (bb, m), c in ref.curves.items() if bb == b}
        assert len(lows) == 4 and lows[ref.momentum[b]] == min(lows.values()) == float(ref.curve[b].min())
        assert ref.lr_interval[b][0] <= ref.lr[b] <= ref.lr_interval[b][1] and ref.sd[b] > 0
    t = MomentumTally()
    table = draw_study(rows, 0, [16, 64, 256], 16, np.random.default_rng(0))
    assert len({r.momentum for r in table.records}) > 1
    a = analyze(table, n_boot=50, seed=0)
    score_momentum(t, a, ref, 0)
    fitted = [o for o in a.per_batch if o.fitted]
    assert len(t.lr_hold) == len(t.m_best) == len(fitted) >= 2
    assert all(near for best, near in zip(t.m_best, t.m_near, strict=True) if best)
