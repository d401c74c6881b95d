"""The valley of one batch size: which completed trials lie in it (per bootstrap resample), and the quadratic
fit of the objective over it that places the optimum; plus the vectorised least-squares pieces that the
pooled fit (``pooled.py``) shares.

Every fit is done for the data (row 0) and for every bootstrap resample (rows 1..n_boot) at once; a
resample is a row of weights over the trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from bstune.analysis.results import PLATEAU_NOISE
from bstune.trials import TrialRecord

# The valley: completed trials whose value lies within this fraction of the way from the best values (the
# mean of the best three) to the 90th percentile (in the joint fit, at least that of all batch sizes' trials),
# and at least the best MIN_POINTS_2D. Far from the optimum the objective flattens out ("no progress") or
# blows up; a quadratic through those points would say little about where the bottom is.
_WINDOW_FRACTION = 0.4
WINDOW_QUANTILE = 0.9
MIN_POINTS_2D = 10  # a 2-D quadratic has 6 coefficients
_MIN_MOMENTUM_SPAN = 1.0  # octaves of (1 - m) the valley must span for a 2-D fit
_MAX_CONDITION = 1e3  # curvature ratio beyond which the 2-D fit cannot place the momentum


@dataclass
class Valley:
    """A valley fit's optimum, for the data and every resample."""

    log2_lr: np.ndarray  # (1 + n_boot,): the point estimate, then the bootstrap replicates
    log2_one_minus_m: np.ndarray
    value: float  # the fitted (sign-adjusted) objective at the optimum
    kind: str
    n_window: int
    noise: float  # residual RMS of the fit over the valley
    tilt: float | None = None  # the pooled fit's floor: d log2 lr / d log2(1 - m) along it
    plateau: np.ndarray | None = None  # (1 + n_boot, 2): log2 lr at the ends of the plateau (see PLATEAU_NOISE)
    near: np.ndarray | None = None  # (1 + n_boot, 2): the near-optimal set the lr* interval holds (None: plateau)
    bias: float = 0.0  # the fit's own bias at its minimum, taken off ``value`` (on the fit's scale: log, for a loss)


