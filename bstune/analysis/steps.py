"""Steps to a target value from the learning curves: the fewest optimizer steps any trial of a batch size
needed, and S(B) = S_min (1 + B_crit / B) fitted to them (B_crit = E_min / S_min, E_min the fewest examples).
"""

from __future__ import annotations

import math

import numpy as np

from bstune.analysis.laws import SUPPORT_MARGIN, infinite_at_edges, profile_saturating
from bstune.analysis.results import BatchOptimum, StepsFit, StepsPoint, format_list, quantile_interval
from bstune.trials import TrialRecord, TrialTable

_TARGET_SHARE = 0.75  # default target: near the fitted optimum value that 3/4 of the batch sizes reach ...
_TARGET_SLACK = 0.1  # ... less 10% of the way back to the median first-epoch value

_Curves = dict[int, "_Flat"]  # per batch size: every trial's curve, in optimizer steps, end to end


def steps_fit(table: TrialTable, groups: dict[int, list[TrialRecord]], per_batch: list[BatchOptimum],
              sign: float, target: float | None, n_boot: int, rng: np.random.Generator,
              warnings: list[str]) -> StepsFit | None:
    """The steps-to-target fit, or None where the curves cannot give one (said in ``warnings``)."""
    curves = _curves(table, groups, sign)
    if not curves:
        has_curve = any(r.curve for r in table.records)
        warnings.append("learning curves lack optimizer steps (and the table has no n_train): no "
                        "steps-to-target fit" if has_curve
                        else "no learning curves in the table: no steps-to-target fit")
        return None
    goal, rule = _goal(curves, per_batch, sign, target)
    points, reached_sizes, crossings, bounds = _fewest_steps(curves, goal)
    target_value = sign * goal
    if bounds:
        warnings.append(f"steps to target: at B={format_list(bounds)} the target is reached by the first "
                        "recorded epoch, so the steps are only an upper bound and are left out of the fit "
                        "(record the curve more often, or give a harder target)")
    if len(reached_sizes) < 3:
        warnings.append(f"only {len(reached_sizes)} batch size(s) reach the target {target_value:.4g} after "
                        "their first epoch: no steps-to-target fit (it needs 3; give another target)")
        return None
    return _fit_tradeoff(points, reached_sizes, crossings, target_value, rule, n_boot, rng, warnings)


class _Flat:
    """The learning curves of one batch size end to end (at least one point): ``steps`` and ``vals`` (sign *
    value) per point, each trial's points in epoch order from ``starts[i]`` on; trials without a point left
    out."""

    def __init__(self, steps: np.ndarray, vals: np.ndarray, trial: np.ndarray) -> None:
        self.steps, self.vals = steps, vals
        self.starts = np.flatnonzero(np.r_[True, trial[1:] != trial[:-1]])

    def __len__(self) -> int:
        return len(self.starts)


def _curves(table: TrialTable, groups: dict[int, list[TrialRecord]], sign: float) -> _Curves:
    """Every trial's learning curve in optimizer steps, points without steps or a finite value left out.

    Read into flat arrays (no list per trial): from the table's own arrays where its reader made them (a CSV),
    else from the records' points once."""
    curves: _Curves = {}
    cp = table.curve_points
    if cp is not None and cp.n_records != len(table.records):  # made for other records
        cp = None
    if cp is not None:
        sizes = np.fromiter((r.batch_size for r in table.records), dtype=np.int64, count=len(table.records))
        of_b = sizes[cp.record]
    for b, records in groups.items():
        if cp is not None:
            at = np.flatnonzero(of_b == b)
            trial, epoch, value = cp.record[at], cp.epoch[at], cp.value[at]
            steps, seen = cp.optimizer_steps[at], np.nan_to_num(cp.examples_seen[at])
        else:
            trial, epoch, value, steps, seen = _points(records)
        # as EpochPoint.steps: recorded, else epochs x ceil(n_train / B), else examples seen / B
        if table.n_train:
            steps = np.where(np.isnan(steps), epoch * math.ceil(table.n_train / b), steps)
        else:
            steps = np.where(np.isnan(steps) & (seen > 0), seen / b, steps)
        order = np.lexsort((epoch, trial))  # stable: each trial's points in epoch order
        keep = order[np.isfinite(value[order]) & ~np.isnan(steps[order])]
        if len(keep):
            curves[b] = _Flat(steps[keep], sign * value[keep], trial[keep])
    return curves


def _points(records: list[TrialRecord]) -> tuple[np.ndarray, ...]:
    """The records' curve points as arrays: trial (index in ``records``), epoch, value, optimizer steps and
    examples seen (nan and 0 where not recorded)."""
    nan = math.nan
    points = [(i, p) for i, r in enumerate(records) for p in r.curve]
    n = len(points)
    return (np.fromiter((i for i, _ in points), dtype=np.int64, count=n),
            np.fromiter((p.epoch for _, p in points), dtype=float, count=n),
            np.fromiter((nan if p.value is None else p.value for _, p in points), dtype=float, count=n),
            np.fromiter((nan if p.optimizer_steps is None else p.optimizer_steps for _, p in points), dtype=float,
                        count=n),
            np.fromiter((p.examples_seen or 0 for _, p in points), dtype=float, count=n))


