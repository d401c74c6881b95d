"""``analyze``: from a TrialTable to an Analysis, one batch size at a time and then across them.

Per batch size: counts, the best trial and the divergence edge (``_batch_basics``); its valley smoothed on its
own (``smooth``, through ``reduce``); where that does not apply or falls back, its valley fitted alone
(``valley.fit_valley``) and with the other batch sizes (``pooled.pooled_valleys``); the optimum filled in from
the fit that places it best (``fill_optimum``). Across batch sizes: the forms of lr*(B) and B_noise
(``laws``), and the steps to a target (``steps``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from bstune.analysis.answer import answer, throughput
from bstune.analysis.laws import estimate_b_noise, find_peak, fit_forms
from bstune.analysis.pooled import pooled_valleys
from bstune.analysis.reduce import smooth_batch
from bstune.analysis.results import (
    PLATEAU_NOISE,
    Analysis,
    BatchOptimum,
    Interval,
    LawFit,
    format_number,
    is_int,
    quantile_interval,
)
from bstune.analysis.steps import steps_fit
from bstune.analysis.valley import Valley, fit_valley, valley_points
from bstune.errors import BstuneError
from bstune.trials import FAILED_STATES, State, TrialRecord, TrialTable

_OWN, _POOLED, _SMOOTH, _STEPS = range(4)  # the stages that draw bootstrap resamples (see _stream)


def analyze(table: TrialTable, *, target: float | None = None, n_boot: int = 200, seed: int = 0,
            min_trials: int = 4) -> Analysis:
    """Fit the optimum per batch size, how it moves with B, and the steps to ``target`` (see the package doc).

    ``target``: the objective value for the steps fit. Default: start from the fitted optimum value (the
    smooth fit's, not a noisy best epoch) that 3/4 of the batch sizes reach, and give back 10% of the way
    to the median first-epoch value; e.g. loss 0.30 at the optimum and 2.0 after one epoch give 0.47.
    ``n_boot``: bootstrap resamples for every interval. ``min_trials``: completed trials a batch size needs
    to be fitted on its own; fitted with the others (the usual case), 2 suffice and fewer than
    ``min_trials`` are named in its status.
    """
    _check_arguments(table, target, n_boot, min_trials)
    sign = 1.0 if table.direction == "minimize" else -1.0
    warnings: list[str] = []
    groups = table.by_batch_size()
    done = {b: [r for r in rs if _is_complete(r)] for b, rs in groups.items()}
    if not any(done.values()):
        raise BstuneError(f"none of the {len(table.records)} trials completed with a finite value, so there is "
                          "nothing to fit: run more trials (bstune status shows how they ended)")
    nan_done = sum(1 for rs in groups.values() for r in rs if r.state == State.COMPLETE and not _is_complete(r))
    if nan_done:
        warnings.append(f"{nan_done} COMPLETE trial(s) have no finite value; they count as diverged")
    notes_by_batch: dict[int, list[str]] = {b: [] for b in groups}
    trials = {b: _Trials(rs, sign) for b, rs in groups.items()}  # each batch size's records as arrays, once
    per_batch = [_batch_basics(b, rs, trials[b], done[b], min_trials) for b, rs in groups.items()]
    # each batch size's own smoothed valley first: the quadratic and pooled fits are made only where it
    # falls back to them (their results would be replaced), each stage drawing from its own stream
    smoothed = _smooth_all(groups, done, sign, n_boot, seed, min_trials)
    fall_back = {b for b in groups if smoothed.get(b) is None}
    for o in per_batch:
        if o.batch_size in fall_back and len(done[o.batch_size]) >= min_trials:
            v = fit_valley(*valley_points(done[o.batch_size], sign, n_boot, _stream(seed, _OWN, o.batch_size)))
            fill_optimum(o, v, trials[o.batch_size], sign, notes_by_batch[o.batch_size])
    if any(len(done[b]) >= 2 for b in fall_back):
        _prefer_pooled(per_batch, trials, done, notes_by_batch, sign, n_boot, _stream(seed, _POOLED), min_trials,
                       fall_back)
    _prefer_smooth(per_batch, trials, smoothed, notes_by_batch, sign)
    warnings += [w for b in groups for w in notes_by_batch[b]]
    if len(groups) == 1 and not per_batch[0].fitted:
        raise BstuneError(f"the trials cover one batch size (B={per_batch[0].batch_size}) with "
                          f"{per_batch[0].n_complete} completed trial(s); its optimum needs >= {min_trials}: run "
                          "more trials")
    if len(groups) > 1 and sum(o.fitted for o in per_batch) < 2:
        found = ", ".join(f"B={b}: {len(done[b])}" for b in groups)
        raise BstuneError(f"need at least 2 batch sizes that can be fitted (>= {min_trials} completed trials "
                          "each, or >= 2 where the other batch sizes show the valley's shape); found "
                          f"{found}; run more trials")
    if len(groups) < 2:
        warnings.append(f"the trials cover one batch size (B={next(iter(groups))}): its optimum is fitted, but "
                        "how lr* moves with B needs 2 or more (5 or more to tell the forms apart); list more "
                        "batch sizes in the spec's search.batch_sizes")
    grad_noise = {b: _median_gns(rs) for b, rs in groups.items()}
    laws = _LawFits.of(per_batch, warnings)
    steps = steps_fit(table, groups, per_batch, sign, target, n_boot, _stream(seed, _STEPS), warnings)
    choice = answer(per_batch, steps, throughput(table), sign, laws.b_noise, laws.b_noise_interval)
    return Analysis(per_batch=per_batch, fits=laws.fits, effective_fits=laws.effective_fits,
                    preferred=laws.preferred, effective_preferred=laws.effective_preferred,
                    criterion=laws.criterion, basis=laws.basis, b_noise=laws.b_noise,
                    b_noise_interval=laws.b_noise_interval, peak=laws.peak, peak_interval=laws.peak_interval,
                    trend=laws.trend, steps=steps, grad_noise_scale=grad_noise,
                    warnings=warnings, direction=table.direction, metric=table.metric,
                    n_trials=len(table.records), n_boot=int(n_boot), min_trials=int(min_trials),
                    n_train=table.n_train, answer=choice)


def _check_arguments(table: TrialTable, target: float | None, n_boot: int, min_trials: int) -> None:
    if not isinstance(table, TrialTable):
        raise BstuneError(f"analyze() needs a TrialTable, got {type(table).__name__}")
    if not table.records:
        raise BstuneError("the trial table is empty: run a study first, or give a CSV with one row per trial")
    if not is_int(n_boot) or n_boot < 20:
        raise BstuneError(f"n_boot must be an integer >= 20 (bootstrap resamples for the intervals), "
                          f"got {n_boot!r}")
    if not is_int(min_trials) or min_trials < 3:
        raise BstuneError(f"min_trials must be an integer >= 3 (a quadratic needs 3 points), "
                          f"got {min_trials!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not math.isfinite(target)):
        raise BstuneError(f"target must be a finite number (the objective value to reach), got {target!r}")
    _check_records(table.records)


def _check_records(records: Sequence[TrialRecord]) -> None:
    for r in records:
        if not is_int(r.batch_size) or r.batch_size < 1:
            raise BstuneError(f"trial {r.number}: batch_size must be a positive integer, "
                              f"got {r.batch_size!r} (fix or drop that trial)")
        if not (isinstance(r.lr, (int, float)) and math.isfinite(r.lr) and r.lr > 0):
            raise BstuneError(f"trial {r.number}: lr must be > 0, got {r.lr!r} (fix or drop that trial)")
        if not (isinstance(r.momentum, (int, float)) and 0 <= r.momentum < 1):
            raise BstuneError(f"trial {r.number}: momentum must lie in [0, 1), got {r.momentum!r} "
                              "(fix or drop that trial)")


def _prefer_pooled(per_batch: list[BatchOptimum], trials: dict[int, _Trials],
                   done: dict[int, list[TrialRecord]], notes_by_batch: dict[int, list[str]], sign: float, n_boot: int,
                   rng: np.random.Generator, min_trials: int, only: set[int]) -> None:
    """Replace each batch size's own fit (in place, with what it says) by the joint one where there is one,
    for the batch sizes in ``only`` (the joint fit is made over all of them).

    The joint fit places batch sizes with only 2-3 completed trials, and the separate 2-D fits wobble with
    the momenta drawn unless each valley holds many trials (benchmarks/SEARCH.md). Not where the joint fit's
    optimum is only a bound and the batch size's own fit is bracketed."""
    pooled = pooled_valleys(done, sign, n_boot, rng)
    for i, o in enumerate(per_batch):
        if o.batch_size not in pooled or o.batch_size not in only:
            continue
        joint, notes = dataclasses.replace(o), []
        fill_optimum(joint, pooled[o.batch_size], trials[o.batch_size], sign, notes)
        if o.bracketed and not joint.bracketed:
            continue
        if joint.n_complete < min_trials:
            joint.status = joint.status.replace("fitted", f"fitted from {o.n_complete} completed trials and the "
                                                "valley shape of the other batch sizes", 1)
        per_batch[i], notes_by_batch[o.batch_size] = joint, notes


def _smooth_all(groups: dict[int, list[TrialRecord]], done: dict[int, list[TrialRecord]], sign: float,
                n_boot: int, seed: int, min_trials: int) -> dict[int, Valley | None]:
    """Each batch size's own smoothed valley (``smooth``; ``reduce`` beyond a few thousand trials) where its
    completed trials share one momentum and number at least ``min_trials``: a real valley changes shape
    with B, and a shape pooled over the batch sizes places lr* off where it does. None where there are too
    few trials in its valley to smooth it; batch sizes it does not apply to are left out."""
    out: dict[int, Valley | None] = {}
    for b, rs in done.items():
        if len(rs) < min_trials or len({r.momentum for r in rs}) != 1:
            continue
        diverged = [r for r in groups[b] if r.state == State.DIVERGED
                    or (r.state == State.COMPLETE and not _is_complete(r))]
        out[b] = smooth_batch(rs, diverged, sign, n_boot, _stream(seed, _SMOOTH, b))
    return out


def _prefer_smooth(per_batch: list[BatchOptimum], trials: dict[int, _Trials],
                   smoothed: dict[int, Valley | None], notes_by_batch: dict[int, list[str]], sign: float) -> None:
    """Replace each batch size's optimum (in place) by its own smoothed valley where there is one."""
    for i, o in enumerate(per_batch):
        if o.batch_size not in smoothed:
            continue
        v = smoothed[o.batch_size]
        if v is None:  # too few trials in its valley to say how flat it is: no plateau is claimed
            o.plateau = o.plateau_low_interval = o.plateau_high_interval = None
            continue
        out, notes = dataclasses.replace(o), []
        fill_optimum(out, v, trials[o.batch_size], sign, notes)
        per_batch[i], notes_by_batch[o.batch_size] = out, notes


def _stream(seed: int, stage: int, batch_size: int = 0) -> np.random.Generator:
    """The random stream of one stage of the analysis (and one batch size): independent of the others, so
    that a fit skipped (or made) leaves every other's draws as they were."""
    return np.random.default_rng([seed, stage, batch_size])


@dataclasses.dataclass
class _LawFits:
    """The forms of lr*(B) and of the effective lr*(B) over the bracketed optima, and B_noise."""

    criterion: str
    fits: dict[str, LawFit] = dataclasses.field(default_factory=dict)
    effective_fits: dict[str, LawFit] = dataclasses.field(default_factory=dict)
    preferred: str | None = None
    effective_preferred: str | None = None
    basis: str = "effective"
    b_noise: float | None = None
    b_noise_interval: Interval | None = None
    peak: float | None = None
    peak_interval: Interval | None = None
    trend: str = ""

    @classmethod
    def of(cls, per_batch: list[BatchOptimum], warnings: list[str]) -> _LawFits:
        used = [o for o in per_batch if o.fitted and o.bracketed]
        out = cls(criterion="AICc" if len(used) >= 5 else "AIC")
        if len(used) < 2:
            warnings.append("fewer than 2 batch sizes have a bracketed optimum: no lr*(B) fits (see the "
                            "warnings above)")
            return out
        if len(used) < 5:
            warnings.append(f"only {len(used)} batch sizes have a bracketed optimum: the forms are compared "
                            "by AIC and hardly told apart; measure 5 or more batch sizes")
        sizes = np.array([o.batch_size for o in used], dtype=float)
        out.fits, out.preferred = fit_forms(sizes, np.stack([o._log2_lr for o in used], axis=1), out.criterion)
        out.effective_fits, out.effective_preferred = fit_forms(
            sizes, np.stack([o._log2_eff for o in used], axis=1), out.criterion)
        # SGD's valley follows the effective lr, Adam's the plain one: use whichever the forms describe better
        if out.fits[out.preferred].rms_log2 < out.effective_fits[out.effective_preferred].rms_log2 - 1e-9:
            out.basis = "lr"
        if out.basis == "effective":
            chosen, chosen_form = out.effective_fits, out.effective_preferred
        else:
            chosen, chosen_form = out.fits, out.preferred
        out.peak, out.peak_interval, out.trend = find_peak(chosen, chosen_form, out.basis, sizes, warnings)
        if chosen_form != "surge":  # a surge's B_noise is where lr* peaks, not where it levels off
            out.b_noise, out.b_noise_interval = estimate_b_noise(chosen, chosen_form, out.basis, sizes, warnings)
        return out


def _is_complete(r: TrialRecord) -> bool:
    return r.state == State.COMPLETE and r.value is not None and math.isfinite(r.value)


def _median_gns(records: Sequence[TrialRecord]) -> float | None:
    vals = [g for g in (r.grad_noise_scale for r in records) if g is not None and math.isfinite(g)]
    return float(np.median(vals)) if vals else None


# ------------------------------------------------------------------------------------ per-batch optimum


class _Trials:
    """A batch size's trials as arrays (one pass over the records): lr, effective lr, sign * value (nan where
    none), and which say COMPLETE, are complete (with a finite value), diverged (or COMPLETE without a finite
    value), pruned, failed."""

    def __init__(self, records: Sequence[TrialRecord], sign: float) -> None:
        n = len(records)
        state = np.array([r.state for r in records], dtype=str) if n else np.zeros(0, dtype=str)
        self.lr = np.fromiter((r.lr for r in records), dtype=float, count=n)
        self.one_minus_m = np.fromiter((1.0 - r.momentum for r in records), dtype=float, count=n)
        self.effective_lr = np.fromiter((r.effective_lr for r in records), dtype=float, count=n)
        value = np.fromiter((math.nan if r.value is None else r.value for r in records), dtype=float, count=n)
        self.value = sign * value
        finite = np.isfinite(value)
        self.said_complete = state == State.COMPLETE.value
        self.complete = self.said_complete & finite
        self.diverged = (state == State.DIVERGED.value) | (self.said_complete & ~finite)
        self.pruned = state == State.PRUNED.value
        self.failed = np.isin(state, [s.value for s in FAILED_STATES])


def _between_trials(t: _Trials, log2_lr: float) -> float:
    """The completed trials' (sign-adjusted) value at ``log2_lr``, linear in log2 lr between the two either
    side (in log value, where every value is positive: one run's noise is about a fixed fraction of it)."""
    x, y = np.log2(t.lr[t.complete]), t.value[t.complete]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if (y > 0).all():
        return float(np.exp(np.interp(log2_lr, x, np.log(y))))
    return float(np.interp(log2_lr, x, y))


def _batch_basics(b: int, records: list[TrialRecord], t: _Trials, done: list[TrialRecord],
                  min_trials: int) -> BatchOptimum:
    """A batch size's counts, best trial and divergence edge, before any fit (``t``: ``records`` as arrays)."""
    best = records[int(np.argmin(np.where(t.complete, t.value, np.inf)))] if done else None  # the first best
    stable = t.pruned | t.complete
    return BatchOptimum(
        batch_size=b, n_complete=len(done), n_pruned=int(t.pruned.sum()),
        n_diverged=int(t.diverged.sum()), n_failed=int(t.failed.sum()),
        best_lr=best.lr if best else None, best_momentum=best.momentum if best else None,
        best_value=best.value if best else None, status=f"too few trials ({len(done)} < {min_trials})",
        max_stable_lr=_max_stable(t.lr[stable], t.lr[t.diverged]),
        max_stable_effective_lr=_max_stable(t.effective_lr[stable], t.effective_lr[t.diverged]),
    )


def fill_optimum(out: BatchOptimum, v: Valley, t: _Trials, sign: float,
                 warnings: list[str]) -> None:
    """Fill in ``out`` from the valley fit ``v`` of its batch size (``t``: its trials): the optimum, its
    intervals, the bracket."""
    b = out.batch_size
    lx, lu = v.log2_lr, v.log2_one_minus_m
    leff = lx - lu
    out.lr, out.lr_interval = float(2.0 ** lx[0]), _holding(2.0 ** lx[0], quantile_interval(2.0 ** lx[1:]))
    out.momentum, out.momentum_interval = float(1.0 - 2.0 ** lu[0]), quantile_interval(1.0 - 2.0 ** lu[1:])
    out.effective_lr = float(2.0 ** leff[0])
    out.effective_lr_interval = _holding(out.effective_lr, quantile_interval(2.0 ** leff[1:]))
    # the value is the fit's expectation at the recommended (lr, m), never the best trial's (the best of n noisy
    # trials is optimistic). A lone quadratic's bottom can overshoot what any trial reached (even to a negative
    # loss), and so can the pooled shape on a real valley it does not describe (on the digits grid, at 16
    # trials per batch size, where a valley is too sparse to smooth: floors 0.05-0.3 below every run): every
    # fit but the smoother's is held at the best trial's, and at one momentum read off the trials instead
    # (below). The pooled 2-D fit (momentum searched) is held too: its residual scatter is the shape's misfit
    # across momenta, not one run's noise (0.13 val_loss on the default digits study, whose best trials are
    # 0.03-0.18), so a value held only that far below the best trial fell to a tenth of any run's
    out._fit_value = sign * v.value
    out.value = out._fit_value
    if out.best_value is not None and v.kind != "smooth":
        out.value = sign * max(v.value, sign * float(out.best_value))
        if np.ptp(t.one_minus_m[t.complete]) == 0.0:
            # one momentum: the trials either side of the recommended lr say what a run there reaches; the
            # best trial's value, read at another lr, is the winner's curse (on the digits grid at 24 trials
            # per batch size, 0.04 below the seed-mean there; interpolated, 0.013)
            out.value = sign * _between_trials(t, float(lx[0]))
    out.fit, out.n_window = v.kind, v.n_window
    out.noise = PLATEAU_NOISE * v.noise
    if v.plateau is not None:
        with np.errstate(over="ignore"):  # a resample's plateau may run off to inf octaves: an open end
            ends = 2.0 ** v.plateau
        out.plateau = (float(ends[0, 0]), float(ends[0, 1]))
        # one training seed's valley differs from another's by noise that neighbouring lrs share, which a
        # bootstrap of the trials does not see: lr* may lie anywhere within one run's noise of the bottom
        near = v.plateau if v.near is None else v.near
        if math.isfinite(near[0, 0]) and math.isfinite(near[0, 1]):
            _reach(out, 2.0 ** float(near[0, 0]), 2.0 ** float(near[0, 1]), 2.0 ** -float(lu[0]))
        out.plateau_low_interval = quantile_interval(ends[1:, 0])
        out.plateau_high_interval = quantile_interval(ends[1:, 1])
    if v.kind != "smooth" and out.best_lr is not None:
        _widen_to_neighbours(out, t, float(out.best_lr), 2.0 ** -float(lu[0]))
    out._log2_lr, out._log2_eff = lx, leff
    below, above = _bracket(t, v, lx[0], leff[0])
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
                        f"({format_number(out.max_stable_effective_lr)}); the valley's right wall is cut off by "
                        "divergence")
    near = (t.pruned | t.said_complete) & (np.abs(np.log2(t.effective_lr) - leff[0]) <= 0.5)
    if near.sum() >= 4 and (near & t.pruned).sum() > near.sum() / 2:
        warnings.append(f"B={b}: most trials within half an octave of the fitted effective lr* were pruned; "
                        "the pruner may be cutting into the valley (give it more warm-up epochs)")


