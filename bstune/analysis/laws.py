"""How lr* moves with B: the forms fitted in log2 space, compared by AICc, B_noise and a peak.

"power" a B^alpha, "linear" (alpha = 1), "sqrt" (alpha = 1/2), "saturating" lr_max / (1 + B_noise / B),
"saturating-sqrt" lr_max / (1 + B_noise / B)^(1/2) and "surge" lr_max / (0.5 (sqrt(B_noise/B) +
sqrt(B/B_noise))), which rises, peaks at B = B_noise and falls (Adam: Li et al. 2024). Each is fitted to
every bootstrap replicate of the per-batch optima at once (the rows), weighted by the optima's interval
widths, with Huber's weights on top (``_robust_fit``).
"""

from __future__ import annotations

import math

import numpy as np

from bstune.analysis.results import (
    FORMS,
    NOISE_FORMS,
    SIGMA_FLOOR,
    Interval,
    LawFit,
    law_log2,
    noise_shape,
    quantile_interval,
)

_FIXED_ALPHA = {"linear": 1.0, "sqrt": 0.5}
_GRID_MARGIN = 5.0  # octaves beyond the measured batch sizes searched for B_noise and B_crit
_GRID_STEP = 0.02
SUPPORT_MARGIN = 1.0  # octaves beyond the measured batch sizes where B_noise or B_crit is still reported
_HUBER = 1.345  # spreads beyond which an optimum counts less in a law (Huber's usual constant; _robust_fit)
_IRLS_STEPS = 4
_REJECT_DELTA = 10.0  # AICc difference at which the saturating form is rejected and no B_noise is given
_EDGE_NOTES = {  # (B_noise at the bottom of the grid, at the top)
    "saturating": ("B_noise at the bottom of the search range: lr* is flat",
                   "B_noise at the top of the search range: lr* shows no saturation"),
    "saturating-sqrt": ("B_noise at the bottom of the search range: lr* is flat",
                        "B_noise at the top of the search range: lr* shows no saturation"),
    "surge": ("the peak lies far below the measured batch sizes: lr* falls throughout",
              "the peak lies far above the measured batch sizes: lr* rises throughout"),
}


def fit_forms(sizes: np.ndarray, rows: np.ndarray, criterion: str) -> tuple[dict[str, LawFit], str]:
    """Fit every form to log2 lr*; ``rows``: the point estimates, then the bootstrap replicates (one
    column per batch size). Returns the fits and the preferred form."""
    logb = np.log2(sizes)
    spread = (np.quantile(rows[1:], 0.84, axis=0) - np.quantile(rows[1:], 0.16, axis=0)) / 2.0
    sigma = np.maximum(spread, max(SIGMA_FLOOR, 0.25 * float(np.median(spread))))
    w = 1.0 / sigma**2
    w = w / w.mean()
    fits = {form: _fit_form(form, logb, rows, w, sigma, criterion) for form in FORMS}
    best = min(f.aicc for f in fits.values())
    total = sum(math.exp(-(f.aicc - best) / 2.0) for f in fits.values())
    for f in fits.values():
        f.delta = f.aicc - best
        f.weight = math.exp(-f.delta / 2.0) / total
    preferred = min(fits.values(), key=lambda f: f.aicc).form
    return fits, preferred


def _fit_form(form: str, logb: np.ndarray, rows: np.ndarray, w: np.ndarray, sigma: np.ndarray,
              criterion: str) -> LawFit:
    """One form fitted to every row (weights ``w`` per batch size, mean 1; ``sigma`` the optima's spreads),
    scored on row 0."""
    n = len(logb)
    note = ""
    params, edge = _robust_fit(form, logb, rows, w, sigma)
    k = (1 if form in _FIXED_ALPHA else 2) + 1  # + the residual variance
    resid = rows[0] - law_log2(form, params[:1], logb)[0]
    params = _stretched(params, resid / sigma, k - 1)
    if form in NOISE_FORMS and edge[0] != 0:
        note = _EDGE_NOTES[form][int(edge[0] > 0)]
    var = max(float((w * resid**2).sum()) / n, 1e-4)  # no fit is better than 0.01 octave
    score = n * math.log(var) + 2 * k
    if criterion == "AICc":
        score += 2 * k * (k + 1) / (n - k - 1)
    fit = LawFit(form=form, params={}, intervals={}, rms_log2=float(np.sqrt(np.mean(resid**2))),
                 aicc=score, n_points=n, n_params=k - 1, note=note, _rows=params)
    boot = params[1:]
    if form in NOISE_FORMS:
        c_boot = np.where(edge[1:] > 0, np.inf, boot[:, 0])  # no saturation: lr_max unbounded too
        fit.params = {"lr_max": float(2.0 ** params[0, 0]), "b_noise": float(2.0 ** params[0, 1])}
        fit.intervals = {"lr_max": quantile_interval(2.0**c_boot),
                         "b_noise": quantile_interval(2.0 ** infinite_at_edges(boot[:, 1], edge[1:]))}
    else:
        fit.params = {"a": float(2.0 ** params[0, 0]), "alpha": float(params[0, 1])}
        fit.intervals = {"a": quantile_interval(2.0 ** boot[:, 0])}
        if form == "power":
            lo, hi = quantile_interval(boot[:, 1])
            fit.intervals["alpha"] = (lo, hi)
            fit.contains_linear, fit.contains_sqrt = bool(lo <= 1.0 <= hi), bool(lo <= 0.5 <= hi)
    return fit


