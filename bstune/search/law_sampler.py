"""A sampler that shares across batch sizes where the valley is, relative to a fitted law lr*(B).

The per-batch-size samplers of ``space.py`` start from scratch at every batch size. But the valley has much
the same shape at every B and moves along the effective lr lr/(1 - m) as B grows (Smith & Le 2018; Shallue et
al. 2018), so the trials of one batch size say where to look at another once that move is taken out. For a
trial at batch size B this sampler works in the coordinates

    r = log2(lr / (1 - m)) - law(log2 B)        (the effective lr relative to the law's prediction at B)
    u = log2(1 - m)

where ``law`` is a straight line in log-log space through each batch size's best effective lrs so far (its
slope pulled towards 1/2, between the square-root and the linear rule, while few batch sizes say otherwise).

What it proposes is shaped by what the analysis needs, not by where the single best trial is: the optimum of
a flat valley is located by a smooth fit over the valley *and its walls* (``bstune/analysis``), so trials packed
around the best one (what TPE does) leave the fit with nothing but noise. So the sampler spreads its trials
evenly, quasi-randomly (a scrambled Sobol sequence per batch size, like the standard protocol), over a band
of r: the range in which the trials of all batch sizes, pooled relative to the law, sit in the valley, widened
by ``margin`` octaves on each side for the walls, and the whole range of u. What it saves is the part of the
lr range far from every valley, where the standard protocol spends most of its trials.

Until ``n_startup_trials`` trials have finished (over all batch sizes), and whenever no trial is in a valley
yet, the band is the whole search space. Nothing is kept in memory: each proposal is computed from the trials
in the storage, with the trial's position among its batch size's trials as the Sobol index, so workers that
share a storage cooperate and a resumed study carries on.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from scipy.stats import qmc

from bstune.trials import BATCH_SIZE, LR, ONE_MINUS_M, Attr, State

PRIOR_SLOPE = 0.5  # d log2 lr* / d log2 B before the data say otherwise: between sqrt (0.5) and linear (1)
SLOPE_RANGE = (-0.5, 1.5)  # a fitted slope outside this is noise, not a law
VALLEY_DEPTH = 0.4  # "in the valley": the analysis's window, 40% of the way from a batch size's best value
_TOP = 3  # best completed trials per batch size that place it for the law


@dataclass(frozen=True)
class Law:
    """log2 of the effective lr* as a straight line in log2 B."""

    intercept: float  # at log2 B = centre
    slope: float
    centre: float

    def __call__(self, batch_size: float) -> float:
        return self.intercept + self.slope * (math.log2(batch_size) - self.centre)


@dataclass(frozen=True)
class Observation:
    """One finished trial as the sampler sees it."""

    batch_size: int
    log2_lr: float
    log2_one_minus_m: float
    score: float  # rank within its batch size: 0 (best) .. 1 (worst)
    depth: float  # (value - its batch size's best) / (90th percentile of all completed - that best); inf if not
    # completed (pruned, diverged)

    @property
    def log2_effective_lr(self) -> float:
        return self.log2_lr - self.log2_one_minus_m

    @property
    def complete(self) -> bool:
        return math.isfinite(self.depth)


class LawSampler(BaseSampler):
    """Quasi-random (lr, m) over the band of effective lr, relative to a law lr*(B) fitted across batch sizes,
    where the trials of every batch size found the valley (see the module doc).

    The inner sampler of ``space.BatchSizeSampler``, which chooses each trial's batch size and then, since this
    sampler ``sees_all_batch_sizes``, hands it the whole study rather than one batch size's view.
    """

    sees_all_batch_sizes = True

    def __init__(self, n_startup_trials: int = 8, seed: int | None = None, margin: float = 1.0) -> None:
        self._n_startup = n_startup_trials
        self._seed = seed if seed is not None else _fresh_seed()
        self._margin = margin

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}  # BatchSizeSampler hands over the (lr, 1 - m) space itself

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        b = trial.params.get(BATCH_SIZE)
        lr_dist, m_dist = search_space.get(LR), search_space.get(ONE_MINUS_M)
        if b is None or not _log_float(lr_dist) or (m_dist is not None and not _log_float(m_dist)):
            return {}
        assert isinstance(lr_dist, FloatDistribution)
        trials = study.get_trials(deepcopy=False)
        fixed_u = None if m_dist is not None else _fixed_log2_one_minus_m(trials)
        obs = observations(trials, study.direction, fixed_u)
        x_lo, x_hi = math.log2(lr_dist.low), math.log2(lr_dist.high)
        u_lo, u_hi = ((math.log2(m_dist.low), math.log2(m_dist.high)) if isinstance(m_dist, FloatDistribution)
                      else (fixed_u or 0.0, fixed_u or 0.0))
        band = self.band(obs, int(b)) if len(obs) >= max(self._n_startup, 1) else None
        # This trial's place among its batch size's trials: the index into that batch size's Sobol sequence.
        index = sum(t.params.get(BATCH_SIZE) == b and t.number < trial.number for t in trials)
        p = _sobol_point(_derive_seed(self._seed, int(b), "sobol"), index)
        u = u_lo + p[1] * (u_hi - u_lo)
        lo, hi = x_lo, x_hi
        if band is not None:  # the lr range at this momentum that falls in the band, if any does
            lo, hi = max(x_lo, band[0] + u), min(x_hi, band[1] + u)
            if lo >= hi:
                lo, hi = x_lo, x_hi
        out: dict[str, Any] = {LR: 2.0 ** min(max(lo + p[0] * (hi - lo), x_lo), x_hi)}
        if isinstance(m_dist, FloatDistribution):
            out[ONE_MINUS_M] = min(max(2.0**u, m_dist.low), m_dist.high)
        return out

    def band(self, obs: Sequence[Observation], batch_size: int) -> tuple[float, float] | None:
        """The band of log2 effective lr to sample at ``batch_size``: where the trials of every batch size,
        placed relative to the law, are in the valley, widened by the margin. None while none is."""
        law = fit_law(obs)
        r = [o.log2_effective_lr - law(o.batch_size) for o in obs if o.depth <= VALLEY_DEPTH]
        if not r:
            return None
        centre = law(batch_size)
        return centre + min(r) - self._margin, centre + max(r) + self._margin

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        # Seeded by the trial and the parameter, so that lr and momentum are drawn independently of each other.
        seed = _derive_seed(self._seed, trial.number, param_name)
        return RandomSampler(seed=seed).sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        self._seed = _fresh_seed()


# --------------------------------------------------------------------------------------------- helpers


def observations(trials: Sequence[FrozenTrial], direction: StudyDirection,
                 fixed_log2_one_minus_m: float | None = None) -> list[Observation]:
    """Finished trials as observations. Within its batch size each is ranked: completed trials by value, then
    pruned ones (the longer they ran, the better), then diverged ones; failures (OOM, errors) say nothing
    about the lr and are left out."""
    sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0
    rows: dict[int, list[tuple[tuple[float, float, float], float, float]]] = {}
    for t in trials:
        b = t.params.get(BATCH_SIZE)
        key = _rank_key(t, sign) if b is not None else None
        lr = t.params.get(LR, t.user_attrs.get(Attr.LR))
        if key is None or lr is None or not lr > 0:
            continue
        if ONE_MINUS_M in t.params:
            u = math.log2(t.params[ONE_MINUS_M])
        elif fixed_log2_one_minus_m is not None:
            u = fixed_log2_one_minus_m
        elif Attr.MOMENTUM in t.user_attrs:
            u = math.log2(1.0 - float(t.user_attrs[Attr.MOMENTUM]))
        else:
            continue
        rows.setdefault(int(b), []).append((key, math.log2(lr), u))
    # Far from the optimum every batch size is stuck near the same (initial) loss, so the top of the scale
    # is shared; the bottom is each batch size's own best.
    done = [key[2] for rs in rows.values() for key, _, _ in rs if key[0] == 0]
    high = float(np.quantile(done, 0.9)) if done else 0.0
    out = []
    for b, rs in rows.items():
        rs.sort(key=lambda row: row[0])
        low = rs[0][0][2]
        for i, (key, x, u) in enumerate(rs):
            depth = (key[2] - low) / max(high - low, 1e-12) if key[0] == 0 else math.inf
            out.append(Observation(b, x, u, (i + 0.5) / len(rs), depth))
    return out


def _rank_key(t: FrozenTrial, sign: float) -> tuple[float, float, float] | None:
    """(tier, -epochs run, value), lower is better; None for trials that say nothing about the lr."""
    if not t.state.is_finished() or t.state == TrialState.FAIL:
        return None
    if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
        return (0.0, 0.0, sign * t.value)
    if t.state == TrialState.PRUNED and t.user_attrs.get(Attr.STATE) != State.DIVERGED and t.intermediate_values:
        step = max(t.intermediate_values)
        v = t.intermediate_values[step]
        return (1.0, -float(step), sign * v if math.isfinite(v) else math.inf)
    return (2.0, 0.0, 0.0)  # diverged, or completed without a finite value


def fit_law(obs: Sequence[Observation]) -> Law:
    """A line through the batch sizes' centres (mean log2 effective lr of their best few trials), weighted by
    how many completed trials each has, its slope pulled towards PRIOR_SLOPE with the weight of one batch
    size one octave away (with one batch size, the slope is PRIOR_SLOPE)."""
    groups: dict[int, list[Observation]] = {}
    for o in obs:
        groups.setdefault(o.batch_size, []).append(o)
    xs, ys, ws = [], [], []
    for b, group in groups.items():
        best = sorted(group, key=lambda o: o.score)[:_TOP]
        xs.append(math.log2(b))
        ys.append(float(np.mean([o.log2_effective_lr for o in best])))
        ws.append(float(max(1, min(sum(o.complete for o in group), 3 * _TOP))))
    x, y, w = np.array(xs), np.array(ys), np.array(ws)
    centre = float(np.average(x, weights=w))
    dx = x - centre
    prior = float(w.mean())
    slope = (float((w * dx * (y - np.average(y, weights=w))).sum()) + prior * PRIOR_SLOPE) / (
        float((w * dx * dx).sum()) + prior)
    slope = min(max(slope, SLOPE_RANGE[0]), SLOPE_RANGE[1])
    return Law(float(np.average(y - slope * dx, weights=w)), slope, centre)


def _sobol_point(seed: int, index: int) -> np.ndarray:
    engine = qmc.Sobol(2, scramble=True, seed=seed)
    if index:
        engine.fast_forward(index)
    return engine.random(1)[0]


def _fixed_log2_one_minus_m(trials: Sequence[FrozenTrial]) -> float | None:
    for t in trials:
        if Attr.MOMENTUM in t.user_attrs:
            return math.log2(1.0 - float(t.user_attrs[Attr.MOMENTUM]))
    return None


def _log_float(d: BaseDistribution | None) -> bool:
    return isinstance(d, FloatDistribution) and d.log and d.step is None


def _derive_seed(seed: int, number: int, what: str) -> int:
    return int(np.random.SeedSequence([seed % 2**32, number, zlib.crc32(what.encode())]).generate_state(1)[0])


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)
