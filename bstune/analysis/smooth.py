"""One batch size's valley at one momentum, smoothed without assuming its shape.

A real valley changes shape with the batch size (a long flat floor at small B, a steep left wall at large B),
so one profile fitted to every batch size puts lr* off by up to an octave where the shape differs. Here each
batch size's valley is its own: a local quadratic regression (Gaussian kernel in log2 lr) of the objective
(its log, for a positive loss: one run's noise is about a fixed fraction of the loss), with the bandwidth
chosen per fit by generalised cross-validation from ``BANDWIDTHS``. Diverged trials are the walls: they
enter at the worst completed value. The optimum is the smoothed curve's minimum over the completed trials'
range; the value there is the smoothed expectation, not the best trial's (which is optimistic by the noise
times the expected maximum of n draws), less the fit's own bias at its minimum (a residual bootstrap).

The plateau is the stretch of lr around the optimum where the smoothed curve stays within one run's noise of
its minimum: the residual scatter of the trials around the fit, in the valley (where the fit is within its
1.5-fold of the minimum). Every fit is done for the data (row 0) and for each bootstrap resample (rows 1..),
bandwidth choice included, so the intervals carry the uncertainty of the shape.

Trials are binned at ``BIN`` octaves of lr: each fit then costs the same whatever the number of trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bstune.analysis.results import PLATEAU_NOISE
from bstune.analysis.valley import Valley, resample_counts
from bstune.trials import TrialRecord

BIN = 1.0 / 8.0  # octaves of lr per bin
BANDWIDTHS = (0.25, 0.4, 0.6, 1.0)  # kernel sd in octaves of lr, chosen per fit by GCV
CAP = math.log(1.5)  # log-values are capped this far above the best (walls: how high is moot)
MIN_VALLEY_TRIALS = 5  # distinct lrs a valley needs within ...
VALLEY_TRIALS_WITHIN = 2.0  # ... this factor of the best value to be smoothed on its own
_MIN_MASS = 2.5  # kernel-weighted trials a grid point needs to be evaluated (else the fit is extrapolating)
_NOISE_TRIALS = 6  # trials the noise is measured on, at least
PLATEAU_QUANTILE = 0.25  # the plateau reaches as far as this share of the bootstrap's near-optimal sets do
_BIAS_REPS = 64  # residual-bootstrap refits that measure the value's bias
_BIAS_STREAM = 7919
_VALLEY = 1.5  # the noise is measured where the fit is within this factor of its minimum (log scale: log 1.5)


def smooth_optimum(done: Sequence[TrialRecord], diverged: Sequence[TrialRecord], sign: float, n_boot: int,
                   rng: np.random.Generator) -> Valley | None:
    """The smoothed valley of one batch size whose trials share one momentum, for the data and ``n_boot``
    resamples of its trials (completed and diverged drawn together, so a resample's walls are its own)."""
    n_done, n_all = len(done), len(done) + len(diverged)
    counts = resample_counts(n_all, n_boot, rng)
    x = np.log2([r.lr for r in done])
    y = sign * np.array([float(r.value) for r in done])  # type: ignore[arg-type]
    walls = np.log2([r.lr for r in diverged]) if diverged else np.zeros(0)
    v = smooth_valley(x, y, walls, counts[:, :n_done], counts[:, n_done:])
    if v is not None:
        v.log2_one_minus_m = np.full(len(v.log2_lr), math.log2(1.0 - done[0].momentum))
    return v


def smooth_valley(x: np.ndarray, y: np.ndarray, walls: np.ndarray, counts: np.ndarray,
                  wall_counts: np.ndarray) -> Valley | None:
    """Smooth the valley of one batch size at one momentum, for every row of ``counts``.

    ``x``: log2 lr of the completed trials, ``y`` their (sign-adjusted, to-be-minimised) values; ``walls``:
    log2 lr of the diverged trials; ``counts`` (rows, n) and ``wall_counts`` (rows, n_walls): how often each
    trial is drawn in each row (row 0: the data). None where the trials do not span a valley (fewer than 3
    distinct lrs)."""
    scaled = valley_scale(x, y, walls)
    if scaled is None:
        return None
    xa, za, keep, log_scale = scaled
    ca = np.concatenate([counts, wall_counts[:, keep]], axis=1)
    grid, member = bin_grid(xa)
    scatter = np.zeros((len(xa), len(grid)))
    scatter[np.arange(len(xa)), member] = 1.0
    c = ca @ scatter  # (rows, bins): draws per bin
    s1 = (ca * za) @ scatter
    s2 = (ca * za**2) @ scatter
    return smooth_bins(grid, c, s1, s2, x, log_scale)


def valley_scale(x: np.ndarray, y: np.ndarray,
                 walls: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool] | None:
    """The points the smoother fits: log2 lr of the completed trials then of the walls it keeps, their values
    on its scale (log, capped), which walls it keeps, and whether the scale is log; None where too few
    distinct lrs lie in the valley."""
    in_valley = x[y <= y.min() + abs(y.min()) * (VALLEY_TRIALS_WITHIN - 1.0)]
    if len(np.unique(in_valley)) < MIN_VALLEY_TRIALS:
        return None
    log_scale = bool((y > 0).all())
    z = np.log(y) if log_scale else y.astype(float)
    if log_scale:  # a wall's height says nothing about where the floor is: cap it
        z = np.minimum(z, float(z.min()) + CAP)
    top = float(z.max())
    # diverged trials: walls at the worst completed value (only those beyond the completed range's bottom)
    keep = walls > float(x.min())
    xa = np.concatenate([x, walls[keep]])
    za = np.concatenate([z, np.full(int(keep.sum()), top)])
    return xa, za, keep, log_scale


def bin_grid(xa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grid of bins (log2 lr at their centres) over the points ``xa``, and each point's bin."""
    lo = math.floor(float(xa.min()) / BIN)
    grid = (np.arange(lo, math.ceil(float(xa.max()) / BIN) + 1)) * BIN
    member = np.clip(np.rint(xa / BIN).astype(int) - lo, 0, len(grid) - 1)
    return grid, member


def smooth_bins(grid: np.ndarray, c: np.ndarray, s1: np.ndarray, s2: np.ndarray, x: np.ndarray,
                log_scale: bool) -> Valley | None:
    """The smoothed valley from the binned points, for every row: ``c``, ``s1``, ``s2`` (rows, bins) the
    draws, the sum of their values and of their squares per bin (on the scale ``valley_scale`` gives);
    ``x`` the completed trials' log2 lr (their range bounds the optimum; only its min and max matter)."""
    curve, ok, lever, masked, best, fmin = _fit_rows(grid, c, s1, s2, x)
    rows = np.arange(c.shape[0])
    if not math.isfinite(float(fmin[0])):  # the fit is evaluable nowhere in the trials' range
        return None
    x_best = grid[best] + BIN * _refine(masked, best)
    # a resample whose fit is evaluable nowhere (rare: it drew a few lrs many times) keeps the data's optimum
    lost = ~np.isfinite(fmin)
    x_best, fmin, best = np.where(lost, x_best[0], x_best), np.where(lost, fmin[0], fmin), np.where(lost, best[0], best)
    noise = _noise(curve, ok, lever, fmin, c, s1, s2, log_scale)
    near = _plateau(grid, masked, best, fmin + PLATEAU_NOISE * noise)
    plateau = near.copy()
    plateau[0] = _bootstrap_plateau(near)
    bias = _value_bias(grid, c[0], curve[0], ok[0], masked[0], s1[0], x, float(noise[0]))
    value0 = float(math.exp(fmin[0] - bias) if log_scale else fmin[0] - bias)  # sign-adjusted, as Valley.value
    scale0 = value0 * (math.exp(noise[0]) - 1.0) if log_scale else float(noise[0])
    lu = np.zeros(len(rows))
    return Valley(log2_lr=x_best, log2_one_minus_m=lu, value=value0, kind="smooth",
                  n_window=int(len(x)), noise=scale0, plateau=plateau, near=near, bias=bias)


def _fit_rows(grid: np.ndarray, c: np.ndarray, s1: np.ndarray, s2: np.ndarray, x: np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every row's local quadratic at the bandwidth its GCV picks: (curve, where it is evaluable within the
    completed trials' range, its weight on a trial there, the curve masked to that, the lowest bin, the value
    there)."""
    fits = [_local_quadratic(grid, c, s1, s2, h) for h in BANDWIDTHS]
    gcv = np.stack([f[2] for f in fits], axis=1)  # (rows, bandwidths)
    finite = np.isfinite(gcv)
    # too few trials for any bandwidth's cross-validation: the widest (the nearest to one quadratic)
    pick = np.where(finite.any(axis=1), np.where(finite, gcv, np.inf).argmin(axis=1), len(BANDWIDTHS) - 1)
    rows = np.arange(c.shape[0])
    curve = np.stack([f[0] for f in fits], axis=1)[rows, pick]  # (rows, bins)
    ok = np.stack([f[1] for f in fits], axis=1)[rows, pick]
    lever = np.stack([f[3] for f in fits], axis=1)[rows, pick]
    # the optimum lies within the completed trials' range of the data
    inside = (grid >= float(x.min()) - 1e-9) & (grid <= float(x.max()) + 1e-9)
    ok = ok & inside[None, :]
    masked = np.where(ok, curve, np.inf)
    best = masked.argmin(axis=1)
    fmin = masked[rows, best]
    return curve, ok, lever, masked, best, fmin


def _local_quadratic(grid: np.ndarray, c: np.ndarray, s1: np.ndarray, s2: np.ndarray,
                     h: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The local quadratic fit with kernel sd ``h`` at every grid point, per row: (curve, where it is
    evaluable, GCV score, the fit's own weight on a trial there). The 3x3 normal equations are solved in
    closed form (cofactors), in units of h."""
    d = (grid[None, :] - grid[:, None]) / h  # (evaluation point g, bin b): (b - g) / h
    k = np.exp(-0.5 * d**2)
    m0, m1, m2, m3, m4 = (c @ (k * d**p).T for p in range(5))  # (rows, g): sum_b K c_b d^p
    t0, t1, t2 = (s1 @ (k * d**p).T for p in range(3))
    c00, c01, c02 = m2 * m4 - m3**2, m2 * m3 - m1 * m4, m1 * m3 - m2**2
    det = m0 * c00 + m1 * c01 + m2 * c02
    ok = (m0 >= _MIN_MASS) & (det > 1e-9 * np.maximum(m0, 1e-12) ** 3)
    safe = np.where(ok, det, 1.0)
    curve = np.where(ok, (t0 * c00 + t1 * c01 + t2 * c02) / safe, np.nan)
    lever = np.where(ok, c00 / safe, np.inf)  # (A^-1)_00: the fit's own weight on a trial at g, K(0) = 1
    # GCV over the bins that hold trials: each trial's residual from the fit at its bin
    n = c.sum(axis=1)
    held = c > 0
    resid = np.where(held, s2 - 2.0 * np.nan_to_num(curve) * s1 + np.nan_to_num(curve) ** 2 * c, 0.0)
    rss = resid.sum(axis=1)
    trace = np.where(held, c * np.where(held, lever, 0.0), 0.0).sum(axis=1)
    trace = np.where((held & ~ok).any(axis=1), np.inf, trace)  # a trial where the fit cannot be evaluated
    with np.errstate(divide="ignore", invalid="ignore"):
        gcv = np.where(trace < n - 1.0, n * np.maximum(rss, 0.0) / (n - trace) ** 2, np.inf)
    return np.nan_to_num(curve, nan=np.inf), ok, gcv, lever


def _refine(masked: np.ndarray, best: np.ndarray) -> np.ndarray:
    """The parabola through each row's lowest grid point and its two neighbours: its vertex, in bins."""
    rows = np.arange(len(best))
    left = masked[rows, np.maximum(best - 1, 0)]
    right = masked[rows, np.minimum(best + 1, masked.shape[1] - 1)]
    mid = masked[rows, best]
    with np.errstate(invalid="ignore"):
        den = left - 2.0 * mid + right
    inner = np.isfinite(left) & np.isfinite(right) & (best > 0) & (best < masked.shape[1] - 1) & (den > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(inner, np.clip(0.5 * (left - right) / np.where(inner, den, 1.0), -0.5, 0.5), 0.0)


def _noise(curve: np.ndarray, ok: np.ndarray, lever: np.ndarray, fmin: np.ndarray, c: np.ndarray,
           s1: np.ndarray, s2: np.ndarray, log_scale: bool) -> np.ndarray:
    """One run's noise per row: the RMS leave-one-out residual of the trials around the fit, over the valley
    (the bins where the fit is within _VALLEY of its minimum, widened to hold at least _NOISE_TRIALS
    trials)."""
    level = math.log(_VALLEY) if log_scale else 0.5 * np.abs(fmin)
    held = ok & (c > 0)
    key = np.where(held, curve, np.inf)
    order = np.argsort(key, axis=1)
    rows = np.arange(len(fmin))[:, None]
    cum = np.cumsum(c[rows, order], axis=1)
    nth = key[rows, order][np.arange(len(fmin)), np.argmax(cum >= _NOISE_TRIALS, axis=1)]
    near = held & (curve <= np.maximum(fmin + level, nth)[:, None])
    fit = np.where(near, curve, 0.0)
    loo = np.where(near, 1.0 / np.maximum(1.0 - np.where(near, lever, 0.0), 0.1) ** 2, 0.0)
    sse = (loo * np.where(near, s2 - 2.0 * fit * s1 + fit**2 * c, 0.0)).sum(axis=1)
    return np.sqrt(np.maximum(sse, 0.0) / np.maximum(np.where(near, c, 0.0).sum(axis=1), 1.0))


def _bootstrap_plateau(near: np.ndarray) -> np.ndarray:
    """The data's plateau: its own near-optimal set (row 0 of ``near``), widened on each side to where a
    quarter (PLATEAU_QUANTILE) of the bootstrap's near-optimal sets reach. One training seed's valley is only a
    guess at another's: on the digits grid the data's near-optimal set alone held the seed-mean's optimum in
    0.71 of studies at 16 trials per batch size, widened so in 0.87 (benchmarks/REAL.md)."""
    if len(near) < 2:
        return near[0]
    lo = float(np.quantile(near[1:, 0], PLATEAU_QUANTILE, method="inverted_cdf"))
    hi = float(np.quantile(near[1:, 1], 1.0 - PLATEAU_QUANTILE, method="inverted_cdf"))
    return np.array([min(lo, float(near[0, 0])), max(hi, float(near[0, 1]))])


def _plateau(grid: np.ndarray, masked: np.ndarray, best: np.ndarray, level: np.ndarray) -> np.ndarray:
    """log2 lr at the two ends of the contiguous stretch around ``best`` where ``masked`` <= ``level``, each
    end placed between grid points where the curve crosses the level (linearly)."""
    below = masked <= level[:, None]
    idx = np.arange(len(grid))[None, :]
    rows = np.arange(len(best))
    first = np.where(~below & (idx < best[:, None]), idx, -1).max(axis=1) + 1  # lowest bin inside
    last = np.where(~below & (idx > best[:, None]), idx, len(grid)).min(axis=1) - 1  # highest bin inside
    ends = []
    for inner, outer in ((first, first - 1), (last, last + 1)):
        has = (outer >= 0) & (outer < len(grid))
        o = np.clip(outer, 0, len(grid) - 1)
        f_in, f_out = masked[rows, inner], masked[rows, o]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(has & np.isfinite(f_out), (level - f_in) / (f_out - f_in), 0.0)
        ends.append(grid[inner] + np.clip(frac, 0.0, 1.0) * (grid[o] - grid[inner]))
    return np.stack(ends, axis=1)


def _value_bias(grid: np.ndarray, c0: np.ndarray, curve0: np.ndarray, ok0: np.ndarray, masked0: np.ndarray,
                s10: np.ndarray, x: np.ndarray, sigma: float) -> float:
    """The fit's bias at its own minimum, by a residual bootstrap: the data's fitted curve plus fresh noise of
    one run's scale (``sigma``, the valley's residual RMS) at the data's trials, refitted (bandwidth choice
    included) ``_BIAS_REPS`` times; each replicate's minimum against the data's curve at the bin it picks.

    Two biases pull apart and both are the smoother's own: its minimum is where its noise ran low (the
    winner's curse of a minimum), and it rounds off a sharp bottom. On the real grids (benchmarks/REAL.md)
    the second made the value pessimistic on MNIST-1D by up to 0.03 at a batch size. Only noise that differs
    between the trials is seen: a training seed's luck shared by all its runs is not."""
    if sigma <= 0.0 or not math.isfinite(sigma):
        return 0.0
    # a stream of its own, fixed by the trials' count: the value does not move with n_boot or the bootstrap
    rng = np.random.default_rng([_BIAS_STREAM, int(round(float(c0.sum())))])
    held = c0 > 0
    yhat = np.where(ok0 & np.isfinite(curve0), curve0, s10 / np.where(held, c0, 1.0))  # off the fit: the bin
    c = np.tile(c0, (_BIAS_REPS, 1))
    s1 = c * yhat + np.sqrt(c) * sigma * rng.standard_normal(c.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        s2 = np.where(c > 0, s1**2 / np.where(c > 0, c, 1.0) + np.maximum(c - 1.0, 0.0) * sigma**2, 0.0)
    _, _, _, _, best, fmin = _fit_rows(grid, c, s1, s2, x)
    at = masked0[best]
    good = np.isfinite(fmin) & np.isfinite(at)
    return float(np.mean(fmin[good] - at[good])) if good.any() else 0.0
