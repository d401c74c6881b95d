"""The valleys of all batch sizes fitted together: one shape, placed per batch size.

The valley has much the same shape at every batch size; what the batch size changes is where it sits
(Smith & Le 2018; Shallue et al. 2018). Its floor is a line in (x, u) = (log2 lr, log2(1 - m)): along
the effective lr (x - u constant, a tilt of 1) for SGD with many steps, along the plain lr (tilt 0)
for Adam, and in between when a run is too short for momentum to act as a plain multiplier on the lr
(large batches: on digits, a run at B = 512 is 36 steps). So all batch sizes' valleys are fitted at once
with (``FloorFit``)

    y = c_B + k_B q(x - s_B(u)),   s_B(u) = a + b L + f_B + (g + h L) u,   L = log2 B (centred)

q the valley's lopsided profile across the floor (``wall``), the floor a line in log2 B with per batch
size a shift f_B, its tilt moving linearly with log2 B, and the curvature k_B = exp(kappa + d_B). A batch
size with fewer than _STAND_ALONE distinct trials in its valley has f_B and d_B pulled towards 0 by priors
worth _FLOOR_PRIOR and _POOL_PRIOR trials, so it is placed by the others' shape and by the line through their
floors; one with more is placed by its own trials alone (pulling its floor towards a line in log2 B would bend
a curved lr*(B) and shrink the intervals). The priors are scaled, and the rule applied, per bootstrap row from
that row's own draws: each resample is fitted by the estimator that fits the data.
"""

from __future__ import annotations

import math

import numpy as np

from bstune.analysis.results import PLATEAU_NOISE
from bstune.analysis.valley import (
    MIN_POINTS_2D,
    WINDOW_QUANTILE,
    Valley,
    resample_counts,
    sorted_points,
    weighted_median_rows,
    window_weights,
)
from bstune.trials import TrialRecord

_POOL_PRIOR = 10.0  # trials' worth of belief that a batch size's valley is as curved as the others'
_FLOOR_PRIOR = 0.5  # ... that its floor lies on the line through the others' (in log2 B)
_TILT_PRIOR = 1.0  # ... that the floor's tilt is 1/2, between the plain lr's (0) and the effective lr's (1)
_STAND_ALONE = 4  # distinct trials in its valley from which a batch size's valley is placed by its own trials
_GAUGE = 1e-3  # the share of those priors left where it stands alone (see FloorFit._priors)
_LM_STEPS = 40
_ROWS_AT_ONCE = 25  # bootstrap rows solved together
_LM_TOL = 1e-9  # relative decrease of the cost below which a row has converged
_FLOOR_SHARED = 5  # the model's shared parameters: a, b, g, h, kappa
_WALL_POWER = 0.5  # the valley is a parabola in (lr / lr*)^this (see wall)

# One batch size's valley: B, log2 lr, log2(1 - m), sign * value (sorted), weights per resample.
_Block = tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def pooled_valleys(done: dict[int, list[TrialRecord]], sign: float, n_boot: int,
                   rng: np.random.Generator) -> dict[int, Valley]:
    """The valleys of every batch size with >= 2 completed trials, fitted together (see the module doc).

    The momentum at the optimum is the valley's weighted median, the lr* the floor there, clipped to the
    valley's sampled lr range. Each row (the data, then every resample) is fitted alike. Resamples draw
    trials within each batch size; where one drew fewer than two distinct trials of a batch size, that batch
    size takes another resample's replicate."""
    blocks = _blocks(done, sign, n_boot, rng)
    nb = len(blocks)
    # the shared shape needs data beyond each batch size's offset and shift
    if nb < 2 or sum(int((blk[4][0] > 0).sum()) for blk in blocks) < 2 * nb + 3:
        return {}
    w = np.concatenate([blk[4] for blk in blocks], axis=1)
    used = w.any(axis=0)  # only trials in some resample's valley matter below
    w = w[:, used]
    ids = np.concatenate([np.full(len(blk[3]), j) for j, blk in enumerate(blocks)])[used]
    x = np.concatenate([blk[1] for blk in blocks])[used]
    u = np.concatenate([blk[2] for blk in blocks])[used]
    y0 = min(float(blk[3].min()) for blk in blocks)
    y = np.concatenate([blk[3] for blk in blocks])[used] - y0
    in0 = w[0] > 0
    log2_b = np.log2([float(blk[0]) for blk in blocks])
    lb = log2_b - float(log2_b.mean())
    tilted = float(np.ptp(u)) >= 1e-9  # with one momentum there is no tilt to fit
    u_centre = float(u[in0].mean())
    uc = u - u_centre if tilted else np.zeros_like(u)
    theta, resid = FloorFit(x, uc, lb, y, w, ids, tilted).fit()
    out = {}
    for j, block in enumerate(blocks):
        mine = ids == j
        noise = math.sqrt(float((w[0, mine] * resid[mine] ** 2).sum() / max(w[0, mine].sum(), 1e-12)))
        valley = _place_on_floor(block, j, theta, lb[j], nb, tilted, u_centre, noise, y0, rng)
        if valley is not None:
            out[block[0]] = valley
    return out


