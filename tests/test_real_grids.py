"""The real reference grids (benchmarks/real_grids.py) and the analysis on studies drawn from them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.real_coverage import Tally, draw_study, ref_alpha, reference, score
from benchmarks.real_grids import GRIDS, load, mnist1d_dataset
from bstune.analysis import analyze


def test_mnist1d_is_generated_offline_with_its_papers_shape():
    pytest.importorskip("mnist1d")  # the optional 'bench' extra
    ds = mnist1d_dataset()
    assert tuple(ds.train_x.shape) == (4000, 40) and tuple(ds.val_x.shape) == (1000, 40)
    assert ds.num_classes == 10 and set(ds.train_y.unique().tolist()) == set(range(10))


def test_the_cached_digits_grid_is_whole():
    rows = load("digits-sgd")
    g = GRIDS["digits-sgd"]
    assert len(rows) == len(g.batch_sizes) * len(g.log2_lrs) * 8
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
