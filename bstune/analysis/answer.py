"""Which batch size to use: the best objective at the study's budget, the fastest to the steps-to-target goal
in wall time on the trials' hardware, and the critical batch size with the regime of each measured one.

Regimes (Shallue et al. 2018), from S(B) = S_min (1 + B_crit / B): "perfect scaling" up to B_crit / 4
(doubling B there cuts the steps by 40% or more), "maximal data parallelism" from 4 B_crit (doubling cuts
them by 10% or less), "diminishing returns" between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bstune.analysis.results import BatchOptimum, Interval, StepsFit, jsonable
from bstune.trials import TrialTable

_REGIME_SPAN = 4.0
SEPARATES = 1.5  # "fastest" is named only where the next batch size needs this factor more wall time


@dataclass
class Choice:
    """One batch size to use, with what to train it with."""

    batch_size: int
    lr: float
    momentum: float
    plateau: Interval | None  # any lr in it (at this momentum) is within one run's noise of the optimum's
    value: float | None  # the objective expected at the study's budget
    seconds: float | None = None  # wall time to the steps-to-target goal on the trials' hardware
    examples_per_second: float | None = None
    near: list[int] = field(default_factory=list)  # other batch sizes within one run's seed noise of the best value
    noise: float | None = None  # one run's seed noise near this optimum: how far "near" reaches


@dataclass
class Answer:
    """The answer to "which batch size should I use?"; ``why_not``: why a part is missing."""

    best: Choice | None
    fastest: Choice | None
    critical: float | None
    critical_interval: Interval | None
    critical_source: str  # "steps to target" or "B_noise of the lr*(B) fit"
    regimes: dict[int, str]
    why_not: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self)


def throughput(table: TrialTable) -> dict[int, float]:
    """Examples per second per batch size: the median over its trials (one slow trial, e.g. on a shared
    machine, would drag a sum down)."""
    out = {}
    for b, rs in table.by_batch_size().items():
        rates = [r.examples_seen / r.train_seconds for r in rs if r.train_seconds > 0 and r.examples_seen > 0]
        if rates:
            out[b] = float(np.median(rates))
    return out


def answer(per_batch: list[BatchOptimum], steps: StepsFit | None, rates: dict[int, float], sign: float,
           b_noise: float | None, b_noise_interval: Interval | None) -> Answer:
    """The answer from the per-batch optima, the steps fit and the measured throughput."""
    why: dict[str, str] = {}
    fitted = [o for o in per_batch if o.fitted and o.lr is not None and o.value is not None]
    best = None
    if fitted:
        top = min(fitted, key=lambda o: sign * float(o.value))
        best = _choice(top)
        # the same notion as the plateau: a batch size whose expected value lies within one run's seed noise of
        # the best one's does as well, as far as the trials can tell (a fixed fraction of the value is not: on
        # real valleys one run's noise is 10-35% of the loss, far above 1%)
        best.noise = top.noise
        tol = top.noise if top.noise is not None else 0.0
        best.near = [o.batch_size for o in fitted if o is not top and sign * (float(o.value) - float(top.value)) <= tol]
    else:
        why["best"] = "no batch size has a fitted optimum"
    fastest = _fastest(fitted, steps, rates, why)
    critical, interval, source = None, None, ""
    if steps is not None and steps.b_crit is not None:
        critical, interval, source = steps.b_crit, steps.b_crit_interval, "steps to target"
    elif b_noise is not None:
        critical, interval, source = b_noise, b_noise_interval, "B_noise of the lr*(B) fit"
    else:
        why["critical"] = "neither the steps to target nor lr*(B) place a critical batch size inside the " \
                          "measured batch sizes"
    regimes = {} if critical is None else {o.batch_size: regime(o.batch_size, critical) for o in per_batch}
    return Answer(best=best, fastest=fastest, critical=critical, critical_interval=interval,
                  critical_source=source, regimes=regimes, why_not=why)


def regime(batch_size: float, critical: float) -> str:
    if batch_size <= critical / _REGIME_SPAN:
        return "perfect scaling"
    if batch_size >= critical * _REGIME_SPAN:
        return "maximal data parallelism"
    return "diminishing returns"


def _choice(o: BatchOptimum) -> Choice:
    assert o.lr is not None and o.momentum is not None
    return Choice(batch_size=o.batch_size, lr=o.lr, momentum=o.momentum, plateau=o.plateau, value=o.value)


def _fastest(fitted: list[BatchOptimum], steps: StepsFit | None, rates: dict[int, float],
             why: dict[str, str]) -> Choice | None:
    """The fitted batch size that reaches the steps goal soonest: examples to the goal (the S(B) fit's where
    there is one, else the fewest any trial needed) / the examples per second its trials ran at."""
    if steps is None:
        why["fastest"] = "no steps-to-target fit (the trials have no learning curves in optimizer steps)"
        return None
    measured = {p.batch_size: p.examples for p in steps.points if p.examples is not None}
    times = {}
    for o in fitted:
        b = o.batch_size
        fit = steps.predict(b)
        examples = fit * b if fit is not None else measured.get(b)
        if examples is not None and rates.get(b):
            times[b] = examples / rates[b]
    if not times:
        why["fastest"] = "no batch size has both reached the target and a measured training speed"
        return None
    b = min(times, key=times.__getitem__)
    if len(times) > 1 and sorted(times.values())[1] < SEPARATES * times[b]:
        why["fastest"] = (f"the steps target ({steps.target:.4g}, {steps.target_rule}) does not separate the batch "
                          f"sizes: the next fastest reaches it within {SEPARATES:g}x of B={b}'s time")
        return None
    out = _choice(next(o for o in fitted if o.batch_size == b))
    out.seconds, out.examples_per_second = times[b], rates[b]
    return out
