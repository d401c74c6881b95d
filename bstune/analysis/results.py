"""What ``analyze`` returns: the optimum per batch size, the fitted forms of lr*(B), the steps-to-target fit,
and the ``Analysis`` that holds them and recommends an lr and momentum for a batch size.

The result types carry their bootstrap replicates in private fields (``_log2_lr``, ``_rows``): the point
estimate first, then one row per resample; ``to_dict`` leaves them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, is_dataclass
from typing import Any

import numpy as np

from bstune.errors import BstuneError

LEVEL = 0.95  # of every interval
FORMS = ("power", "linear", "sqrt", "saturating", "saturating-sqrt", "surge")
NOISE_FORMS = ("saturating", "saturating-sqrt", "surge")  # the forms with a B_noise
# the plateau: lrs whose expected objective is within one run's noise of the optimum's, one run's noise taken as
# this many times the trials' scatter about the fit (the scatter misses the part of a training seed's noise that
# neighbouring lrs share: measured on real grids, benchmarks/REAL.md)
PLATEAU_NOISE = 1.5
SIGMA_FLOOR = 0.05  # octaves: no optimum is located better than this, whatever the bootstrap says

Interval = tuple[float, float]


@dataclass
class BatchOptimum:
    """The optimum at one batch size. lr, momentum, effective_lr are None unless ``fitted``."""

    batch_size: int
    n_complete: int
    n_pruned: int
    n_diverged: int
    n_failed: int
    best_lr: float | None
    best_momentum: float | None
    best_value: float | None
    status: str
    lr: float | None = None
    lr_interval: Interval | None = None
    momentum: float | None = None
    momentum_interval: Interval | None = None
    effective_lr: float | None = None
    effective_lr_interval: Interval | None = None
    value: float | None = None  # the fit's expected objective at (lr, momentum), never the best trial's
    noise: float | None = None  # one run's seed noise near the optimum (objective's units): the plateau's level
    max_stable_lr: float | None = None
    max_stable_effective_lr: float | None = None
    plateau: Interval | None = None  # lrs (at momentum) within one run's noise of the optimum's value (PLATEAU_NOISE)
    plateau_low_interval: Interval | None = None  # the bootstrap intervals of its two ends
    plateau_high_interval: Interval | None = None
    fit: str = ""  # "pooled" ("pooled-lr": one momentum; with the other batch sizes), "2d", "1d-lr", "1d-effective"
    n_window: int = 0  # completed trials in the valley the fit used
    bracketed: bool = False  # clearly worse trials on both sides: lr* is an estimate, not a bound
    _log2_lr: np.ndarray | None = field(default=None, repr=False, compare=False)  # point, then replicates
    _log2_eff: np.ndarray | None = field(default=None, repr=False, compare=False)
    _fit_value: float | None = field(default=None, repr=False, compare=False)  # value before the clip

    @property
    def fitted(self) -> bool:
        return self.status.startswith("fitted")

    def to_dict(self) -> dict[str, Any]:
        return jsonable(_public(self) | {"fitted": self.fitted})


def law_log2(form: str, rows: np.ndarray, log2_b: Any) -> np.ndarray:
    """log2 lr* of ``form`` at log2 B, for parameter rows (log2 intercept or log2 lr_max, alpha or log2
    B_noise)."""
    c, p = rows[:, 0], rows[:, 1]
    lb = np.asarray(log2_b, dtype=float)
    if lb.ndim:
        c, p = c[:, None], p[:, None]
    if form in NOISE_FORMS:
        return c + noise_shape(form, p, lb)
    return c + p * lb


def noise_shape(form: str, t: Any, lb: Any) -> Any:
    """log2 (lr* / lr_max) at log2 B = lb for log2 B_noise = t: "saturating" 1 / (1 + B_noise/B) (McCandlish et
    al. 2018), "saturating-sqrt" its square root (their Adam form), "surge" 1 / (0.5 (sqrt(B_noise/B) +
    sqrt(B/B_noise))), which peaks at B = B_noise (Li et al. 2024)."""
    if form == "saturating":
        return -np.logaddexp2(0.0, t - lb)
    if form == "saturating-sqrt":
        return -0.5 * np.logaddexp2(0.0, t - lb)
    return 1.0 - np.logaddexp2(0.5 * (t - lb), 0.5 * (lb - t))


@dataclass
class LawFit:
    """One form of lr*(B) fitted in log2 space. ``params`` and ``intervals`` are in natural units."""

    form: str
    params: dict[str, float]
    intervals: dict[str, Interval]
    rms_log2: float  # residual RMS of log2 lr*, in octaves
    aicc: float  # AICc (or AIC when too few batch sizes for AICc); lower is better
    delta: float = 0.0  # criterion minus the best form's
    weight: float = 0.0  # Akaike weight
    n_points: int = 0
    n_params: int = 0
    contains_linear: bool | None = None  # power form: does alpha's interval contain 1 ...
    contains_sqrt: bool | None = None  # ... and 0.5
    note: str = ""
    _rows: np.ndarray | None = field(default=None, repr=False, compare=False)  # (1 + n_boot, 2)

    @property
    def alpha(self) -> float | None:
        return self.params.get("alpha")

    def predict(self, batch_size: float) -> float:
        """lr* (or effective lr*) at ``batch_size``."""
        assert self._rows is not None
        return float(2.0 ** law_log2(self.form, self._rows[:1], math.log2(batch_size))[0])

    def predict_interval(self, batch_size: float) -> Interval:
        assert self._rows is not None
        return quantile_interval(2.0 ** law_log2(self.form, self._rows[1:], math.log2(batch_size)))

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self)


@dataclass
class StepsPoint:
    batch_size: int
    steps: float | None  # fewest optimizer steps any trial needed to reach the target
    examples: float | None  # steps * batch_size
    n_reached: int  # trials that reached the target
    n_curves: int  # trials with a usable learning curve
    upper_bound: bool = False  # reached by the first recorded point: not fitted


@dataclass
class StepsFit:
    """S(B) = S_min (1 + B_crit / B) fitted to the fewest steps to ``target`` per batch size."""

    target: float
    target_rule: str
    points: list[StepsPoint]
    s_min: float | None
    e_min: float | None
    b_crit: float | None
    b_crit_interval: Interval | None
    s_min_interval: Interval | None
    rms_log2: float | None

    def predict(self, batch_size: float) -> float | None:
        if self.s_min is None or self.b_crit is None:
            return None
        return self.s_min * (1.0 + self.b_crit / batch_size)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self)


@dataclass
class Recommendation:
    """What to use at one batch size, from the preferred form of lr*(B)."""

    batch_size: int
    lr: float
    momentum: float
    effective_lr: float
    lr_interval: Interval
    form: str
    basis: str  # "effective": the form was fitted to lr/(1 - m); "lr": to the plain lr
    extrapolated: bool
    above_critical: bool
    notes: list[str]
    plateau: Interval | None = None  # measured batch sizes: lrs within one run's noise of the optimum's

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self)


@dataclass
class Analysis:
    """Everything ``analyze`` found; ``to_dict()`` exports it, ``bstune.report.format_analysis`` prints it."""

    per_batch: list[BatchOptimum]
    fits: dict[str, LawFit]
    effective_fits: dict[str, LawFit]
    preferred: str | None
    effective_preferred: str | None
    criterion: str
    basis: str  # "effective" or "lr": the fits that recommend() and B_noise use
    b_noise: float | None
    b_noise_interval: Interval | None
    steps: StepsFit | None
    grad_noise_scale: dict[int, float | None]
    warnings: list[str]
    direction: str = "minimize"
    metric: str = "value"
    n_trials: int = 0
    n_boot: int = 200
    min_trials: int = 4
    peak: float | None = None  # the B at which lr* peaks, when it peaks inside the measured batch sizes
    peak_interval: Interval | None = None
    trend: str = ""  # how lr* moves with B: "rises", "falls", "peaks" ("" without a fit)
    n_train: int | None = None  # training examples: a batch size above it is a full-batch run
    answer: Any = None  # bstune.analysis.answer.Answer: which batch size to use

    def fits_for(self, effective: bool | None = None) -> tuple[dict[str, LawFit], str | None]:
        """The fits of the effective lr (``effective``) or of the plain lr, and their preferred form; by
        default those of ``basis``, the ones recommend() and B_noise use."""
        if effective is None:
            effective = self.basis == "effective"
        return (self.effective_fits, self.effective_preferred) if effective else (self.fits, self.preferred)

    def optimum(self, batch_size: int) -> BatchOptimum:
        for o in self.per_batch:
            if o.batch_size == batch_size:
                return o
        measured = format_list([o.batch_size for o in self.per_batch])
        raise BstuneError(f"batch size {batch_size} was not measured; measured: {measured}")

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "direction": self.direction, "metric": self.metric, "n_trials": self.n_trials,
            "n_boot": self.n_boot, "min_trials": self.min_trials, "level": LEVEL,
            "per_batch": [o.to_dict() for o in self.per_batch],
            "fits": {k: f.to_dict() for k, f in self.fits.items()},
            "effective_fits": {k: f.to_dict() for k, f in self.effective_fits.items()},
            "preferred": self.preferred, "effective_preferred": self.effective_preferred,
            "criterion": self.criterion, "basis": self.basis,
            "b_noise": self.b_noise, "b_noise_interval": self.b_noise_interval,
            "peak": self.peak, "peak_interval": self.peak_interval, "trend": self.trend,
            "steps": None if self.steps is None else self.steps.to_dict(),
            "grad_noise_scale": {str(b): v for b, v in self.grad_noise_scale.items()},
            "warnings": list(self.warnings), "n_train": self.n_train,
            "answer": None if self.answer is None else self.answer.to_dict(),
        })

    def recommend(self, batch_size: int) -> Recommendation:
        """lr and momentum for ``batch_size``: a measured batch size's own fitted optimum (where it is
        bracketed, or where there is no fit of lr*(B)), else the preferred form of lr*(B).

        The fit is that of the effective lr lr/(1 - m) when ``basis`` is "effective" (SGD with momentum:
        lr = effective lr * (1 - momentum)), else that of the plain lr (e.g. Adam). The momentum is
        taken from a straight-line trend of log2(1 - m*) against log2 B (held flat beyond the measured batch
        sizes). The interval is the fit's bootstrap interval at that momentum."""
        if not is_int(batch_size) or batch_size < 1:
            raise BstuneError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        effective = self.basis == "effective"
        fits, form = self.fits_for(effective)
        own = next((o for o in self.per_batch if o.batch_size == batch_size and o.fitted
                    and (o.bracketed or not fits)), None)
        if own is not None:
            return self._measured(own)
        if not fits or form is None:
            raise BstuneError("no fit of lr*(B) to recommend from: fewer than 2 batch sizes have a bracketed "
                              "optimum; see the analysis warnings and widen the lr range")
        used = [o for o in self.per_batch if o.fitted and o.bracketed]
        sizes = np.array([o.batch_size for o in used], dtype=float)
        momentum = _momentum_trend(used, batch_size)
        scale = 1.0 - momentum if effective else 1.0  # from the fitted quantity to the plain lr
        lr = fits[form].predict(batch_size) * scale
        lo, hi = fits[form].predict_interval(batch_size)
        lo_b, hi_b = int(sizes.min()), int(sizes.max())
        extrapolated = not lo_b <= batch_size <= hi_b
        critical, critical_name = self._critical()
        above = critical is not None and batch_size > critical
        what = "effective lr lr/(1-m)" if effective else "lr"
        notes = [f"lr={format_number(lr)} from the {form} fit of the {what}, with momentum {momentum:.3g} (the "
                 "trend of the fitted momenta over the measured batch sizes)."]
        if extrapolated:
            notes.append(f"B={batch_size} lies outside the measured range {lo_b}..{hi_b}: the lr is "
                         f"extrapolated from the {form} form; measure this batch size before relying on it.")
        if above:
            notes.append(f"B={batch_size} is above the critical batch size ({critical_name} ~ "
                         f"{critical:.0f}): there, doubling B cuts the optimizer steps by much less than "
                         "half, and lr* levels off.")
        if form == "surge" and self.peak is not None and batch_size > self.peak:
            notes.append(f"lr* falls with B above its peak at B ~ {self.peak:.0f}: a larger batch size needs "
                         "a smaller lr here.")
        elif self.trend == "falls":
            notes.append("lr* falls with B across the measured batch sizes: a larger batch size needs a "
                         "smaller lr.")
        notes += self._measured_notes(batch_size, lr, momentum) + self._limit_notes(batch_size, lr)
        for f in fits.values():
            if f.form != form and f.delta < 2.0:
                notes.append(f"The data support the {f.form} form almost as well (d{self.criterion}="
                             f"{f.delta:.1f}); it gives lr={format_number(f.predict(batch_size) * scale)}.")
        return Recommendation(batch_size=batch_size, lr=lr, momentum=momentum,
                              effective_lr=lr / (1.0 - momentum), lr_interval=(lo * scale, hi * scale),
                              form=form, basis=self.basis,
                              extrapolated=extrapolated, above_critical=above, notes=notes)

    def _measured(self, o: BatchOptimum) -> Recommendation:
        """A measured batch size's own optimum, as a recommendation."""
        assert o.lr is not None and o.momentum is not None and o.lr_interval is not None
        notes = [f"B={o.batch_size} was measured: lr={format_number(o.lr)} and momentum {o.momentum:.3g} are its "
                 f"own fitted optimum ({o.n_complete} completed trials)."]
        if not o.bracketed:
            notes.append(f"Its optimum is not bracketed ({o.status}): lr* is only a bound.")
        if o.plateau is not None:
            notes.append(f"Any {plateau_words(o.plateau)} (at this momentum) is expected within one run's seed "
                         f"noise of the optimum's {self.metric}.")
        critical, name = self._critical()
        return Recommendation(batch_size=o.batch_size, lr=o.lr, momentum=o.momentum,
                              effective_lr=o.lr / (1.0 - o.momentum), lr_interval=o.lr_interval, form="measured",
                              basis=self.basis, extrapolated=False,
                              above_critical=critical is not None and o.batch_size > critical,
                              notes=notes + self._limit_notes(o.batch_size, o.lr), plateau=o.plateau)

    def _limit_notes(self, batch_size: int, lr: float) -> list[str]:
        """Warnings where B exceeds the training set or the lr the largest lr that stayed stable."""
        notes = []
        if self.n_train and batch_size > self.n_train:
            notes.append(f"Careful: B={batch_size} is larger than the training set ({self.n_train} examples): "
                         "a batch cannot hold more examples than there are.")
        edges = [(o.max_stable_lr, o.batch_size) for o in self.per_batch if o.max_stable_lr is not None]
        if edges:
            edge, at = max(edges)
            if lr > edge:
                notes.append(f"Careful: lr={format_number(lr)} is above the largest lr that stayed stable in any "
                             f"trial ({format_number(edge)}, at B={at}; larger ones diverged).")
        return notes

    def _measured_notes(self, batch_size: int, lr: float, momentum: float) -> list[str]:
        """What the trials at ``batch_size`` itself say about the recommended lr, where it was measured."""
        notes = []
        for o in self.per_batch:
            if o.batch_size != batch_size:
                continue
            if o.fitted and o.lr_interval is not None:
                notes.append(f"B={batch_size} was measured: its own fitted optimum is lr={format_number(o.lr)} "
                             f"({LEVEL:.0%} interval {format_number(o.lr_interval[0])}-"
                             f"{format_number(o.lr_interval[1])}), momentum {o.momentum:.3g}.")
            edge = o.max_stable_effective_lr
            if edge is not None and lr / (1.0 - momentum) > edge:
                notes.append(f"Careful: trials at B={batch_size} diverged above an effective lr of "
                             f"{format_number(edge)}, below this recommendation.")
        return notes

    def _critical(self) -> tuple[float | None, str]:
        if self.b_noise is not None:
            return self.b_noise, "B_noise"
        if self.steps is not None and self.steps.b_crit is not None:
            return self.steps.b_crit, "B_crit"
        return None, ""