def _stretched(params: np.ndarray, z: np.ndarray, n_params: int) -> np.ndarray:
    """The replicates' parameters stretched about the data's by the Birge ratio sqrt(chi2 / dof), where the
    optima scatter about the law more than their own spreads say (never narrowed). A bootstrap of one
    study's trials sees each optimum's spread within its training seed, not how that seed's valley differs
    from another's: on the digits grid the optima lay about twice their bootstrap spreads off the law, and
    alpha's interval held the multi-seed reference in 0.66 of studies at 24 trials per batch size
    (development seeds), stretched so in 0.91 (benchmarks/REAL.md). ``z``: the data's optima off the law, in
    their spreads."""
    dof = len(z) - n_params
    if dof < 1:
        return params
    ratio = math.sqrt(max(1.0, float((z**2).sum()) / dof))
    out = params.copy()
    out[1:] = params[0] + ratio * (params[1:] - params[0])
    return out


def _robust_fit(form: str, logb: np.ndarray, rows: np.ndarray, w: np.ndarray,
                sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parameters (rows, 2) and grid edges (rows,) of ``form`` by iteratively reweighted least squares with
    Huber's weights: an optimum more than _HUBER of its spreads off the law counts less. A bootstrap
    replicate of an optimum is heavy-tailed (a resample that drew few trials near the bottom of a valley
    can put it an octave off), and in a least-squares law one such replicate of any batch size moves the
    whole replicate of the law, which widens the law's intervals beyond its estimator's spread. The data
    and every replicate are fitted alike."""
    weights = np.broadcast_to(w, rows.shape)
    for step in range(_IRLS_STEPS + 1):
        params, edge = _fit_rows(form, logb, rows, weights)
        if step < _IRLS_STEPS:
            z = np.abs(rows - law_log2(form, params, logb)) / sigma
            weights = w * np.minimum(1.0, _HUBER / np.maximum(z, 1e-12))
    return params, edge


def _fit_rows(form: str, logb: np.ndarray, rows: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares of ``form`` for every row (weights ``w`` per row and batch size)."""
    wsum = w.sum(axis=1)
    edge = np.zeros(len(rows), dtype=int)
    if form == "power":
        xm = (w * logb).sum(axis=1) / wsum
        ym = (rows * w).sum(axis=1) / wsum
        dx = logb[None, :] - xm[:, None]
        alpha = ((rows - ym[:, None]) * w * dx).sum(axis=1) / (w * dx**2).sum(axis=1)
        return np.stack([ym - alpha * xm, alpha], axis=1), edge
    if form in _FIXED_ALPHA:
        a = _FIXED_ALPHA[form]
        return np.stack([((rows - a * logb) * w).sum(axis=1) / wsum, np.full(len(rows), a)], axis=1), edge
    c, t, edge = profile_saturating(logb, rows, w, form)
    return np.stack([c, t], axis=1), edge


def profile_saturating(logb: np.ndarray, rows: np.ndarray, w: np.ndarray,
                       form: str = "saturating") -> tuple[np.ndarray, ...]:
    """Fit rows ~ c + noise_shape(form, t, log2 B) for every row: t on a grid (c profiled out in closed form),
    refined by a parabola through the three best grid points. Returns c, t and edge (-1/+1: t at the grid's
    end)."""
    grid = np.arange(logb.min() - _GRID_MARGIN, logb.max() + _GRID_MARGIN + _GRID_STEP / 2, _GRID_STEP)
    g = noise_shape(form, grid[:, None], logb[None, :])  # (T, n)
    w = np.broadcast_to(w, rows.shape)  # weights per row and batch size
    wsum = w.sum(axis=1)
    swy = (rows * w).sum(axis=1)
    swg = w @ g.T  # (R, T)
    sse = (rows**2 * w).sum(axis=1)[:, None] - 2.0 * (rows * w) @ g.T + w @ (g**2).T \
        - (swy[:, None] - swg) ** 2 / wsum[:, None]
    k = sse.argmin(axis=1)
    last = len(grid) - 1
    kk = np.clip(k, 1, last - 1)
    r = np.arange(len(k))
    s0, s1, s2 = sse[r, kk - 1], sse[r, kk], sse[r, kk + 1]
    denom = s0 - 2.0 * s1 + s2
    inner = (k > 0) & (k < last) & (denom > 0)
    shift = np.where(inner, np.clip(0.5 * (s0 - s2) / np.where(denom > 0, denom, 1.0), -1.0, 1.0), 0.0)
    t = grid[k] + shift * _GRID_STEP
    c = ((rows - noise_shape(form, t[:, None], logb[None, :])) * w).sum(axis=1) / wsum
    edge = np.where(k == 0, -1, np.where(k == last, 1, 0))
    return c, t, edge


def infinite_at_edges(t: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """log2 B_noise (or B_crit) replicates, with those stuck at the grid's ends sent to -inf / +inf."""
    return np.where(edge > 0, np.inf, np.where(edge < 0, -np.inf, t))


def estimate_b_noise(fits: dict[str, LawFit], preferred: str, basis: str, sizes: np.ndarray,
                     warnings: list[str]) -> tuple[float | None, Interval | None]:
    """B_noise and its interval from the saturating fit (the square-root one where that is preferred),
    unless that form is rejected or puts B_noise beyond the measured batch sizes (said in ``warnings``): one
    below the smallest measured batch size is no critical batch size, only a sign that lr* is flat."""
    what = "the effective lr*" if basis == "effective" else "lr*"
    sat = fits["saturating-sqrt" if preferred == "saturating-sqrt" else "saturating"]
    t0 = math.log2(sat.params["b_noise"])
    lo_b, hi_b = math.log2(sizes.min()), math.log2(sizes.max())
    if sat.delta > _REJECT_DELTA:
        warnings.append(f"the {sat.form} form fits {what} much worse than the {preferred} form "
                        f"(difference {sat.delta:.1f}): no B_noise estimate")
        return None, None
    if t0 > hi_b + SUPPORT_MARGIN:
        warnings.append(f"{what} still grows at the largest batch size ({int(sizes.max())}): "
                        f"no saturation seen, so B_noise is above ~{sat.intervals['b_noise'][0]:.0f}; "
                        "measure larger batch sizes to locate it")
        return None, None
    if t0 < lo_b:
        warnings.append(f"{what} is flat across the measured batch sizes: B_noise is below the "
                        f"smallest one ({int(sizes.min())}), so no critical batch size is given; measure "
                        "smaller batch sizes to locate it")
        return None, None
    return sat.params["b_noise"], sat.intervals["b_noise"]


def find_peak(fits: dict[str, LawFit], preferred: str, basis: str, sizes: np.ndarray,
              warnings: list[str]) -> tuple[float | None, Interval | None, str]:
    """Where lr* peaks, with its interval, when the surge form is preferred and puts the peak inside the
    measured batch sizes; and how lr* moves with B: "rises", "falls" or "peaks" (said in ``warnings``)."""
    what = "the effective lr*" if basis == "effective" else "lr*"
    if preferred != "surge":
        power = fits["power"]
        if preferred == "power" and power.intervals["alpha"][1] < 0:
            warnings.append(f"{what} falls with B (alpha = {power.params['alpha']:.2f}): a larger batch size "
                            "needs a smaller lr")
            return None, None, "falls"
        return None, None, "rises"
    surge = fits["surge"]
    peak = surge.params["b_noise"]
    if peak < sizes.min():
        warnings.append(f"{what} falls with B across the measured batch sizes (surge form, its peak below "
                        f"B={int(sizes.min())}): a larger batch size needs a smaller lr")
        return None, None, "falls"
    if peak > sizes.max():
        return None, None, "rises"
    warnings.append(f"{what} peaks at B ~ {peak:.0f} and falls beyond it (the surge form, as Adam-style "
                    "optimizers show): above that batch size a larger batch needs a smaller lr, and no "
                    "rising law holds there")
    return peak, surge.intervals["b_noise"], "peaks"
