"""A batch size with many trials reduced before the smoother's bootstrap, so its cost stops growing with them.

The smoother (``smooth``) sees a batch size's trials only through three sums per bin of ``smooth.BIN``
octaves of lr: the draws, the sum of their values and of their squares (on its log scale). For the data
those sums are exact whatever the number of trials. A bootstrap resample drawn trial by trial costs
(resamples x trials) draws; beyond ``REDUCE_ABOVE`` trials each resample is drawn per bin instead:

- the draws per bin from their exact joint law, multinomial(n, n_bin / n) (the last category: the diverged
  trials below the completed range, which the smoother leaves out but a resample draws);
- given c draws in a bin, the sum of their values, by the central limit theorem, c mean + sqrt(c var) N(0, 1)
  (mean and var: the bin's trials' own, var the population variance: a draw with replacement), and the sum of
  their squares as its expectation given that sum, sum^2 / c + (c - 1) var.

Walls (diverged trials, all at one value) have var 0, so their sums are exact. The data's row, and with it the
point estimates, the value and the plateau, are the same as without the reduction up to the order of
floating-point sums; the intervals are another draw of nearly the same bootstrap (tests/test_reduce.py). Beyond the
threshold a bin holds tens of trials (4,000 over ~100 bins), and the resamples' quantiles agree with the
trial-by-trial bootstrap's within their Monte Carlo error already at 300 trials.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bstune.analysis.smooth import bin_grid, smooth_bins, smooth_optimum, valley_scale
from bstune.analysis.valley import Valley
from bstune.trials import TrialRecord

REDUCE_ABOVE = 4000  # a batch size's trials (completed and diverged) beyond which resamples are drawn per bin


def smooth_batch(done: Sequence[TrialRecord], diverged: Sequence[TrialRecord], sign: float, n_boot: int,
                 rng: np.random.Generator, reduce_above: int = REDUCE_ABOVE) -> Valley | None:
    """``smooth.smooth_optimum`` of one batch size, its resamples drawn per bin beyond ``reduce_above``
    trials (see the module doc)."""
    if len(done) + len(diverged) <= reduce_above:
        return smooth_optimum(done, diverged, sign, n_boot, rng)
    x = np.log2(np.fromiter((r.lr for r in done), dtype=float, count=len(done)))
    y = sign * np.fromiter((r.value for r in done), dtype=float, count=len(done))
    walls = np.log2(np.fromiter((r.lr for r in diverged), dtype=float, count=len(diverged)))
    v = smooth_reduced(x, y, walls, n_boot, rng)
    if v is not None:
        v.log2_one_minus_m = np.full(len(v.log2_lr), np.log2(1.0 - done[0].momentum))
    return v


def smooth_reduced(x: np.ndarray, y: np.ndarray, walls: np.ndarray, n_boot: int,
                   rng: np.random.Generator) -> Valley | None:
    """``smooth.smooth_valley`` for the data and ``n_boot`` resamples of all the trials (completed and
    diverged), each resample drawn per bin (see the module doc)."""
    scaled = valley_scale(x, y, walls)
    if scaled is None:
        return None
    xa, za, keep, log_scale = scaled
    grid, member = bin_grid(xa)
    bins = len(grid)
    n_out = int((~keep).sum())  # diverged trials the smoother leaves out: drawn, never fitted
    n_all = len(xa) + n_out
    n_g = np.bincount(member, minlength=bins).astype(float)
    sum1 = np.bincount(member, weights=za, minlength=bins)
    sum2 = np.bincount(member, weights=za * za, minlength=bins)
    held = n_g > 0
    mean = np.where(held, sum1 / np.where(held, n_g, 1.0), 0.0)
    var = np.where(held, np.maximum(sum2 / np.where(held, n_g, 1.0) - mean**2, 0.0), 0.0)
    p = np.append(n_g, n_out) / n_all
    c = rng.multinomial(n_all, p, size=n_boot)[:, :bins].astype(float)
    s1 = c * mean + np.sqrt(c * var) * rng.standard_normal(c.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        s2 = np.where(c > 0, s1**2 / np.where(c > 0, c, 1.0) + np.maximum(c - 1.0, 0.0) * var, 0.0)
    c = np.vstack([n_g, c])
    s1 = np.vstack([sum1, s1])
    s2 = np.vstack([sum2, s2])
    return smooth_bins(grid, c, s1, s2, x, log_scale)