def _momentum_trend(used: list[BatchOptimum], batch_size: int) -> float:
    """m at ``batch_size`` from a straight line through log2(1 - m*) against log2 B, weighted by the
    intervals and held flat beyond the measured batch sizes. The optimum momentum is only weakly located at
    any one batch size (the valley runs along lr/(1 - m)), so a trend over all of them is steadier than
    interpolating between neighbours."""
    logb = np.log2([o.batch_size for o in used])
    v = np.array([math.log2(1.0 - (o.momentum or 0.0)) for o in used])
    sigma = np.array([(math.log2(1.0 - iv[0]) - math.log2(1.0 - iv[1])) / 3.92 if iv else 0.0
                      for iv in (o.momentum_interval for o in used)])
    w = 1.0 / np.maximum(sigma, SIGMA_FLOOR) ** 2
    xm, vm = np.average(logb, weights=w), np.average(v, weights=w)
    slope = float((w * (logb - xm) * (v - vm)).sum() / max(float((w * (logb - xm) ** 2).sum()), 1e-12))
    at = min(max(math.log2(batch_size), float(logb.min())), float(logb.max()))
    return float(1.0 - 2.0 ** (vm + slope * (at - xm)))


def plateau_words(p: Interval) -> str:
    """A plateau in words: 'lr from a to b', or open on a side ('lr up to b', 'lr from a up')."""
    lo, hi = p
    if lo <= 0.0 and not math.isfinite(hi):
        return "every lr measured"
    if lo <= 0.0:
        return f"lr up to {format_number(hi)}"
    if not math.isfinite(hi):
        return f"lr from {format_number(lo)} up"
    return f"lr from {format_number(lo)} to {format_number(hi)}"


def quantile_interval(samples: np.ndarray) -> Interval:
    """The central LEVEL interval of bootstrap replicates (NaNs left out)."""
    s = np.asarray(samples, dtype=float)
    s = s[~np.isnan(s)]
    lo, hi = np.quantile(s, [(1.0 - LEVEL) / 2.0, (1.0 + LEVEL) / 2.0], method="inverted_cdf")
    return float(lo), float(hi)


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def format_number(v: Any) -> str:
    """3 significant digits (integers whole, None as '-'): how the analysis's messages and tables give numbers."""
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(v)
    return f"{v:.3g}" if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def format_list(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def _public(obj: Any) -> dict[str, Any]:
    """A dataclass's fields, less the private ones (bootstrap replicates)."""
    return {k: v for k, v in obj.__dict__.items() if not k.startswith("_")}


def jsonable(obj: Any) -> Any:
    """JSON-ready: dicts, lists, plain numbers; non-finite floats become None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if is_dataclass(obj):
        return jsonable(_public(obj))
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return obj