def _goal(curves: _Curves, per_batch: list[BatchOptimum], sign: float,
          target: float | None) -> tuple[float, str]:
    """The (sign-adjusted) value to reach and the rule that set it."""
    if target is not None:
        return sign * float(target), "given"
    # Noisy curves dip below a target set just under the best value by luck; start from the smooth
    # fitted optimum values instead, and leave a margin.
    optima = sorted(sign * o._fit_value for o in per_batch if o._fit_value is not None)
    ref = optima[math.ceil(_TARGET_SHARE * len(optima)) - 1]
    start = float(np.median(np.concatenate([c.vals[c.starts] for c in curves.values()])))
    goal = ref + _TARGET_SLACK * max(start - ref, 0.0)
    return goal, "10% of the way from the optimum 3/4 of the batch sizes reach to the median first-epoch value"


def _fewest_steps(curves: _Curves, goal: float) -> tuple[list[StepsPoint], list[int], list[np.ndarray], list[int]]:
    """Per batch size, the fewest steps to ``goal``: the points, the batch sizes whose crossings can be fitted
    and those crossings (one per trial, inf where never), and the batch sizes that only give a bound."""
    points, reached_sizes, crossings, bounds = [], [], [], []
    for b, cs in curves.items():
        cross, first = _first_crossings(cs, goal)
        ok = np.isfinite(cross)
        s_b = float(cross.min()) if ok.any() else None
        # reached at the first recorded point: the steps it took are only bounded from above
        bound = s_b is not None and bool(first[int(cross.argmin())])
        points.append(StepsPoint(batch_size=b, steps=s_b, examples=None if s_b is None else s_b * b,
                                 n_reached=int(ok.sum()), n_curves=len(cs), upper_bound=bound))
        if bound:
            bounds.append(b)
        elif s_b is not None:
            reached_sizes.append(b)
            crossings.append(cross)
    return points, reached_sizes, crossings, bounds


def _fit_tradeoff(points: list[StepsPoint], reached_sizes: list[int], crossings: list[np.ndarray],
                  target_value: float, rule: str, n_boot: int, rng: np.random.Generator,
                  warnings: list[str]) -> StepsFit:
    """S(B) = S_min (1 + B_crit/B) through the fewest steps, with intervals from resampling each batch size's
    trials."""
    cols = []
    for cross in crossings:
        n = len(cross)
        idx = rng.integers(0, n, size=(n_boot, n))
        cols.append(np.concatenate([[cross.min()], cross[idx].min(axis=1)]))
    s_rows = np.stack(cols, axis=1)
    s_rows = s_rows[np.isfinite(s_rows).all(axis=1)]  # drop replicates in which no drawn trial got there
    logb = np.log2(np.array(reached_sizes, dtype=float))
    y = -np.log2(s_rows)  # S = S_min (1 + B_crit/B) is the saturating form in -log2 S
    c, t, edge = profile_saturating(logb, y, np.ones(len(logb)))
    resid = y[0] - (c[0] - np.logaddexp2(0.0, t[0] - logb))
    fit = StepsFit(target=target_value, target_rule=rule, points=points, s_min=None, e_min=None, b_crit=None,
                   b_crit_interval=None, s_min_interval=None, rms_log2=float(np.sqrt(np.mean(resid**2))))
    if edge[0] != 0 or not logb.min() - SUPPORT_MARGIN <= t[0] <= logb.max() + SUPPORT_MARGIN:
        where = "above the largest" if t[0] > logb.max() else "below the smallest"
        warnings.append(f"steps to target: B_crit lies {where} measured batch size, so S_min, E_min and "
                        "B_crit are not reported")
        return fit
    fit.s_min, fit.b_crit = float(2.0 ** -c[0]), float(2.0 ** t[0])
    fit.e_min = fit.s_min * fit.b_crit
    if len(y) > 20:
        fit.b_crit_interval = quantile_interval(2.0 ** infinite_at_edges(t[1:], edge[1:]))
        fit.s_min_interval = quantile_interval(2.0 ** -c[1:])
    return fit


def _first_crossings(cs: _Flat, goal: float) -> tuple[np.ndarray, np.ndarray]:
    """Per trial, the steps at which its curve first reaches ``goal`` (inf if never): the first epoch at or
    below it, refined by linear interpolation from the epoch before; and whether that was its first point."""
    n_points = len(cs.vals)
    at = np.where(cs.vals <= goal, np.arange(n_points), n_points)
    hit = np.minimum.reduceat(at, cs.starts)  # each trial's first point at or below the goal (n_points: none)
    reached = hit < n_points
    first = reached & (hit == cs.starts)
    i = np.where(reached & ~first, hit, 0)  # the point after the crossing (0: unused)
    s, v = cs.steps, cs.vals
    with np.errstate(divide="ignore", invalid="ignore"):  # only the unused rows can divide by zero
        frac = (v[i - 1] - goal) / (v[i - 1] - v[i])
        cross = np.where(first, s[np.minimum(hit, n_points - 1)], s[i - 1] + frac * (s[i] - s[i - 1]))
    return np.where(reached, cross, math.inf), first