def _blocks(done: dict[int, list[TrialRecord]], sign: float, n_boot: int,
            rng: np.random.Generator) -> list[_Block]:
    """Each batch size's valley points (those with >= 2 completed trials), in batch-size order."""
    points = {b: sorted_points(rs, sign) for b, rs in sorted(done.items()) if len(rs) >= 2}
    counts = {b: resample_counts(len(pts[2]), n_boot, rng) for b, pts in points.items()}
    if not points:
        return []
    # Far from the optimum every batch size is stuck near the same loss, so the top of the window's scale is
    # shared (per row, over the row's draws of every batch size): a batch size whose trials all sit near its
    # valley would otherwise see only its bottom.
    y_all = np.concatenate([pts[2] for pts in points.values()])
    c_all = np.concatenate([counts[b] for b in points], axis=1)
    order = np.argsort(y_all, kind="stable")
    cum = np.cumsum(c_all[:, order], axis=1)
    high = y_all[order][np.argmax(cum >= WINDOW_QUANTILE * cum[:, -1:], axis=1)]
    return [(b, x, u, y, window_weights(y, counts[b], min(len(y), MIN_POINTS_2D), shared_high=high))
            for b, (x, u, y) in points.items()]


def _place_on_floor(block: _Block, j: int, theta: np.ndarray, lb_j: float, nb: int, tilted: bool,
                    u_centre: float, noise: float, y0: float, rng: np.random.Generator) -> Valley | None:
    """Batch size j's optimum on the fitted floor, per row; None where no resample drew two of its trials."""
    _, xb, ub, _, wb = block
    a, b_, g, h, kappa = (theta[:, i] for i in range(_FLOOR_SHARED))
    c = theta[:, _FLOOR_SHARED : _FLOOR_SHARED + nb]
    f = theta[:, _FLOOR_SHARED + 2 * nb : _FLOOR_SHARED + 3 * nb]
    lu = weighted_median_rows(ub, wb)
    tilt = g + h * lb_j
    lx = a + b_ * lb_j + f[:, j] + tilt * ((lu - u_centre) if tilted else 0.0)
    inside = wb[0] > 0
    floor = lx.copy()
    # each row's own sampled range: the data's for the data, the resample's draws for a resample
    lx = np.clip(lx, np.where(wb > 0, xb, np.inf).min(axis=1), np.where(wb > 0, xb, -np.inf).max(axis=1))
    # the value: the fitted expectation at the recommended (lr, m), off the floor where lr* was clipped; with one
    # momentum (the sparse fallback on real valleys, whose wall this shape does not describe) the floor's level
    value = float(c[0, j]) + y0
    if tilted:
        k0 = math.exp(float(kappa[0] + theta[0, _FLOOR_SHARED + nb + j]))
        value += k0 * float(wall(np.array([lx[0] - floor[0]]))[0][0])
    # the plateau: where the valley lies within one run's noise (PLATEAU_NOISE x the residual scatter) of the
    # optimum's value, across the floor
    level = PLATEAU_NOISE * noise / np.exp(kappa + theta[:, _FLOOR_SHARED + nb + j])
    low, high = wall_within(level)
    plateau = np.stack([lx + low, lx + high], axis=1)
    lost = (wb > 0).sum(axis=1) < 2
    if lost.all():
        return None
    if lost.any():
        take = rng.choice(np.flatnonzero(~lost), size=int(lost.sum()))
        lx[lost], lu[lost], plateau[lost] = lx[take], lu[take], plateau[take]
    return Valley(lx, lu, value, "pooled" if tilted else "pooled-lr", int(inside.sum()),
                  noise, float(tilt[0]) if tilted else 0.0, plateau)