def valley_points(rs: Sequence[TrialRecord], sign: float, n_boot: int, rng: np.random.Generator,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Completed trials as (log2 lr, log2(1 - m), sign * value), sorted by value, and their weights in the
    valley for the data (row 0) and every bootstrap resample."""
    x, u, y = sorted_points(rs, sign)
    counts = resample_counts(len(rs), n_boot, rng)
    return x, u, y, window_weights(y, counts, min(len(rs), MIN_POINTS_2D))


def sorted_points(rs: Sequence[TrialRecord], sign: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Completed trials as (log2 lr, log2(1 - m), sign * value), sorted by value."""
    y = sign * np.array([r.value for r in rs], dtype=float)
    order = np.argsort(y, kind="stable")
    x = np.log2([rs[i].lr for i in order])
    u = np.log2([1.0 - rs[i].momentum for i in order])
    return x, u, y[order]


def fit_valley(x: np.ndarray, u: np.ndarray, y: np.ndarray, weights: np.ndarray) -> Valley:
    """Quadratic fit of the (to-be-minimised) objective y over the valley, for the data and every resample
    (the rows of ``weights``); the points as ``valley_points`` gives them."""
    used = weights.any(axis=0)  # only trials in some resample's valley matter below
    x, u, y, weights = x[used], u[used], y[used], weights[:, used]
    in0 = weights[0] > 0
    n_window = int(in0.sum())
    y0 = float(y[0])
    y = y - y0  # conditioning

    # Every candidate fit is done for the data (row 0) and for every resample, and each row picks one by the
    # same rule, so the intervals include the uncertainty of that choice: the 2-D quadratic where the valley
    # spans enough momentum and its curvature is positive definite and not too lopsided; else the 1-D fit,
    # in log2 lr or in log2 effective lr, that leaves the smaller residual.
    rows = np.arange(weights.shape[0])
    momentum_fixed = float(np.ptp(u)) < 1e-9
    lu_1d = np.full(len(rows), u[0]) if momentum_fixed else weighted_median_rows(u, weights)
    kinds = ["1d-lr"] if momentum_fixed else ["1d-lr", "1d-effective"]
    lx_c, lu_c, val_c, sse_c, half_c = [], [], [], [], []
    for kind in kinds:
        z = x if kind == "1d-lr" else x - u
        sz = Scale(z, in0)
        zs = sz.apply(z)
        coef, sse = wls(np.stack([np.ones_like(zs), zs, zs * zs], axis=1), y, weights)
        bz = _argmin_1d(coef, sz.lo, sz.hi)
        lz = sz.undo(bz)
        lx_c.append(lz if kind == "1d-lr" else lz + lu_1d)
        lu_c.append(lu_1d)
        val_c.append(coef[:, 0] + coef[:, 1] * bz + coef[:, 2] * bz**2)
        sse_c.append(sse)
        half_c.append(_half_width(coef[:, 2], np.sqrt(sse)) * sz.scale)
    pick = np.argmin(np.stack(sse_c, axis=1), axis=1)
    if not momentum_fixed and n_window >= MIN_POINTS_2D and np.ptp(u[in0]) >= _MIN_MOMENTUM_SPAN:
        two_d = _fit_2d(x, u, y, weights, in0, y0)
        if two_d is not None:
            use_2d, lx2, lu2, val2, sse2, half2 = two_d
            kinds.append("2d")
            lx_c.append(lx2)
            lu_c.append(lu2)
            val_c.append(val2)
            sse_c.append(sse2)
            half_c.append(half2)
            pick = np.where(use_2d, len(kinds) - 1, pick)
    lx = np.stack(lx_c, axis=1)[rows, pick]
    lu = np.stack(lu_c, axis=1)[rows, pick]
    value = float(np.stack(val_c, axis=1)[0, pick[0]]) + y0
    noise = math.sqrt(float(np.stack(sse_c, axis=1)[0, pick[0]]))
    half = np.stack(half_c, axis=1)[rows, pick]
    return Valley(lx, lu, value, kinds[pick[0]], n_window, noise, plateau=np.stack([lx - half, lx + half], axis=1))


def _half_width(curvature: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Half the width (in the fit's scaled units) of the plateau of a parabola with this curvature: where it
    lies within one run's noise (PLATEAU_NOISE x the residual scatter ``noise``) of its bottom; infinite
    where the parabola does not curve up."""
    level = PLATEAU_NOISE * noise
    return np.where(curvature > 0, np.sqrt(level / np.where(curvature > 0, curvature, 1.0)), np.inf)


def _fit_2d(x: np.ndarray, u: np.ndarray, y: np.ndarray, weights: np.ndarray, in0: np.ndarray,
            y0: float) -> tuple[np.ndarray, ...] | None:
    """The 2-D quadratic in (log2 lr, log2(1 - m)) per row, minimised over the valley's convex hull: (which
    rows may use it, log2 lr, log2(1 - m), value, residual, the plateau's half width in log2 lr at that
    momentum); None where the trials lie on one line. ``y0``: what was taken off the values."""
    sx, su = Scale(x, in0), Scale(u, in0)
    xs, us = sx.apply(x), su.apply(u)
    # "the sampled range" in 2-D: the convex hull of the valley's trials. A box would admit corners far
    # from any trial, e.g. high lr with high momentum, whose effective lr nobody sampled.
    try:
        hull = ConvexHull(np.stack([xs[in0], us[in0]], axis=1))
    except QhullError:  # all on one line (lr tied to momentum): nothing to fit in 2-D
        return None
    corners = hull.points[hull.vertices]
    coef, sse = wls(np.stack([np.ones_like(xs), xs, us, xs * xs, xs * us, us * us], axis=1), y, weights)
    bx, bu = _argmin_2d(coef, corners, hull.equations)
    h11, h22, h12 = 2.0 * coef[:, 3], 2.0 * coef[:, 5], coef[:, 4]
    disc = np.sqrt((h11 - h22) ** 2 / 4.0 + h12**2)
    low_eig, high_eig = (h11 + h22) / 2.0 - disc, (h11 + h22) / 2.0 + disc
    inside = weights > 0
    u_span = np.where(inside, u, -np.inf).max(axis=1) - np.where(inside, u, np.inf).min(axis=1)
    use_2d = ((inside.sum(axis=1) >= MIN_POINTS_2D) & (u_span >= _MIN_MOMENTUM_SPAN)
              & (low_eig > 0) & (high_eig <= _MAX_CONDITION * low_eig))
    value = _quad2(coef, bx, bu)
    return use_2d, sx.undo(bx), su.undo(bu), value, sse, _half_width(coef[:, 3], np.sqrt(sse)) * sx.scale


def resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of n trials is drawn: row 0 the data (all ones), then one row per bootstrap resample."""
    counts = np.ones((1 + n_boot, n))
    idx = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    counts[1:] = np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n)
    return counts


def window_weights(y: np.ndarray, counts: np.ndarray, k_min: int,
                   shared_high: np.ndarray | None = None) -> np.ndarray:
    """Per resample (rows of ``counts`` over the trials, sorted by y): the weight of each trial in the valley.

    Inside: y at most 40% of the way from the best (mean of the best three draws) to the 90th percentile (or
    to ``shared_high``, per row, where that is higher), or among the k_min best draws. Every rule counts
    draws, not distinct trials, so that a resample (n draws, some repeated) is windowed as the data would be
    were those its n trials. The weight tapers from 1 at the bottom to 0.2 at the cut, so the fit follows
    the bottom more than the walls."""
    cum = np.cumsum(counts, axis=1)
    take = np.clip(np.minimum(cum, 3) - np.minimum(cum - counts, 3), 0, None)
    low = (take * y).sum(axis=1) / 3.0
    high = y[np.argmax(cum >= WINDOW_QUANTILE * cum[:, -1:], axis=1)]
    if shared_high is not None:
        high = np.maximum(high, shared_high)
    cut = low + _WINDOW_FRACTION * (high - low)
    present = counts > 0
    inside = present & ((y[None, :] <= cut[:, None]) | (cum - counts < k_min))
    t = np.clip((y[None, :] - low[:, None]) / np.maximum(cut - low, 1e-12)[:, None], 0.0, 1.0)
    return np.where(inside, counts * (0.2 + 0.8 * (1.0 - t**3) ** 3), 0.0)


class Scale:
    """Centre and scale one coordinate on the valley's trials; ``lo``/``hi``: the valley's range, scaled."""

    def __init__(self, v: np.ndarray, mask: np.ndarray) -> None:
        w = v[mask]
        self.centre = float(w.mean())
        self.scale = max(float(np.ptp(w)) / 2.0, 0.25)
        self.lo, self.hi = self.apply(float(w.min())), self.apply(float(w.max()))

    def apply(self, v: Any) -> Any:
        return (v - self.centre) / self.scale

    def undo(self, v: np.ndarray) -> np.ndarray:
        return v * self.scale + self.centre


def wls(feats: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares for every row of ``weights`` at once: coefficients (R, p) and the weighted
    mean squared residual (R,)."""
    wf = weights[:, :, None] * feats[None, :, :]
    a = np.matmul(wf.transpose(0, 2, 1), feats)
    b = np.matmul(wf.transpose(0, 2, 1), y)
    p = feats.shape[1]
    ridge = (1e-9 * np.trace(a, axis1=1, axis2=2) + 1e-12)[:, None, None] * np.eye(p)
    coef = np.linalg.solve(a + ridge, b[..., None])[..., 0]
    resid = y[None, :] - coef @ feats.T
    return coef, (weights * resid**2).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-12)


def _argmin_1d(coef: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Argmin of c0 + c1 z + c2 z^2 over [lo, hi], per row."""
    c1, c2 = coef[:, 1], coef[:, 2]
    stat = np.where(c2 > 0, -c1 / np.where(c2 > 0, 2.0 * c2, 1.0), lo)
    cand = np.stack([np.full_like(c1, lo), np.full_like(c1, hi), np.clip(stat, lo, hi)], axis=1)
    q = c1[:, None] * cand + c2[:, None] * cand**2
    return cand[np.arange(len(c1)), q.argmin(axis=1)]


def _quad2(coef: np.ndarray, x: np.ndarray, u: np.ndarray) -> np.ndarray:
    c = [coef[:, i : i + 1] if x.ndim == 2 else coef[:, i] for i in range(6)]
    return c[0] + c[1] * x + c[2] * u + c[3] * x * x + c[4] * x * u + c[5] * u * u


def _argmin_2d(coef: np.ndarray, hull: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmin of the 2-D quadratic over a convex polygon (vertices in order; normals: rows (a, b, c) with
    a x + b u + c <= 0 inside), per row: the least of the interior stationary point when inside, and the
    minimum along each edge (which includes the vertices)."""
    c1, c2, c3, c4, c5 = (coef[:, i] for i in range(1, 6))
    det = 4.0 * c3 * c5 - c4**2
    ok = (c3 > 0) & (det > 0)
    safe_det = np.where(ok, det, 1.0)
    xi = np.where(ok, (c2 * c4 - 2.0 * c1 * c5) / safe_det, hull[0, 0])
    ui = np.where(ok, (c1 * c4 - 2.0 * c2 * c3) / safe_det, hull[0, 1])
    signed = xi[:, None] * normals[:, 0] + ui[:, None] * normals[:, 1] + normals[:, 2]
    inside = ok & (signed <= 1e-9).all(axis=1)
    xi, ui = np.where(inside, xi, hull[0, 0]), np.where(inside, ui, hull[0, 1])
    p0 = hull
    d = np.roll(hull, -1, axis=0) - hull  # edge i runs from vertex i to vertex i + 1
    # along an edge, q(p0 + s d) = const + a1 s + a2 s^2, s in [0, 1]
    a2 = c3[:, None] * d[:, 0] ** 2 + c4[:, None] * d[:, 0] * d[:, 1] + c5[:, None] * d[:, 1] ** 2
    a1 = (c1[:, None] * d[:, 0] + c2[:, None] * d[:, 1] + 2.0 * c3[:, None] * p0[:, 0] * d[:, 0]
          + c4[:, None] * (p0[:, 0] * d[:, 1] + p0[:, 1] * d[:, 0]) + 2.0 * c5[:, None] * p0[:, 1] * d[:, 1])
    s_stat = np.clip(np.where(a2 > 0, -a1 / np.where(a2 > 0, 2.0 * a2, 1.0), 0.0), 0.0, 1.0)
    s_all = np.concatenate([s_stat, np.zeros_like(s_stat), np.ones_like(s_stat)], axis=1)
    p0_all, d_all = np.tile(p0, (3, 1)), np.tile(d, (3, 1))
    xs = np.concatenate([xi[:, None], p0_all[:, 0] + s_all * d_all[:, 0]], axis=1)
    us = np.concatenate([ui[:, None], p0_all[:, 1] + s_all * d_all[:, 1]], axis=1)
    k = _quad2(coef, xs, us).argmin(axis=1)
    rows = np.arange(len(c1))
    return xs[rows, k], us[rows, k]


def weighted_median_rows(v: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted median of ``v`` for every row of ``weights``."""
    order = np.argsort(v)
    cum = np.cumsum(weights[:, order], axis=1)
    return v[order][np.argmax(cum >= 0.5 * cum[:, -1:], axis=1)]