def _bracket(t: _Trials, v: Valley, log2_lr: float, log2_eff: float) -> tuple[bool, bool]:
    """Whether some trial more than half an octave below, and some above, the optimum is clearly worse:
    pruned, diverged, or completed more than twice the fit's residual RMS above the fitted optimum value.
    Checked in the coordinate the fit used (either one for the 2-D fit; across the floor, at the trial's own
    momentum, for the pooled fit)."""
    worse = t.pruned | t.diverged | (t.complete & (t.value > v.value + 2.0 * v.noise))
    offsets = []
    if v.tilt is not None:  # distance from the floor at the trial's own momentum
        offsets.append(np.log2(t.lr[worse]) - log2_lr
                       - v.tilt * (np.log2(t.one_minus_m[worse]) - float(v.log2_one_minus_m[0])))
    elif v.kind in ("1d-lr", "2d", "smooth"):
        offsets.append(np.log2(t.lr[worse]) - log2_lr)
    if v.tilt is None and v.kind in ("1d-effective", "2d"):
        offsets.append(np.log2(t.effective_lr[worse]) - log2_eff)
    return (any(bool((d < -0.5).any()) for d in offsets), any(bool((d > 0.5).any()) for d in offsets))


def _widen_to_neighbours(out: BatchOptimum, t: _Trials, best_lr: float, scale: float) -> None:
    """Widen the lr intervals (in place) to the lrs of the trials next to the best trial's, where every trial
    of the batch size ran at one momentum. A valley too sparse to smooth is placed by a shape that may not
    be its own; the trials themselves say only that lr* of a one-bottomed valley lies between the best
    trial's neighbours (on the digits grid at 8 trials per batch size the shape alone held the multi-seed
    lr* in 0.86 of optima, widened so in 0.97: benchmarks/REAL.md)."""
    if t.one_minus_m.size == 0 or np.ptp(t.one_minus_m) > 0:
        return
    x = t.lr[t.complete | t.diverged | t.pruned]
    below, above = x[x < best_lr], x[x > best_lr]
    # a side with no trial beyond the best keeps its end (inf / 0 widen nothing)
    _reach(out, float(below.max()) if below.size else math.inf, float(above.min()) if above.size else 0.0, scale)


def _reach(out: BatchOptimum, lo: float, hi: float, scale: float) -> None:
    """Widen the lr interval (in place) to hold lo..hi, and the effective lr interval to hold the same lrs at the
    optimum's momentum (``scale``: 1 / (1 - m*))."""
    a, b = out.lr_interval
    out.lr_interval = (min(a, lo), max(b, hi))
    a, b = out.effective_lr_interval
    out.effective_lr_interval = (min(a, lo * scale), max(b, hi * scale))


def _holding(point: float, interval: Interval) -> Interval:
    """The interval widened, where needed, to hold its own point estimate."""
    return (min(interval[0], point), max(interval[1], point))


def _max_stable(stable: np.ndarray, diverged: np.ndarray) -> float | None:
    """The largest lr that did not diverge, below the smallest that did (None without a divergence)."""
    if not len(diverged):
        return None
    below = stable[stable < diverged.min()]
    return float(below.max()) if len(below) else None
