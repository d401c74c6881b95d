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

_Curves = dict[int, list[tuple[np.ndarray, np.ndarray]]]  # per batch size: (steps, sign * value) per trial


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


def _curves(table: TrialTable, groups: dict[int, list[TrialRecord]], sign: float) -> _Curves:
    """Every trial's learning curve in optimizer steps, points without steps or a finite value left out."""
    curves: _Curves = {}
    for b, records in groups.items():
        for r in records:
            steps, vals = [], []
            for p in sorted(r.curve, key=lambda p: p.epoch):
                s = p.steps(b, table.n_train)
                if p.value is None or not math.isfinite(p.value) or s is None:
                    continue
                steps.append(s)
                vals.append(sign * p.value)
            if steps:
                curves.setdefault(b, []).append((np.array(steps, dtype=float), np.array(vals)))
    return curves


def _goal(curves: _Curves, per_batch: list[BatchOptimum], sign: float,
          target: float | None) -> tuple[float, str]:
    """The (sign-adjusted) value to reach and the rule that set it."""
    if target is not None:
        return sign * float(target), "given"
    # Noisy curves dip below a target set just under the best value by luck; start from the smooth
    # fitted optimum values instead, and leave a margin.
    optima = sorted(sign * o._fit_value for o in per_batch if o._fit_value is not None)
    ref = optima[math.ceil(_TARGET_SHARE * len(optima)) - 1]
    start = float(np.median([v[0] for cs in curves.values() for _, v in cs]))
    goal = ref + _TARGET_SLACK * max(start - ref, 0.0)
    return goal, "10% of the way from the optimum 3/4 of the batch sizes reach to the median first-epoch value"


def _fewest_steps(curves: _Curves, goal: float) -> tuple[list[StepsPoint], list[int], list[np.ndarray], list[int]]:
    """Per batch size, the fewest steps to ``goal``: the points, the batch sizes whose crossings can be fitted
    and those crossings (one per trial, inf where never), and the batch sizes that only give a bound."""
    points, reached_sizes, crossings, bounds = [], [], [], []
    for b, cs in curves.items():
        found = [_first_crossing(s, v, goal) for s, v in cs]
        cross = np.array([f[0] for f in found])
        ok = np.isfinite(cross)
        s_b = float(cross.min()) if ok.any() else None
        # reached at the first recorded point: the steps it took are only bounded from above
        bound = s_b is not None and found[int(cross.argmin())][1]
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


def _first_crossing(steps: np.ndarray, vals: np.ndarray, goal: float) -> tuple[float, bool]:
    """Steps at which the curve first reaches ``goal`` (inf if never): the first epoch at or below it,
    refined by linear interpolation from the epoch before; and whether that was the first point."""
    hit = np.flatnonzero(vals <= goal)
    if not len(hit):
        return math.inf, False
    i = int(hit[0])
    if i == 0:
        return float(steps[0]), True
    frac = (vals[i - 1] - goal) / (vals[i - 1] - vals[i])
    return float(steps[i - 1] + frac * (steps[i] - steps[i - 1])), False
