"""Where the best learning rate sits at each batch size, and how it moves with the batch size.

``analyze(table)`` reads a TrialTable and returns an :class:`Analysis`:

1. Per batch size, the optimum of a smooth fit to the objective's valley, not the best trial (whose lr jitters
   by an octave in a flat valley). The valley has much the same shape at every batch size and moves with it,
   so the batch sizes are fitted together (``_pooled_valleys``), over the completed trials near each batch
   size's best: a lopsided parabola (in (lr/lr*)^(1/2): a long slope towards small lr, a steep wall towards
   large lr, as a training run's valley has) across a floor that is a line in (log2 lr, log2(1 - m)), tilted
   along the effective lr lr/(1 - m) (SGD with many steps), along the plain lr (Adam), or in between, the tilt
   moving with log2 B; per batch size an offset, a shift of the floor and a curvature, the last two pulled
   towards the others'. A batch size with only 2-3 completed trials is placed by the others' shape; one with
   many by its own trials. m* is the valley's weighted median momentum, lr* the floor there, clipped to the
   valley's sampled range. Where no joint fit is possible, each batch size with ``min_trials`` completed
   trials is fitted alone, by a 2-D quadratic in (log2 lr, log2(1 - m)) or a 1-D one. 95% intervals come from
   a bootstrap over the trials (within each batch size), vectorised over resamples. Pruned trials' values come
   from earlier epochs and are not fitted; pruned and diverged trials count as the valley's walls when
   checking that the optimum is bracketed (an unbracketed one is only a bound and is left out of step 2).
2. Fits of lr*(B) and of the effective lr*(B) to four forms in log2 space, weighted by the per-batch
   interval widths, compared by AICc: "power" a B^alpha, "linear" (alpha = 1), "sqrt" (alpha = 1/2) and
   "saturating" lr_max / (1 + B_noise / B). Their intervals refit every bootstrap replicate of the optima
   (trials resampled within each batch size), so they carry each optimum's uncertainty. B_noise, the
   critical batch-size estimate, comes from the saturating fit of whichever quantity the forms describe
   better (``Analysis.basis``): the effective lr for SGD with momentum, the plain lr for Adam.
3. Steps to a target value from the learning curves: S(B) = S_min (1 + B_crit / B), B_crit = E_min / S_min.

Logarithms are base 2 throughout, so residuals and widths read in octaves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, is_dataclass
from typing import Any

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from bstune.errors import BstuneError
from bstune.trials import FAILED_STATES, TrialRecord, TrialTable

FORMS = ("power", "linear", "sqrt", "saturating")
_FIXED_ALPHA = {"linear": 1.0, "sqrt": 0.5}
LEVEL = 0.95  # of every interval

# The valley: completed trials whose value lies within this fraction of the way from the best values (the
# mean of the best three) to the 90th percentile (in the joint fit, at least that of all batch sizes' trials),
# and at least the best _MIN_POINTS_2D. Far from the optimum
# the objective flattens out ("no progress") or blows up; a quadratic through those points would say
# little about where the bottom is.
_WINDOW_FRACTION = 0.4
_WINDOW_QUANTILE = 0.9
_MIN_POINTS_2D = 10  # a 2-D quadratic has 6 coefficients
_MIN_MOMENTUM_SPAN = 1.0  # octaves of (1 - m) the valley must span for a 2-D fit
_MAX_CONDITION = 1e3  # curvature ratio beyond which the 2-D fit cannot place the momentum
_POOL_PRIOR = 10.0  # trials' worth of belief that a batch size's valley is as curved as the others'
_FLOOR_PRIOR = 0.5  # ... that its floor lies on the line through the others' (in log2 B)
_TILT_PRIOR = 1.0  # ... that the floor's tilt is 1/2, between the plain lr's (0) and the effective lr's (1)
_LM_STEPS = 40
_LM_TOL = 1e-9  # relative decrease of the cost below which a row has converged
_FLOOR_SHARED = 5  # the pooled valley model's shared parameters (see _fit_floor)
_WALL_POWER = 0.5  # the valley is a parabola in (lr / lr*)^this (see _wall)
_SIGMA_FLOOR = 0.05  # octaves: no optimum is located better than this, whatever the bootstrap says
_GRID_MARGIN = 5.0  # octaves beyond the measured batch sizes searched for B_noise and B_crit
_GRID_STEP = 0.02
_SUPPORT_MARGIN = 1.0  # octaves beyond the measured batch sizes where B_noise or B_crit is still reported
_REJECT_DELTA = 10.0  # AICc difference at which the saturating form is rejected and no B_noise is given
_TARGET_SHARE = 0.75  # default target: near the fitted optimum value that 3/4 of the batch sizes reach ...
_TARGET_SLACK = 0.1  # ... less 10% of the way back to the median first-epoch value

Interval = tuple[float, float]


# --------------------------------------------------------------------------------------------- results


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
    value: float | None = None  # the fit's expected objective at the optimum, never better than best_value
    max_stable_lr: float | None = None
    max_stable_effective_lr: float | None = None
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
        return float(2.0 ** _law_log2(self.form, self._rows[:1], math.log2(batch_size))[0])

    def predict_interval(self, batch_size: float) -> Interval:
        assert self._rows is not None
        return _interval(2.0 ** _law_log2(self.form, self._rows[1:], math.log2(batch_size)))

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

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self)

    def __str__(self) -> str:
        lo, hi = self.lr_interval
        what = "effective lr" if self.basis == "effective" else "lr"
        head = (f"B={self.batch_size}: lr={_g(self.lr)} ({LEVEL:.0%} interval {_g(lo)}-{_g(hi)}), "
                f"momentum={self.momentum:.3g}, effective lr={_g(self.effective_lr)}  "
                f"[{self.form} fit of the {what}")
        flags = [name for name, on in (("extrapolated", self.extrapolated),
                                       ("above critical", self.above_critical)) if on]
        head += (", " + ", ".join(flags) if flags else "") + "]"
        return "\n".join([head] + [f"  - {n}" for n in self.notes])


@dataclass
class Analysis:
    """Everything ``analyze`` found; ``format_table()`` prints it, ``to_dict()`` exports it."""

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
        measured = _list([o.batch_size for o in self.per_batch])
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
            "steps": None if self.steps is None else self.steps.to_dict(),
            "grad_noise_scale": {str(b): v for b, v in self.grad_noise_scale.items()},
            "warnings": list(self.warnings),
        })

    def recommend(self, batch_size: int) -> Recommendation:
        """lr and momentum for ``batch_size`` from the preferred form of lr*(B).

        The fit is that of the effective lr lr/(1 - m) when ``basis`` is "effective" (SGD with momentum:
        lr = effective lr * (1 - momentum)), else that of the plain lr (e.g. Adam). The momentum is
        taken from a straight-line trend of log2(1 - m*) against log2 B (held flat beyond the measured batch
        sizes). The interval is the fit's bootstrap interval at that momentum."""
        if not _is_int(batch_size) or batch_size < 1:
            raise BstuneError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        effective = self.basis == "effective"
        fits, form = self.fits_for(effective)
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
        notes = [f"lr={_g(lr)} from the {form} fit of the {what}, with momentum {momentum:.3g} (the trend of "
                 "the fitted momenta over the measured batch sizes)."]
        if extrapolated:
            notes.append(f"B={batch_size} lies outside the measured range {lo_b}..{hi_b}: the lr is "
                         f"extrapolated from the {form} form; measure this batch size before relying on it.")
        if above:
            notes.append(f"B={batch_size} is above the critical batch size ({critical_name} ~ "
                         f"{critical:.0f}): there, doubling B cuts the optimizer steps by much less than "
                         "half, and lr* levels off.")
        for o in self.per_batch:
            if o.batch_size != batch_size:
                continue
            if o.fitted and o.lr_interval is not None:
                notes.append(f"B={batch_size} was measured: its own fitted optimum is lr={_g(o.lr)} "
                             f"({LEVEL:.0%} interval {_g(o.lr_interval[0])}-{_g(o.lr_interval[1])}), "
                             f"momentum {o.momentum:.3g}.")
            edge = o.max_stable_effective_lr
            if edge is not None and lr / (1.0 - momentum) > edge:
                notes.append(f"Careful: trials at B={batch_size} diverged above an effective lr of "
                             f"{_g(edge)}, below this recommendation.")
        for f in fits.values():
            if f.form != form and f.delta < 2.0:
                notes.append(f"The data support the {f.form} form almost as well (d{self.criterion}="
                             f"{f.delta:.1f}); it gives lr={_g(f.predict(batch_size) * scale)}.")
        return Recommendation(batch_size=batch_size, lr=lr, momentum=momentum,
                              effective_lr=lr / (1.0 - momentum), lr_interval=(lo * scale, hi * scale),
                              form=form, basis=self.basis,
                              extrapolated=extrapolated, above_critical=above, notes=notes)

    def _critical(self) -> tuple[float | None, str]:
        if self.b_noise is not None:
            return self.b_noise, "B_noise"
        if self.steps is not None and self.steps.b_crit is not None:
            return self.steps.b_crit, "B_crit"
        return None, ""

    def format_table(self) -> str:
        """A terminal table: per-batch optima, the fits, B_noise, steps to target, warnings."""
        lines = [f"Optimum per batch size ({self.direction} {self.metric}; {LEVEL:.0%} intervals from "
                 f"{self.n_boot} bootstrap resamples of the trials)"]
        head = (f"{'B':>6} {'done':>5} {'prun':>5} {'div':>4} {'best lr':>9} {'lr*':>9} {'lr* interval':>21} "
                f"{'m*':>6} {'eff lr*':>9} {'eff lr* interval':>21} {'value*':>9} {'max stable':>10} "
                f"{'B_simple':>8}  status")
        lines.append(head)
        for o in self.per_batch:
            lines.append(
                f"{o.batch_size:>6} {o.n_complete:>5} {o.n_pruned:>5} {o.n_diverged:>4} {_g(o.best_lr):>9} "
                f"{_g(o.lr):>9} {_iv(o.lr_interval):>21} {_g(o.momentum):>6} {_g(o.effective_lr):>9} "
                f"{_iv(o.effective_lr_interval):>21} {_g(o.value):>9} {_g(o.max_stable_lr):>10} "
                f"{_g(self.grad_noise_scale.get(o.batch_size)):>8}  {o.status}"
            )
        for title, fits, preferred in (("lr*(B)", self.fits, self.preferred),
                                       ("effective lr*(B) = lr/(1-m)", self.effective_fits,
                                        self.effective_preferred)):
            lines.append("")
            if not fits:
                lines.append(f"Fits of {title}: none (fewer than 2 batch sizes with an optimum)")
                continue
            lines.append(f"Fits of {title} (log2 space, weighted by the interval widths; {self.criterion}, "
                         "lower is better)")
            lines.append(f"  {'form':<11} {'parameters':<62} {'rms(oct)':>8} {self.criterion:>8} "
                         f"{'d' + self.criterion:>8} {'weight':>6}")
            for f in fits.values():
                mark = "  <- preferred" if f.form == preferred else ""
                if f.form == preferred and (fits is self.effective_fits) == (self.basis == "effective"):
                    mark += ", used by recommend()"
                lines.append(f"  {f.form:<11} {_params(f):<62} {f.rms_log2:>8.3f} {_g(f.aicc):>8} "
                             f"{f.delta:>8.1f} {f.weight:>6.2f}{mark}")
        lines.append("")
        if self.b_noise is not None:
            what = "effective lr" if self.basis == "effective" else "lr"
            lines.append(f"Critical batch size B_noise ~ {self.b_noise:.0f} "
                         f"{_iv(self.b_noise_interval, '.0f')} (saturating fit of the {what})")
        else:
            lines.append("Critical batch size B_noise: not supported by the data (see the warnings)")
        if self.steps is not None:
            s = self.steps
            lines.append("")
            lines.append(f"Steps to target ({self.metric} {'<=' if self.direction == 'minimize' else '>='} "
                         f"{s.target:.4g}, {s.target_rule}): S(B) = S_min (1 + B_crit/B)")
            lines.append(f"  {'B':>6} {'steps':>10} {'examples':>12} {'fit':>10} {'reached':>8}")
            for p in s.points:
                pred = s.predict(p.batch_size)
                bound = "<=" if p.upper_bound else ""  # reached by the first point: not fitted
                lines.append(f"  {p.batch_size:>6} {bound + _g(p.steps):>10} {bound + _g(p.examples):>12} "
                             f"{_g(pred):>10} {p.n_reached:>4}/{p.n_curves:<3}")
            if s.b_crit is not None:
                lines.append(f"  S_min = {_g(s.s_min)}  E_min = {_g(s.e_min)}  B_crit = E_min/S_min = "
                             f"{s.b_crit:.0f} {_iv(s.b_crit_interval, '.0f')}  rms {s.rms_log2:.3f} octaves")
            else:
                lines.append("  no B_crit: the fit puts it outside the measured batch sizes (see warnings)")
        if self.warnings:
            lines.append("")
            lines.append("Warnings:")
            lines.extend(f"  - {w}" for w in self.warnings)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- analyze