class FloorFit:
    """Weighted least squares of the pooled valley model for every row of ``weights`` at once
    (Levenberg-Marquardt, all rows in step), from a start the data's best trials give.

    Parameters, per row: a, b, g, h, kappa (shared), then c_B, d_B, f_B for each of the nb batch sizes.
    ``ids``: each trial's batch size (0..nb-1), the trials in batch-size order; ``lb``: the centred log2 B."""

    def __init__(self, x: np.ndarray, u: np.ndarray, lb: np.ndarray, y: np.ndarray, weights: np.ndarray,
                 ids: np.ndarray, tilted: bool) -> None:
        self.x, self.u, self.y, self.ids, self.weights = x, u, y, ids, weights
        self.nb = nb = len(lb)
        self.n = weights.shape[1]
        self.p = _FLOOR_SHARED + 3 * nb
        self.L = lb[ids]
        self.starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # where each batch size's trials begin
        self.theta0, self.centre = self._start(lb, tilted)
        self.prior_w = self._priors(float(self.centre[2]), lb)
        free = np.ones(self.p, dtype=bool)
        if not tilted:
            free[2:4] = False
        self.shared_free = free[:_FLOOR_SHARED].astype(float)
        self.block = _FLOOR_SHARED + np.arange(3)[:, None] * nb + np.arange(nb)[None, :]  # (c, d, f) x batch size

    def _start(self, lb: np.ndarray, tilted: bool) -> tuple[np.ndarray, np.ndarray]:
        """The starting parameters (the floor through each batch size's best trial with a tilt of 1/2, a
        common curvature) and the priors' centre."""
        x, u, y, ids, weights, nb = self.x, self.u, self.y, self.ids, self.weights, self.nb
        in0 = weights[0] > 0
        best = [int(np.flatnonzero((ids == j) & in0)[np.argmin(y[(ids == j) & in0])]) for j in range(nb)]
        g0 = 0.5 if tilted else 0.0
        shift = np.array([x[i] - g0 * u[i] for i in best])
        slope = float(np.polyfit(lb, shift, 1)[0])  # nb >= 2: pooled_valleys fits nothing with fewer
        intercept = float(shift.mean() - slope * lb.mean())
        e0 = x - (intercept + slope * self.L + (shift - intercept - slope * lb)[ids] + g0 * u)
        spread = float(np.average(e0**2, weights=weights[0]))
        k0 = max(float(np.average(y, weights=weights[0])), 1e-9) / max(spread, 0.25)
        theta0 = np.concatenate([[intercept, slope, g0, 0.0, math.log(k0)],
                                 [float(y[(ids == j) & in0].min()) for j in range(nb)], np.zeros(nb),
                                 shift - intercept - slope * lb])
        centre = np.zeros(self.p)
        centre[2] = g0
        return theta0, centre

    def _priors(self, g0: float, lb: np.ndarray) -> np.ndarray:
        """Each row's priors' weights (rows, p), from that row's own draws, so that a resample is fitted by the
        estimator that fits the data. In the data's units: "worth n trials" of the change each parameter
        makes to a trial's value, the spread about the floor taken from each batch size's best draw.

        A batch size's shift and curvature are pulled to the others' only in a row where it has fewer than
        _STAND_ALONE distinct trials in its valley; elsewhere a token prior (_GAUGE of that) only fixes the
        line through the floors (a, b) and the common curvature (kappa), which its own parameters would
        otherwise leave free, and leaves its floor where its trials put it."""
        x, u, y, ids, w, nb, p = self.x, self.u, self.y, self.ids, self.weights, self.nb, self.p
        e0 = np.empty_like(w)
        for j in range(nb):
            cols = np.flatnonzero(ids == j)
            best = cols[np.where(w[:, cols] > 0, y[cols], np.inf).argmin(axis=1)]
            e0[:, cols] = (x[cols] - g0 * u[cols])[None, :] - (x[best] - g0 * u[best])[:, None]
        wsum = np.maximum(w.sum(axis=1), 1e-12)
        m2, m4 = (w * e0**2).sum(axis=1) / wsum, (w * e0**4).sum(axis=1) / wsum
        k0 = np.maximum((w * y).sum(axis=1) / wsum, 1e-9) / np.maximum(m2, 0.25)
        distinct = np.add.reduceat((w > 0).astype(float), self.starts, axis=1)
        pooled = np.where(distinct < _STAND_ALONE, 1.0, _GAUGE)
        prior_w = np.zeros((w.shape[0], p))
        first = _FLOOR_SHARED
        prior_w[:, first + nb : first + 2 * nb] = _POOL_PRIOR * (k0**2 * m4)[:, None] * pooled
        prior_w[:, first + 2 * nb :] = _FLOOR_PRIOR * 4.0 * (k0**2 * m2)[:, None] * pooled
        prior_w[:, 2] = _TILT_PRIOR * 4.0 * k0**2 * m2 * (w * u**2).sum(axis=1) / wsum
        prior_w[:, 3] = prior_w[:, 2] * max(float(np.mean(lb**2)), 1e-12)
        return prior_w

    def fit(self) -> tuple[np.ndarray, np.ndarray]:
        """The parameters (R, 5 + 3 nb) of every row, and the data's (row 0's) unweighted residual per trial.

        The data is solved alone (so that its solution does not depend on the resamples beside it), then
        every resample from the data's solution (they differ little)."""
        sw, pw = np.sqrt(self.weights), self.prior_w
        theta = self.solve(self.theta0[None, :], sw[:1], pw[:1])
        resid = self.residuals(theta, np.ones((1, self.n)), pw[:1])[0][0, : self.n]
        # the resamples a block at a time (each row is solved on its own: the same numbers), so that the
        # normal equations' (rows, trials, 15) terms stay small whatever the number of resamples
        rest = [self.solve(np.tile(theta[0], (len(sw[i : i + _ROWS_AT_ONCE]), 1)), sw[i : i + _ROWS_AT_ONCE],
                           pw[i : i + _ROWS_AT_ONCE]) for i in range(1, self.weights.shape[0], _ROWS_AT_ONCE)]
        return np.concatenate([theta, *rest]), resid

    def residuals(self, theta: np.ndarray, sw: np.ndarray,
                  prior_w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted residuals with the priors' appended, the offsets from the floor e, the curvatures k."""
        nb, ids = self.nb, self.ids
        a, b, g, h, kappa = (theta[:, i : i + 1] for i in range(_FLOOR_SHARED))
        c, d, f = (theta[:, _FLOOR_SHARED + i * nb : _FLOOR_SHARED + (i + 1) * nb] for i in range(3))
        e = self.x - (a + b * self.L + f[:, ids] + (g + h * self.L) * self.u)
        k = np.exp(kappa + d[:, ids])
        r = sw * (self.y - c[:, ids] - k * wall(e)[0])
        pr = np.sqrt(prior_w) * (theta - self.centre)
        return np.concatenate([r, pr], axis=1), e, k

    def normal_equations(self, theta: np.ndarray, e: np.ndarray, k: np.ndarray, wr: np.ndarray,
                         w: np.ndarray, prior_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """J'J and J'r of the weighted residuals, from the model's gradient per trial: five shared
        parameters, and (c, d, f) of the trial's own batch size, so each sum over trials is a small one."""
        p, L, u, starts, block = self.p, self.L, self.u, self.starts, self.block
        q, dq = wall(e)
        dm_ds = -k * dq  # d model / d floor position
        shared = np.stack([dm_ds, dm_ds * L, dm_ds * u, dm_ds * L * u, k * q], axis=2) * self.shared_free
        own = np.stack([np.ones_like(e), k * q, dm_ds], axis=2)
        rows = theta.shape[0]
        a_mat = np.zeros((rows, p, p))
        ws = w[:, :, None] * shared
        a_mat[:, :_FLOOR_SHARED, :_FLOOR_SHARED] = np.matmul(ws.transpose(0, 2, 1), shared)
        # sums over each batch size's trials (they come in batch-size order): (rows, nb, ...)
        cross = np.add.reduceat(ws[:, :, :, None] * own[:, :, None, :], starts, axis=1)
        own_own = np.add.reduceat((w[:, :, None] * own)[:, :, :, None] * own[:, :, None, :], starts, axis=1)
        own_grad = -np.add.reduceat(wr[:, :, None] * own, starts, axis=1)
        grad = np.zeros((rows, p))
        grad[:, :_FLOOR_SHARED] = -np.matmul(wr[:, None, :], shared)[:, 0, :]
        for i in range(3):
            a_mat[:, :_FLOOR_SHARED, block[i]] = cross[:, :, :, i].transpose(0, 2, 1)
            a_mat[:, block[i], :_FLOOR_SHARED] = cross[:, :, :, i]
            grad[:, block[i]] = own_grad[:, :, i]
            for t in range(3):
                a_mat[:, block[i], block[t]] = own_own[:, :, i, t]  # pairs: each batch size with itself
        diag = np.arange(p)
        a_mat[:, diag, diag] += prior_w
        grad += prior_w * (theta - self.centre)
        return a_mat, grad

    def solve(self, theta: np.ndarray, sw: np.ndarray, prior_w: np.ndarray) -> np.ndarray:
        """Levenberg-Marquardt on every row at once; a row drops out once it has converged."""
        p, n = self.p, self.n
        theta = theta.copy()
        lam = np.full(theta.shape[0], 1e-3)
        current = (self.residuals(theta, sw, prior_w)[0] ** 2).sum(axis=1)
        active = np.arange(theta.shape[0])
        for _ in range(_LM_STEPS):
            th, cur, lm, s_w, pw = theta[active], current[active], lam[active], sw[active], prior_w[active]
            r, e, k = self.residuals(th, s_w, pw)
            a_mat, grad = self.normal_equations(th, e, k, r[:, :n] * s_w, s_w**2, pw)
            diag = np.diagonal(a_mat, axis1=1, axis2=2)
            ridge = (1e-9 * diag.sum(axis=1) + 1e-12)[:, None] + lm[:, None] * diag
            step = -np.linalg.solve(a_mat + ridge[:, :, None] * np.eye(p), grad[:, :, None])[:, :, 0]
            trial = th + step
            with np.errstate(over="ignore", invalid="ignore"):  # a wild step overflows (inf, nan): rejected
                new = (self.residuals(trial, s_w, pw)[0] ** 2).sum(axis=1)
            better = new < cur
            gain = np.where(better, cur - new, 0.0)
            theta[active] = np.where(better[:, None], trial, th)
            current[active] = np.where(better, new, cur)
            lam[active] = np.where(better, lm / 3.0, lm * 4.0)
            tiny = np.linalg.norm(step, axis=1) <= 1e-6 * (np.linalg.norm(th, axis=1) + 1e-6)
            active = active[~(tiny | (better & (gain <= _LM_TOL * current[active])))]
            if not len(active):
                break
        return theta


def wall_within(level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The offsets from the floor (octaves of lr, below and above) at which ``wall`` reaches ``level``; the
    lower one -inf where the slow side never does."""
    a = _WALL_POWER * math.log(2.0)
    g = np.sqrt(np.maximum(level, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.where(a * g < 1.0, np.log2(np.maximum(1.0 - a * g, 1e-300)) / _WALL_POWER, -np.inf)
    return low, np.log2(1.0 + a * g) / _WALL_POWER


def wall(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The valley's profile across its floor, at e octaves of lr from it, and its derivative: a parabola in
    (lr / lr*)^_WALL_POWER, q = ((2^(p e) - 1) / (p ln 2))^2, which is e^2 near the floor. A parabola in
    log lr (p -> 0) has walls equally steep, and the valley of a training run is not: it slopes up slowly
    towards small lr (a run that learns too slowly) and steeply towards large lr (a run at the edge of
    stability), and a symmetric fit across both walls puts the floor on the slow side."""
    a = _WALL_POWER * math.log(2.0)
    g = np.expm1(a * e) / a
    return g * g, 2.0 * g * (1.0 + a * g)  # 1 + a g = 2^(p e)