def analyze(table: TrialTable, *, target: float | None = None, n_boot: int = 200, seed: int = 0,
            min_trials: int = 4) -> Analysis:
    """Fit the optimum per batch size, how it moves with B, and the steps to ``target`` (see the module doc).

    ``target``: the objective value for the steps fit. Default: start from the fitted optimum value (the
    smooth fit's, not a noisy best epoch) that 3/4 of the batch sizes reach, and give back 10% of the way
    to the median first-epoch value; e.g. loss 0.30 at the optimum and 2.0 after one epoch give 0.47.
    ``n_boot``: bootstrap resamples for every interval. ``min_trials``: completed trials a batch size needs
    to be fitted on its own; fitted with the others (the usual case), 2 suffice and fewer than
    ``min_trials`` are said in its status.
    """
    if not isinstance(table, TrialTable):
        raise BstuneError(f"analyze() needs a TrialTable, got {type(table).__name__}")
    if not table.records:
        raise BstuneError("the trial table is empty: run a study first, or give a CSV with one row per trial")
    if not _is_int(n_boot) or n_boot < 20:
        raise BstuneError(f"n_boot must be an integer >= 20 (bootstrap resamples for the intervals), "
                          f"got {n_boot!r}")
    if not _is_int(min_trials) or min_trials < 3:
        raise BstuneError(f"min_trials must be an integer >= 3 (a quadratic needs 3 points), "
                          f"got {min_trials!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not math.isfinite(target)):
        raise BstuneError(f"target must be a finite number (the objective value to reach), got {target!r}")
    _check_records(table.records)

    sign = 1.0 if table.direction == "minimize" else -1.0
    rng = np.random.default_rng(seed)
    warnings: list[str] = []
    groups = table.by_batch_size()
    if len(groups) < 2:
        raise BstuneError(f"the trials cover one batch size (B={next(iter(groups))}); how lr* moves with B "
                          "needs 2 or more (5 or more to tell the forms apart): run more trials, or list more "
                          "batch sizes in the spec's search.batch_sizes")

    done = {b: [r for r in rs if _is_complete(r)] for b, rs in groups.items()}
    nan_done = sum(1 for rs in groups.values() for r in rs if r.state == "COMPLETE" and not _is_complete(r))
    if nan_done:
        warnings.append(f"{nan_done} COMPLETE trial(s) have no finite value; they count as diverged")
    said: dict[int, list[str]] = {b: [] for b in groups}
    per_batch = [_batch_optimum(b, rs, done[b], sign, n_boot, rng, min_trials, said[b])
                 for b, rs in groups.items()]
    # The batch sizes' valleys fitted together (one shape, placed per batch size) replace the separate fits
    # wherever they can be: they place batch sizes with only 2-3 completed trials, and the separate 2-D fits
    # wobble with the momenta drawn unless each valley holds many trials (benchmarks/SEARCH.md). Except where
    # the joint fit's optimum is only a bound and the batch size's own fit is bracketed.
    pooled = _pooled_valleys(done, sign, n_boot, rng)
    for i, o in enumerate(per_batch):
        if o.batch_size not in pooled:
            continue
        joint, notes = dataclasses.replace(o), []
        _place(joint, pooled[o.batch_size], groups[o.batch_size], sign, notes)
        if o.bracketed and not joint.bracketed:
            continue
        if joint.n_complete < min_trials:
            joint.status = joint.status.replace("fitted", f"fitted from {o.n_complete} completed trials and the "
                                                "valley shape of the other batch sizes", 1)
        per_batch[i], said[o.batch_size] = joint, notes
    warnings += [w for b in groups for w in said[b]]
    if sum(o.fitted for o in per_batch) < 2:
        found = ", ".join(f"B={b}: {len(done[b])}" for b in groups)
        raise BstuneError(f"need at least 2 batch sizes that can be fitted (>= {min_trials} completed trials "
                          "each, or >= 2 where the other batch sizes show the valley's shape); found "
                          f"{found}; run more trials")
    grad_noise = {b: _median_gns(rs) for b, rs in groups.items()}

    used = [o for o in per_batch if o.fitted and o.bracketed]
    criterion = "AICc" if len(used) >= 5 else "AIC"
    fits: dict[str, LawFit] = {}
    eff_fits: dict[str, LawFit] = {}
    preferred = eff_preferred = None
    b_noise = b_noise_iv = None
    basis = "effective"
    if len(used) >= 2:
        if len(used) < 5:
            warnings.append(f"only {len(used)} batch sizes have a bracketed optimum: the forms are compared "
                            "by AIC and hardly told apart; measure 5 or more batch sizes")
        sizes = np.array([o.batch_size for o in used], dtype=float)
        fits, preferred = _fit_forms(sizes, np.stack([o._log2_lr for o in used], axis=1), criterion)
        eff_fits, eff_preferred = _fit_forms(sizes, np.stack([o._log2_eff for o in used], axis=1), criterion)
        # SGD's valley follows the effective lr, Adam's the plain one: use whichever the forms describe better
        if fits[preferred].rms_log2 < eff_fits[eff_preferred].rms_log2 - 1e-9:
            basis = "lr"
        chosen, chosen_form = (eff_fits, eff_preferred) if basis == "effective" else (fits, preferred)
        b_noise, b_noise_iv = _b_noise(chosen, chosen_form, basis, sizes, warnings)
    else:
        warnings.append("fewer than 2 batch sizes have a bracketed optimum: no lr*(B) fits (see the "
                        "warnings above)")

    steps = _steps_fit(table, groups, per_batch, sign, target, n_boot, rng, warnings)
    return Analysis(per_batch=per_batch, fits=fits, effective_fits=eff_fits, preferred=preferred,
                    effective_preferred=eff_preferred, criterion=criterion, basis=basis, b_noise=b_noise,
                    b_noise_interval=b_noise_iv, steps=steps, grad_noise_scale=grad_noise, warnings=warnings,
                    direction=table.direction, metric=table.metric, n_trials=len(table.records),
                    n_boot=int(n_boot), min_trials=int(min_trials))


def _check_records(records: Sequence[TrialRecord]) -> None:
    for r in records:
        if not _is_int(r.batch_size) or r.batch_size < 1:
            raise BstuneError(f"trial {r.number}: batch_size must be a positive integer, "
                              f"got {r.batch_size!r} (fix or drop that trial)")
        if not (isinstance(r.lr, (int, float)) and math.isfinite(r.lr) and r.lr > 0):
            raise BstuneError(f"trial {r.number}: lr must be > 0, got {r.lr!r} (fix or drop that trial)")
        if not (isinstance(r.momentum, (int, float)) and 0 <= r.momentum < 1):
            raise BstuneError(f"trial {r.number}: momentum must lie in [0, 1), got {r.momentum!r} "
                              "(fix or drop that trial)")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_complete(r: TrialRecord) -> bool:
    return r.state == "COMPLETE" and r.value is not None and math.isfinite(r.value)


def _median_gns(records: Sequence[TrialRecord]) -> float | None:
    vals = [g for g in (r.grad_noise_scale for r in records) if g is not None and math.isfinite(g)]
    return float(np.median(vals)) if vals else None


# ------------------------------------------------------------------------------------ per-batch optimum


def _batch_optimum(b: int, records: list[TrialRecord], done: list[TrialRecord], sign: float, n_boot: int,
                   rng: np.random.Generator, min_trials: int, warnings: list[str]) -> BatchOptimum:
    # a COMPLETE trial without a finite value blew up: it counts as diverged
    diverged = [r for r in records
                if r.state == "DIVERGED" or (r.state == "COMPLETE" and not _is_complete(r))]
    stable = [r for r in records if r.state == "PRUNED" or _is_complete(r)]
    best = min(done, key=lambda r: sign * float(r.value or 0.0)) if done else None
    out = BatchOptimum(
        batch_size=b, n_complete=len(done), n_pruned=sum(r.state == "PRUNED" for r in records),
        n_diverged=len(diverged), n_failed=sum(r.state in FAILED_STATES for r in records),
        best_lr=best.lr if best else None, best_momentum=best.momentum if best else None,
        best_value=best.value if best else None, status=f"too few trials ({len(done)} < {min_trials})",
        max_stable_lr=_max_stable([r.lr for r in stable], [r.lr for r in diverged]),
        max_stable_effective_lr=_max_stable([r.effective_lr for r in stable],
                                            [r.effective_lr for r in diverged]),
    )
    if len(done) < min_trials:
        return out
    _place(out, _fit_valley(*_valley_points(done, sign, n_boot, rng)), records, sign, warnings)
    return out


def _place(out: BatchOptimum, v: _Valley, records: list[TrialRecord], sign: float, warnings: list[str]) -> None:
    """Fill in ``out`` from the valley fit ``v`` of its batch size: the optimum, its intervals, the bracket."""
    b = out.batch_size
    lx, lu = v.log2_lr, v.log2_one_minus_m
    leff = lx - lu
    out.lr, out.lr_interval = float(2.0 ** lx[0]), _interval(2.0 ** lx[1:])
    out.momentum, out.momentum_interval = float(1.0 - 2.0 ** lu[0]), _interval(1.0 - 2.0 ** lu[1:])
    out.effective_lr, out.effective_lr_interval = float(2.0 ** leff[0]), _interval(2.0 ** leff[1:])
    # a sparsely sampled valley's fitted bottom can overshoot what any trial reached (even to a negative
    # loss): the value reported is never better than the best trial's (the steps target keeps the fit's)
    out._fit_value = sign * v.value
    out.value = sign * max(v.value, sign * float(out.best_value)) if out.best_value is not None else out._fit_value
    out.fit, out.n_window = v.kind, v.n_window
    out._log2_lr, out._log2_eff = lx, leff
    below, above = _bracket(records, sign, v, lx[0], leff[0])
    out.bracketed = below and above
    out.status = "fitted"
    if not out.bracketed:
        side = "either side" if not (below or above) else "lower lr" if not below else "higher lr"
        out.status = f"fitted, not bracketed (no worse trials at {side})"
        warnings.append(f"B={b}: the optimum is not bracketed: no trial more than half an octave away at "
                        f"{side} is clearly worse, so lr* is only a bound; B={b} is left out of the lr*(B) "
                        f"fits (extend the lr range to {side})")
    if out.max_stable_effective_lr is not None and leff[0] > math.log2(out.max_stable_effective_lr) - 0.5:
        warnings.append(f"B={b}: the fitted effective lr* is within half an octave of the divergence edge "
                        f"({_g(out.max_stable_effective_lr)}); the valley's right wall is cut off by "
                        "divergence")
    near = [r for r in records
            if r.state in ("PRUNED", "COMPLETE") and abs(math.log2(r.effective_lr) - leff[0]) <= 0.5]
    if len(near) >= 4 and sum(r.state == "PRUNED" for r in near) > len(near) / 2:
        warnings.append(f"B={b}: most trials within half an octave of the fitted effective lr* were pruned; "
                        "the pruner may be cutting into the valley (give it more warm-up epochs)")


def _bracket(records: list[TrialRecord], sign: float, v: _Valley, log2_lr: float,
             log2_eff: float) -> tuple[bool, bool]:
    """Whether some trial more than half an octave below, and some above, the optimum is clearly worse:
    pruned, diverged, or completed more than twice the fit's residual RMS above the fitted optimum value.
    Checked in the coordinate the fit used (either one for the 2-D fit; across the floor, at the trial's own
    momentum, for the pooled fit)."""
    worse = [r for r in records if r.state in ("PRUNED", "DIVERGED")
             or (r.state == "COMPLETE" and (not _is_complete(r) or sign * r.value > v.value + 2.0 * v.noise))]
    offsets = []
    if v.tilt is not None:  # distance from the floor at the trial's own momentum
        offsets.append(np.log2([r.lr for r in worse]) - log2_lr
                       - v.tilt * (np.log2([1.0 - r.momentum for r in worse]) - float(v.log2_one_minus_m[0])))
    elif v.kind in ("1d-lr", "2d"):
        offsets.append(np.log2([r.lr for r in worse]) - log2_lr)
    if v.tilt is None and v.kind in ("1d-effective", "2d"):
        offsets.append(np.log2([r.effective_lr for r in worse]) - log2_eff)
    return (any(bool((d < -0.5).any()) for d in offsets), any(bool((d > 0.5).any()) for d in offsets))


def _max_stable(stable: list[float], diverged: list[float]) -> float | None:
    """The largest lr that did not diverge, below the smallest that did (None without a divergence)."""
    if not diverged:
        return None
    edge = min(diverged)
    below = [lr for lr in stable if lr < edge]
    return max(below) if below else None


@dataclass
class _Valley:
    log2_lr: np.ndarray  # (1 + n_boot,): the point estimate, then the bootstrap replicates
    log2_one_minus_m: np.ndarray
    value: float  # the fitted (sign-adjusted) objective at the optimum
    kind: str
    n_window: int
    noise: float  # residual RMS of the fit over the valley
    tilt: float | None = None  # the pooled fit's floor: d log2 lr / d log2(1 - m) along it


def _valley_points(rs: Sequence[TrialRecord], sign: float, n_boot: int, rng: np.random.Generator,
                   shared_high: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Completed trials as (log2 lr, log2(1 - m), sign * value), sorted by value, and their weights in the
    valley for the data (row 0) and every bootstrap resample."""
    y = sign * np.array([r.value for r in rs], dtype=float)
    order = np.argsort(y, kind="stable")
    counts = _resample_counts(len(rs), n_boot, rng)
    x = np.log2([rs[i].lr for i in order])
    u = np.log2([1.0 - rs[i].momentum for i in order])
    y = y[order]
    return x, u, y, _window_weights(y, counts, min(len(rs), _MIN_POINTS_2D), shared_high)


def _fit_valley(x: np.ndarray, u: np.ndarray, y: np.ndarray, weights: np.ndarray) -> _Valley:
    """Quadratic fit of the (to-be-minimised) objective y over the valley, for the data and every resample
    (the rows of ``weights``); the points as ``_valley_points`` gives them."""
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
    lu_1d = np.full(len(rows), u[0]) if momentum_fixed else _weighted_median_rows(u, weights)
    kinds = ["1d-lr"] if momentum_fixed else ["1d-lr", "1d-effective"]
    lx_c, lu_c, val_c, sse_c = [], [], [], []
    for kind in kinds:
        z = x if kind == "1d-lr" else x - u
        sz = _Scale(z, in0)
        zs = sz.apply(z)
        coef, sse = _wls(np.stack([np.ones_like(zs), zs, zs * zs], axis=1), y, weights)
        bz = _argmin_1d(coef, sz.lo, sz.hi)
        lz = sz.undo(bz)
        lx_c.append(lz if kind == "1d-lr" else lz + lu_1d)
        lu_c.append(lu_1d)
        val_c.append(coef[:, 0] + coef[:, 1] * bz + coef[:, 2] * bz**2)
        sse_c.append(sse)
    pick = np.argmin(np.stack(sse_c, axis=1), axis=1)
    hull = None
    if not momentum_fixed and n_window >= _MIN_POINTS_2D and np.ptp(u[in0]) >= _MIN_MOMENTUM_SPAN:
        sx, su = _Scale(x, in0), _Scale(u, in0)
        xs, us = sx.apply(x), su.apply(u)
        # "the sampled range" in 2-D: the convex hull of the valley's trials. A box would admit corners far
        # from any trial, e.g. high lr with high momentum, whose effective lr nobody sampled.
        try:
            hull = ConvexHull(np.stack([xs[in0], us[in0]], axis=1))
        except QhullError:  # all on one line (lr tied to momentum): nothing to fit in 2-D
            hull = None
    if hull is not None:
        corners = hull.points[hull.vertices]
        coef, sse = _wls(np.stack([np.ones_like(xs), xs, us, xs * xs, xs * us, us * us], axis=1), y, weights)
        bx, bu = _argmin_2d(coef, corners, hull.equations)
        h11, h22, h12 = 2.0 * coef[:, 3], 2.0 * coef[:, 5], coef[:, 4]
        disc = np.sqrt((h11 - h22) ** 2 / 4.0 + h12**2)
        low_eig, high_eig = (h11 + h22) / 2.0 - disc, (h11 + h22) / 2.0 + disc
        inside = weights > 0
        u_span = np.where(inside, u, -np.inf).max(axis=1) - np.where(inside, u, np.inf).min(axis=1)
        use_2d = ((inside.sum(axis=1) >= _MIN_POINTS_2D) & (u_span >= _MIN_MOMENTUM_SPAN)
                  & (low_eig > 0) & (high_eig <= _MAX_CONDITION * low_eig))
        kinds.append("2d")
        lx_c.append(sx.undo(bx))
        lu_c.append(su.undo(bu))
        val_c.append(_quad2(coef, bx, bu))
        sse_c.append(sse)
        pick = np.where(use_2d, len(kinds) - 1, pick)
    lx = np.stack(lx_c, axis=1)[rows, pick]
    lu = np.stack(lu_c, axis=1)[rows, pick]
    value = float(np.stack(val_c, axis=1)[0, pick[0]]) + y0
    noise = math.sqrt(float(np.stack(sse_c, axis=1)[0, pick[0]]))
    return _Valley(lx, lu, value, kinds[pick[0]], n_window, noise)


def _pooled_valleys(done: dict[int, list[TrialRecord]], sign: float, n_boot: int,
                    rng: np.random.Generator) -> dict[int, _Valley]:
    """The valleys of every batch size with >= 2 completed trials, fitted together: one shape, placed per
    batch size.

    The valley has much the same shape at every batch size; what the batch size changes is where it sits
    (Smith & Le 2018; Shallue et al. 2018). Its floor is a line in (x, u) = (log2 lr, log2(1 - m)): along
    the effective lr (x - u constant, a tilt of 1) for SGD with many steps, along the plain lr (tilt 0)
    for Adam, and in between when a run is too short for momentum to act as a plain multiplier on the lr
    (large batches: on digits, a run at B = 512 is 36 steps). So all batch sizes' valleys are fitted at once
    with (``_fit_floor``)

        y = c_B + k_B q(x - s_B(u)),   s_B(u) = a + b L + f_B + (g + h L) u,   L = log2 B (centred)

    q the valley's lopsided profile across the floor (``_wall``), the floor a line in log2 B with per batch
    size a shift f_B, its tilt moving linearly with log2 B, and the curvature k_B = exp(kappa + d_B); f_B and
    d_B pulled towards 0 by priors worth _FLOOR_PRIOR and _POOL_PRIOR trials. A batch size with two or three
    completed trials is placed by the others' shape and by the line through their floors; one with many by its
    own trials. The momentum at the optimum is the valley's weighted median, the lr* the floor there, clipped
    to the valley's sampled lr range. Each row (the data, then every resample) is fitted alike. Resamples draw
    trials within each batch size; where one drew fewer than two distinct trials of a batch size, that batch
    size takes another resample's replicate."""
    blocks = []
    # Far from the optimum every batch size is stuck near the same loss, so the top of the window's scale is
    # shared: a batch size whose trials all sit near its valley would otherwise see only its bottom.
    high = float(np.quantile([sign * float(r.value) for rs in done.values() for r in rs], _WINDOW_QUANTILE))
    for b, rs in sorted(done.items()):
        if len(rs) < 2:
            continue
        blocks.append((b, *_valley_points(rs, sign, n_boot, rng, shared_high=high)))
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
    theta, resid = _fit_floor(x, uc, lb, y, w, ids, tilted)
    # the floor's position and each offset; the curvatures (kappa, d_B) are needed only in resid
    a, b_, g, h = (theta[:, i] for i in range(4))
    c, f = (theta[:, _FLOOR_SHARED + i * nb : _FLOOR_SHARED + (i + 1) * nb] for i in (0, 2))
    out = {}
    for j, (b, xb, ub, _, wb) in enumerate(blocks):
        lu = _weighted_median_rows(ub, wb)
        tilt = g + h * lb[j]
        lx = a + b_ * lb[j] + f[:, j] + tilt * ((lu - u_centre) if tilted else 0.0)
        inside = wb[0] > 0
        lx = np.clip(lx, float(xb[inside].min()), float(xb[inside].max()))
        lost = (wb > 0).sum(axis=1) < 2
        if lost.all():
            continue
        if lost.any():
            take = rng.choice(np.flatnonzero(~lost), size=int(lost.sum()))
            lx[lost], lu[lost] = lx[take], lu[take]
        mine = ids == j
        noise = math.sqrt(float((w[0, mine] * resid[mine] ** 2).sum() / max(w[0, mine].sum(), 1e-12)))
        out[b] = _Valley(lx, lu, float(c[0, j]) + y0, "pooled" if tilted else "pooled-lr", int(inside.sum()),
                         noise, float(tilt[0]) if tilted else 0.0)
    return out


def _fit_floor(x: np.ndarray, u: np.ndarray, lb: np.ndarray, y: np.ndarray, weights: np.ndarray,
               ids: np.ndarray, tilted: bool) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares of ``_pooled_valleys``'s valley model for every row of ``weights`` at once
    (Levenberg-Marquardt, all rows in step), from a start the data's best trials give. Returns the
    parameters (R, 5 + 3 nb): a, b, g, h, kappa, then c_B, d_B, f_B per batch size; and the data's (row
    0's) residual per trial."""
    nb = len(lb)
    R, n = weights.shape
    p = _FLOOR_SHARED + 3 * nb
    L = lb[ids]
    in0 = weights[0] > 0
    # start: the floor through each batch size's best trial with a tilt of 1/2, a common curvature
    best = [int(np.flatnonzero((ids == j) & in0)[np.argmin(y[(ids == j) & in0])]) for j in range(nb)]
    g0 = 0.5 if tilted else 0.0
    shift = np.array([x[i] - g0 * u[i] for i in best])
    slope = float(np.polyfit(lb, shift, 1)[0])  # nb >= 2: _pooled_valleys fits nothing with fewer
    intercept = float(shift.mean() - slope * lb.mean())
    e0 = x - (intercept + slope * L + (shift - intercept - slope * lb)[ids] + g0 * u)
    spread = float(np.average(e0**2, weights=weights[0]))
    k0 = max(float(np.average(y, weights=weights[0])), 1e-9) / max(spread, 0.25)
    theta0 = np.concatenate([[intercept, slope, g0, 0.0, math.log(k0)],
                             [float(y[(ids == j) & in0].min()) for j in range(nb)], np.zeros(nb),
                             shift - intercept - slope * lb])
    # priors, in the data's units: "worth n trials" of the change each parameter makes to a trial's value
    m2, m4 = spread, float(np.average(e0**4, weights=weights[0]))
    prior_w = np.zeros(p)
    first = _FLOOR_SHARED
    prior_w[first + nb : first + 2 * nb] = _POOL_PRIOR * k0**2 * m4
    prior_w[first + 2 * nb :] = _FLOOR_PRIOR * 4.0 * k0**2 * m2
    prior_w[2] = _TILT_PRIOR * 4.0 * k0**2 * m2 * float(np.average(u**2, weights=weights[0]))
    prior_w[3] = prior_w[2] * max(float(np.mean(lb**2)), 1e-12)
    centre = np.zeros(p)
    centre[2] = g0
    free = np.ones(p, dtype=bool)
    if not tilted:
        free[2:4] = False

    def residuals(theta: np.ndarray, sw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b, g, h, kappa = (theta[:, i : i + 1] for i in range(_FLOOR_SHARED))
        c, d, f = (theta[:, _FLOOR_SHARED + i * nb : _FLOOR_SHARED + (i + 1) * nb] for i in range(3))
        e = x - (a + b * L + f[:, ids] + (g + h * L) * u)
        k = np.exp(kappa + d[:, ids])
        r = sw * (y - c[:, ids] - k * _wall(e)[0])
        pr = np.sqrt(prior_w) * (theta - centre)
        return np.concatenate([r, pr], axis=1), e, k

    shared_free = free[:_FLOOR_SHARED].astype(float)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # where each batch size's trials begin
    block = _FLOOR_SHARED + np.arange(3)[:, None] * nb + np.arange(nb)[None, :]  # (c, d, f) x batch size

    def normal_equations(theta: np.ndarray, e: np.ndarray, k: np.ndarray, wr: np.ndarray,
                         w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """J'J and J'r of the weighted residuals, from the model's gradient per trial: five shared
        parameters, and (c, d, f) of the trial's own batch size, so each sum over trials is a small one."""
        q, dq = _wall(e)
        dm_ds = -k * dq  # d model / d floor position
        shared = np.stack([dm_ds, dm_ds * L, dm_ds * u, dm_ds * L * u, k * q], axis=2) * shared_free
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
        for q in range(3):
            a_mat[:, :_FLOOR_SHARED, block[q]] = cross[:, :, :, q].transpose(0, 2, 1)
            a_mat[:, block[q], :_FLOOR_SHARED] = cross[:, :, :, q]
            grad[:, block[q]] = own_grad[:, :, q]
            for t in range(3):
                a_mat[:, block[q], block[t]] = own_own[:, :, q, t]  # pairs: each batch size with itself
        a_mat += np.diag(prior_w)
        grad += prior_w * (theta - centre)
        return a_mat, grad

    def solve(theta: np.ndarray, sw: np.ndarray) -> np.ndarray:
        """Levenberg-Marquardt on every row at once; a row drops out once it has converged."""
        theta = theta.copy()
        lam = np.full(theta.shape[0], 1e-3)
        current = (residuals(theta, sw)[0] ** 2).sum(axis=1)
        active = np.arange(theta.shape[0])
        for _ in range(_LM_STEPS):
            th, cur, lm, s_w = theta[active], current[active], lam[active], sw[active]
            r, e, k = residuals(th, s_w)
            a_mat, grad = normal_equations(th, e, k, r[:, :n] * s_w, s_w**2)
            diag = np.diagonal(a_mat, axis1=1, axis2=2)
            ridge = (1e-9 * diag.sum(axis=1) + 1e-12)[:, None] + lm[:, None] * diag
            step = -np.linalg.solve(a_mat + ridge[:, :, None] * np.eye(p), grad[:, :, None])[:, :, 0]
            trial = th + step
            with np.errstate(over="ignore", invalid="ignore"):  # a wild step overflows (inf, nan): rejected
                new = (residuals(trial, s_w)[0] ** 2).sum(axis=1)
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

    # the data alone (so that its solution does not depend on the resamples beside it), then every resample
    # from the data's solution (they differ little)
    sw = np.sqrt(weights)
    theta = solve(theta0[None, :], sw[:1])
    resid = residuals(theta, np.ones((1, n)))[0][0, :n]  # the data's, unweighted: for the noise per batch size
    return np.concatenate([theta, solve(np.tile(theta[0], (R - 1, 1)), sw[1:])]), resid


def _wall(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The valley's profile across its floor, at e octaves of lr from it, and its derivative: a parabola in
    (lr / lr*)^_WALL_POWER, q = ((2^(p e) - 1) / (p ln 2))^2, which is e^2 near the floor. A parabola in
    log lr (p -> 0) has walls equally steep, and the valley of a training run is not: it slopes up slowly
    towards small lr (a run that learns too slowly) and steeply towards large lr (a run at the edge of
    stability), and a symmetric fit across both walls puts the floor on the slow side."""
    a = _WALL_POWER * math.log(2.0)
    g = np.expm1(a * e) / a
    return g * g, 2.0 * g * (1.0 + a * g)  # 1 + a g = 2^(p e)


def _resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of n trials is drawn: row 0 the data (all ones), then one row per bootstrap resample."""
    counts = np.ones((1 + n_boot, n))
    idx = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    counts[1:] = np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n)
    return counts


def _window_weights(y: np.ndarray, counts: np.ndarray, k_min: int,
                    shared_high: float | None = None) -> np.ndarray:
    """Per resample (rows of ``counts`` over the trials, sorted by y): the weight of each trial in the valley.

    Inside: y at most 40% of the way from the best (mean of the best three draws) to the 90th percentile (or
    to ``shared_high``, where that is higher), or among the k_min best distinct trials drawn. The weight
    tapers from 1 at the bottom to 0.2 at the cut, so the fit follows the bottom more than the walls."""
    cum = np.cumsum(counts, axis=1)
    take = np.clip(np.minimum(cum, 3) - np.minimum(cum - counts, 3), 0, None)
    low = (take * y).sum(axis=1) / 3.0
    high = y[np.argmax(cum >= _WINDOW_QUANTILE * cum[:, -1:], axis=1)]
    if shared_high is not None:
        high = np.maximum(high, shared_high)
    cut = low + _WINDOW_FRACTION * (high - low)
    present = counts > 0
    inside = present & ((y[None, :] <= cut[:, None]) | (np.cumsum(present, axis=1) <= k_min))
    t = np.clip((y[None, :] - low[:, None]) / np.maximum(cut - low, 1e-12)[:, None], 0.0, 1.0)
    return np.where(inside, counts * (0.2 + 0.8 * (1.0 - t**3) ** 3), 0.0)


class _Scale:
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


def _wls(feats: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _weighted_median_rows(v: np.ndarray, weights: np.ndarray) -> np.ndarray:
    order = np.argsort(v)
    cum = np.cumsum(weights[:, order], axis=1)
    return v[order][np.argmax(cum >= 0.5 * cum[:, -1:], axis=1)]


def _interval(samples: np.ndarray) -> Interval:
    s = np.asarray(samples, dtype=float)
    s = s[~np.isnan(s)]
    lo, hi = np.quantile(s, [(1.0 - LEVEL) / 2.0, (1.0 + LEVEL) / 2.0], method="inverted_cdf")
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------- law fits


def _law_log2(form: str, rows: np.ndarray, log2_b: Any) -> np.ndarray:
    """log2 lr* of ``form`` at log2 B, for parameter rows (log2 intercept, alpha or log2 B_noise)."""
    c, p = rows[:, 0], rows[:, 1]
    lb = np.asarray(log2_b, dtype=float)
    if lb.ndim:
        c, p = c[:, None], p[:, None]
    if form == "saturating":
        return c - np.logaddexp2(0.0, p - lb)
    return c + p * lb


def _fit_forms(sizes: np.ndarray, rows: np.ndarray, criterion: str) -> tuple[dict[str, LawFit], str]:
    """Fit every form to log2 lr*; ``rows``: the point estimates, then the bootstrap replicates (one
    column per batch size)."""
    logb = np.log2(sizes)
    n = len(sizes)
    spread = (np.quantile(rows[1:], 0.84, axis=0) - np.quantile(rows[1:], 0.16, axis=0)) / 2.0
    sigma = np.maximum(spread, max(_SIGMA_FLOOR, 0.25 * float(np.median(spread))))
    w = 1.0 / sigma**2
    w = w / w.mean()
    wsum = w.sum()
    fits: dict[str, LawFit] = {}
    for form in FORMS:
        note = ""
        if form == "power":
            xm = (w * logb).sum() / wsum
            ym = (rows * w).sum(axis=1) / wsum
            alpha = ((rows - ym[:, None]) * w * (logb - xm)).sum(axis=1) / (w * (logb - xm) ** 2).sum()
            params = np.stack([ym - alpha * xm, alpha], axis=1)
        elif form in _FIXED_ALPHA:
            a = _FIXED_ALPHA[form]
            params = np.stack([((rows - a * logb) * w).sum(axis=1) / wsum, np.full(len(rows), a)], axis=1)
        else:
            c, t, edge = _profile_saturating(logb, rows, w)
            params = np.stack([c, t], axis=1)
            if edge[0] > 0:
                note = "B_noise at the top of the search range: lr* shows no saturation"
            elif edge[0] < 0:
                note = "B_noise at the bottom of the search range: lr* is flat"
        resid = rows[0] - _law_log2(form, params[:1], logb)[0]
        k = (1 if form in _FIXED_ALPHA else 2) + 1  # + the residual variance
        var = max(float((w * resid**2).sum()) / n, 1e-4)  # no fit is better than 0.01 octave
        score = n * math.log(var) + 2 * k
        if criterion == "AICc":
            score += 2 * k * (k + 1) / (n - k - 1)
        fit = LawFit(form=form, params={}, intervals={}, rms_log2=float(np.sqrt(np.mean(resid**2))),
                     aicc=score, n_points=n, n_params=k - 1, note=note, _rows=params)
        boot = params[1:]
        if form == "saturating":
            c_boot = np.where(edge[1:] > 0, np.inf, boot[:, 0])  # no saturation: lr_max unbounded too
            fit.params = {"lr_max": float(2.0 ** params[0, 0]), "b_noise": float(2.0 ** params[0, 1])}
            fit.intervals = {"lr_max": _interval(2.0**c_boot),
                             "b_noise": _interval(2.0 ** _open(t[1:], edge[1:]))}
        else:
            fit.params = {"a": float(2.0 ** params[0, 0]), "alpha": float(params[0, 1])}
            fit.intervals = {"a": _interval(2.0 ** boot[:, 0])}
            if form == "power":
                lo, hi = _interval(boot[:, 1])
                fit.intervals["alpha"] = (lo, hi)
                fit.contains_linear, fit.contains_sqrt = bool(lo <= 1.0 <= hi), bool(lo <= 0.5 <= hi)
        fits[form] = fit
    best = min(f.aicc for f in fits.values())
    total = sum(math.exp(-(f.aicc - best) / 2.0) for f in fits.values())
    for f in fits.values():
        f.delta = f.aicc - best
        f.weight = math.exp(-f.delta / 2.0) / total
    preferred = min(fits.values(), key=lambda f: f.aicc).form
    return fits, preferred


def _profile_saturating(logb: np.ndarray, rows: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Fit rows ~ c - log2(1 + 2^t / B) for every row: t on a grid (c profiled out in closed form), refined
    by a parabola through the three best grid points. Returns c, t and edge (-1/+1: t at the grid's end)."""
    grid = np.arange(logb.min() - _GRID_MARGIN, logb.max() + _GRID_MARGIN + _GRID_STEP / 2, _GRID_STEP)
    g = -np.logaddexp2(0.0, grid[:, None] - logb[None, :])  # (T, n)
    wsum = w.sum()
    swy = rows @ w
    swg = g @ w
    sse = ((rows**2) @ w)[:, None] - 2.0 * (rows * w) @ g.T + ((g**2) @ w)[None, :] \
        - (swy[:, None] - swg[None, :]) ** 2 / wsum
    k = sse.argmin(axis=1)
    last = len(grid) - 1
    kk = np.clip(k, 1, last - 1)
    r = np.arange(len(k))
    s0, s1, s2 = sse[r, kk - 1], sse[r, kk], sse[r, kk + 1]
    denom = s0 - 2.0 * s1 + s2
    inner = (k > 0) & (k < last) & (denom > 0)
    shift = np.where(inner, np.clip(0.5 * (s0 - s2) / np.where(denom > 0, denom, 1.0), -1.0, 1.0), 0.0)
    t = grid[k] + shift * _GRID_STEP
    c = ((rows + np.logaddexp2(0.0, t[:, None] - logb[None, :])) * w).sum(axis=1) / wsum
    edge = np.where(k == 0, -1, np.where(k == last, 1, 0))
    return c, t, edge


def _open(t: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """log2 B_noise (or B_crit) replicates, with those stuck at the grid's ends sent to -inf / +inf."""
    return np.where(edge > 0, np.inf, np.where(edge < 0, -np.inf, t))


def _b_noise(fits: dict[str, LawFit], preferred: str, basis: str, sizes: np.ndarray,
             warnings: list[str]) -> tuple[float | None, Interval | None]:
    what = "the effective lr*" if basis == "effective" else "lr*"
    sat = fits["saturating"]
    t0 = math.log2(sat.params["b_noise"])
    lo_b, hi_b = math.log2(sizes.min()), math.log2(sizes.max())
    if sat.delta > _REJECT_DELTA:
        warnings.append(f"the saturating form fits {what} much worse than the {preferred} form "
                        f"(difference {sat.delta:.1f}): no B_noise estimate")
        return None, None
    if t0 > hi_b + _SUPPORT_MARGIN:
        warnings.append(f"{what} still grows at the largest batch size ({int(sizes.max())}): "
                        f"no saturation seen, so B_noise is above ~{sat.intervals['b_noise'][0]:.0f}; "
                        "measure larger batch sizes to locate it")
        return None, None
    if t0 < lo_b - _SUPPORT_MARGIN:
        warnings.append(f"{what} is flat across the measured batch sizes: B_noise is below the "
                        f"smallest one ({int(sizes.min())}); measure smaller batch sizes to locate it")
        return None, None
    return sat.params["b_noise"], sat.intervals["b_noise"]


# ------------------------------------------------------------------------------------- steps to target


def _steps_fit(table: TrialTable, groups: dict[int, list[TrialRecord]], per_batch: list[BatchOptimum],
               sign: float, target: float | None, n_boot: int, rng: np.random.Generator,
               warnings: list[str]) -> StepsFit | None:
    curves: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
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
    if not curves:
        has_curve = any(r.curve for r in table.records)
        warnings.append("learning curves lack optimizer steps (and the table has no n_train): no "
                        "steps-to-target fit" if has_curve
                        else "no learning curves in the table: no steps-to-target fit")
        return None

    if target is not None:
        goal, rule = sign * float(target), "given"
    else:
        # Noisy curves dip below a target set just under the best value by luck; start from the smooth
        # fitted optimum values instead, and leave a margin.
        optima = sorted(sign * o._fit_value for o in per_batch if o._fit_value is not None)
        ref = optima[math.ceil(_TARGET_SHARE * len(optima)) - 1]
        start = float(np.median([v[0] for cs in curves.values() for _, v in cs]))
        goal = ref + _TARGET_SLACK * max(start - ref, 0.0)
        rule = "10% of the way from the optimum 3/4 of the batch sizes reach to the median first-epoch value"

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
    target_value = sign * goal
    if bounds:
        warnings.append(f"steps to target: at B={_list(bounds)} the target is reached by the first recorded "
                        "epoch, so the steps are only an upper bound and are left out of the fit (record the "
                        "curve more often, or give a harder target)")
    if len(reached_sizes) < 3:
        warnings.append(f"only {len(reached_sizes)} batch size(s) reach the target {target_value:.4g} after "
                        "their first epoch: no steps-to-target fit (it needs 3; give another target)")
        return None

    cols = []
    for cross in crossings:
        n = len(cross)
        idx = rng.integers(0, n, size=(n_boot, n))
        cols.append(np.concatenate([[cross.min()], cross[idx].min(axis=1)]))
    s_rows = np.stack(cols, axis=1)
    s_rows = s_rows[np.isfinite(s_rows).all(axis=1)]  # drop replicates in which no drawn trial got there
    logb = np.log2(np.array(reached_sizes, dtype=float))
    y = -np.log2(s_rows)  # S = S_min (1 + B_crit/B) is the saturating form in -log2 S
    c, t, edge = _profile_saturating(logb, y, np.ones(len(logb)))
    resid = y[0] - (c[0] - np.logaddexp2(0.0, t[0] - logb))
    fit = StepsFit(target=target_value, target_rule=rule, points=points, s_min=None, e_min=None, b_crit=None,
                   b_crit_interval=None, s_min_interval=None, rms_log2=float(np.sqrt(np.mean(resid**2))))
    if edge[0] != 0 or not logb.min() - _SUPPORT_MARGIN <= t[0] <= logb.max() + _SUPPORT_MARGIN:
        where = "above the largest" if t[0] > logb.max() else "below the smallest"
        warnings.append(f"steps to target: B_crit lies {where} measured batch size, so S_min, E_min and "
                        "B_crit are not reported")
        return fit
    fit.s_min, fit.b_crit = float(2.0 ** -c[0]), float(2.0 ** t[0])
    fit.e_min = fit.s_min * fit.b_crit
    if len(y) > 20:
        fit.b_crit_interval = _interval(2.0 ** _open(t[1:], edge[1:]))
        fit.s_min_interval = _interval(2.0 ** -c[1:])
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


# ------------------------------------------------------------------------------------------- helpers


def _momentum_trend(used: list[BatchOptimum], batch_size: int) -> float:
    """m at ``batch_size`` from a straight line through log2(1 - m*) against log2 B, weighted by the
    intervals and held flat beyond the measured batch sizes. The optimum momentum is only weakly located at
    any one batch size (the valley runs along lr/(1 - m)), so a trend over all of them is steadier than
    interpolating between neighbours."""
    logb = np.log2([o.batch_size for o in used])
    v = np.array([math.log2(1.0 - (o.momentum or 0.0)) for o in used])
    sigma = np.array([(math.log2(1.0 - iv[0]) - math.log2(1.0 - iv[1])) / 3.92 if iv else 0.0
                      for iv in (o.momentum_interval for o in used)])
    w = 1.0 / np.maximum(sigma, _SIGMA_FLOOR) ** 2
    xm, vm = np.average(logb, weights=w), np.average(v, weights=w)
    slope = float((w * (logb - xm) * (v - vm)).sum() / max(float((w * (logb - xm) ** 2).sum()), 1e-12))
    at = min(max(math.log2(batch_size), float(logb.min())), float(logb.max()))
    return float(1.0 - 2.0 ** (vm + slope * (at - xm)))


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


def _g(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(v)
    return f"{v:.3g}" if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _iv(iv: Interval | None, fmt: str = ".3g") -> str:
    if iv is None:
        return "-"
    return "[" + ", ".join(format(v, fmt) if math.isfinite(v) else "inf" for v in iv) + "]"


def _params(f: LawFit) -> str:
    p, iv = f.params, f.intervals
    if f.form == "saturating":
        text = (f"lr_max={_g(p['lr_max'])} {_iv(iv['lr_max'])}  "
                f"B_noise={p['b_noise']:.0f} {_iv(iv['b_noise'], '.0f')}")
        return text + ("  (edge)" if f.note else "")
    text = f"a={_g(p['a'])} {_iv(iv['a'])}"
    if f.form == "power":
        yes = {True: "yes", False: "no"}
        text += (f"  alpha={p['alpha']:.3f} {_iv(iv['alpha'], '.3f')}  1 in: {yes[bool(f.contains_linear)]}, "
                 f"0.5 in: {yes[bool(f.contains_sqrt)]}")
    return text


def _list(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)
