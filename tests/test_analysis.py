"""bstune.analysis on synthetic trial tables drawn from known laws (bstune.simulate), and on bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from functools import cache

import numpy as np
import pytest

from bstune.analysis import FORMS, Analysis, analyze
from bstune.analysis.answer import SEPARATES
from bstune.analysis.laws import _fit_form
from bstune.errors import BstuneError
from bstune.report import format_analysis, format_recommendation
from bstune.trials import FAILED_STATES, State, TrialRecord, TrialTable
from tests.simulate import simulate_trials, valley_profile

B_NOISE = 256.0


@cache
def _sim(law: str, seed: int, **kw) -> TrialTable:
    return simulate_trials(law, seed=seed, **kw)


@cache
def _analysis(law: str, seed: int, **kw) -> Analysis:
    return analyze(_sim(law, seed, **kw), seed=seed)


def _octaves(a: float, b: float) -> float:
    return abs(math.log2(a / b))


# ------------------------------------------------------------------------------- recovery of known laws


@pytest.mark.parametrize(("alpha", "seeds", "allowed"), [
    (1.0, range(8), {"linear", "power"}),
    (0.5, range(100, 108), {"sqrt", "power"}),
])
@pytest.mark.slow
def test_power_law_alpha_is_recovered_and_its_interval_covers_it(alpha, seeds, allowed):
    covered, errors, flagged = 0, [], 0
    for seed in seeds:
        a = _analysis("power", seed, alpha=alpha)
        fit = a.effective_fits["power"]
        errors.append(abs(fit.alpha - alpha))
        lo, hi = fit.intervals["alpha"]
        covered += lo <= alpha <= hi
        assert a.effective_preferred in allowed, (seed, a.effective_preferred)
        assert a.effective_fits["saturating"].delta > 2.0  # clearly not the saturating form
        # the flags tell the two rules apart: never the other rule's; this rule's as often as the interval covers
        assert not (fit.contains_sqrt if alpha == 1.0 else fit.contains_linear), (seed, fit.intervals["alpha"])
        flagged += fit.contains_linear if alpha == 1.0 else fit.contains_sqrt
        assert a.b_noise is None  # no saturation to see in a power law
        assert any("B_noise" in w for w in a.warnings)
    # a 95% interval misses now and then: coverage is counted over the seeds, not asserted seed by seed
    assert max(errors) <= 0.1 and float(np.mean(errors)) <= 0.05, errors
    assert covered >= 0.75 * len(seeds) and flagged >= 0.75 * len(seeds)


def test_plain_lr_fit_with_fixed_momentum_recovers_alpha():
    for seed in range(4):
        a = _analysis("power", seed, alpha=1.0, momentum=0.9)
        # each batch size's valley is smoothed on its own (no shape borrowed from the others): per batch size
        # lr* scatters by up to 0.3 octave here, so alpha over 8 octaves of B by up to ~0.06
        assert abs(a.fits["power"].alpha - 1.0) <= 0.08
        for o in a.per_batch:
            assert o.fit in ("smooth", "pooled-lr")  # momentum fixed: nothing to fit but lr
            assert o.momentum == pytest.approx(0.9)
            assert o.effective_lr == pytest.approx(o.lr / 0.1)
        # with a fixed momentum the effective fits are the plain ones shifted by log2(1/0.1)
        assert a.effective_fits["power"].alpha == pytest.approx(a.fits["power"].alpha)


def test_alphas_interval_holds_where_the_optima_scatter_about_the_law_beyond_their_own_spreads():
    # each optimum off the law by more than its bootstrap spread (another training seed's valley lies
    # elsewhere, which a bootstrap of one seed's trials does not see): the interval must still hold alpha
    rng = np.random.default_rng(0)
    logb = np.log2([16.0, 32, 64, 128, 256, 512])
    held = 0
    for _ in range(200):
        points = -8.0 + 0.8 * logb + rng.normal(0.0, 0.3, len(logb))
        rows = np.vstack([points, points + rng.normal(0.0, 0.08, (200, len(logb)))])
        sigma = np.full(len(logb), 0.08)  # fit_forms' weights: the replicates' spreads (here all alike)
        lo, hi = _fit_form("power", logb, rows, np.ones(len(logb)), sigma, "AICc").intervals["alpha"]
        held += lo <= 0.8 <= hi
    assert held >= 0.85 * 200


@pytest.mark.slow
def test_saturating_law_b_noise_is_recovered_covered_and_preferred():
    errors, covered = [], 0
    for seed in range(8):
        a = _analysis("saturating", seed, b_noise=B_NOISE)
        assert a.effective_preferred == "saturating"
        assert a.b_noise is not None and a.b_noise_interval is not None
        errors.append(abs(a.b_noise / B_NOISE - 1.0))
        lo, hi = a.b_noise_interval
        covered += lo <= B_NOISE <= hi
    assert sum(e <= 0.2 for e in errors) >= 7, errors  # the lopsided valley's long slope says little
    assert float(np.median(errors)) <= 0.10
    assert covered >= 6


@pytest.mark.slow
def test_fitted_optimum_beats_the_best_trial_and_its_interval_covers_the_truth():
    fitted, best, covered, n = [], [], 0, 0
    for seed in range(5):
        table = _sim("saturating", seed)
        truth = table.meta["truth"]["effective_lr"]
        for o in _analysis("saturating", seed).per_batch:
            assert o.fitted and o.bracketed and o.status == "fitted"
            fitted.append(math.log2(o.effective_lr / truth[o.batch_size]))
            best.append(math.log2(o.best_lr / (1.0 - o.best_momentum) / truth[o.batch_size]))
            lo, hi = o.effective_lr_interval
            covered += lo <= truth[o.batch_size] <= hi
            n += 1
    assert max(abs(e) for e in fitted) <= 0.6
    # the raw argmin jitters by an octave; the fit does not
    assert np.sqrt(np.mean(np.square(fitted))) <= 0.5 * np.sqrt(np.mean(np.square(best)))
    assert covered >= 0.8 * n


def test_counts_grad_noise_scale_and_direction_maximize():
    table = _sim("saturating", 0)
    a = _analysis("saturating", 0)
    for o in a.per_batch:
        rs = [r for r in table.records if r.batch_size == o.batch_size]
        assert o.n_complete + o.n_pruned + o.n_diverged + o.n_failed == len(rs)
        assert o.n_diverged == sum(r.state == "DIVERGED" for r in rs) > 0
        assert o.best_value == min(r.value for r in rs if r.state == "COMPLETE")
        assert _octaves(a.grad_noise_scale[o.batch_size], B_NOISE) < 0.3
    assert all(v is None for v in _analysis("power", 0, alpha=1.0).grad_noise_scale.values())

    up = _analysis("saturating", 0, direction="maximize")
    assert up.direction == "maximize" and up.effective_preferred == "saturating"
    assert abs(up.b_noise / B_NOISE - 1.0) <= 0.15
    up_table = _sim("saturating", 0, direction="maximize")
    for o in up.per_batch:
        done = [r.value for r in up_table.records if r.batch_size == o.batch_size and r.state == "COMPLETE"]
        assert o.best_value == max(done)


def test_point_estimates_do_not_depend_on_the_bootstrap_seed():
    table = _sim("saturating", 1)
    a, b, c = analyze(table, seed=0), analyze(table, seed=0), analyze(table, seed=1)
    assert a.to_dict() == b.to_dict()
    # equal but for rounding: which trials some resample draws changes the order of the joint fit's sums
    assert [o.effective_lr for o in a.per_batch] == pytest.approx([o.effective_lr for o in c.per_batch], rel=1e-9)
    assert a.b_noise == pytest.approx(c.b_noise, rel=0.05)  # the seed moves only the fits' weights
    assert a.b_noise_interval != c.b_noise_interval


# ------------------------------------------------------------------------------ the valley's evidence


def _valley_records(batch_size: int, lrs: list[float], opt: float, start: int = 0) -> list[TrialRecord]:
    return [TrialRecord(number=start + i, batch_size=batch_size, lr=lr, momentum=0.0,
                        value=0.3 + 2.0 * valley_profile(math.log2(lr / opt)), state="COMPLETE")
            for i, lr in enumerate(lrs)]


def test_max_stable_lr_is_the_largest_stable_lr_below_the_smallest_diverged_one():
    recs = _valley_records(32, [0.01, 0.02, 0.04, 0.06, 0.16], opt=0.03)
    recs += [TrialRecord(number=10, batch_size=32, lr=0.07, momentum=0.0, value=1.0, state="PRUNED"),
             TrialRecord(number=11, batch_size=32, lr=0.08, momentum=0.0, value=None, state="DIVERGED"),
             TrialRecord(number=12, batch_size=32, lr=0.2, momentum=0.0, value=None, state="DIVERGED"),
             TrialRecord(number=13, batch_size=32, lr=0.05, momentum=0.0, value=None, state="OOM")]
    recs += _valley_records(64, [0.01, 0.03, 0.06, 0.12, 0.24], opt=0.06, start=20)
    a = analyze(TrialTable(recs))
    b32, b64 = a.optimum(32), a.optimum(64)
    assert b32.max_stable_lr == 0.07  # pruned did not diverge; 0.16 lies above the first divergence
    assert (b32.n_complete, b32.n_pruned, b32.n_diverged, b32.n_failed) == (5, 1, 2, 1)
    assert b64.max_stable_lr is None  # no divergence seen: the edge is unknown
    # within 0.15 octave: the fit's valley shape approximates the simulator's, five noise-free trials each
    assert b32.lr == pytest.approx(0.03, rel=0.1) and b64.lr == pytest.approx(0.06, rel=0.1)


def test_pruned_values_are_not_fitted_and_nan_values_count_as_diverged():
    table = _sim("saturating", 2, momentum=0.9)
    before = analyze(table).optimum(256)
    fake = [TrialRecord(number=10_000 + i, batch_size=256, lr=before.lr * 8, momentum=0.9, value=0.0,
                        state="PRUNED") for i in range(10)]
    fake.append(TrialRecord(number=20_000, batch_size=256, lr=before.lr * 4, momentum=0.9, value=float("nan"),
                            state="COMPLETE"))
    a = analyze(dataclasses.replace(table, records=table.records + fake))
    after = a.optimum(256)
    # their values (0.0) come from earlier epochs: were they fitted, lr* would jump to them, 3 octaves up; the
    # NaN trial is a wall 2 octaves up, which moves the smoothed bottom by a hair at most
    assert after.lr == pytest.approx(before.lr, rel=0.02)
    assert after.n_pruned == before.n_pruned + 10 and after.n_diverged == before.n_diverged + 1
    assert any("no finite value" in w for w in a.warnings)


def test_too_few_trials_and_out_of_memory_batch_sizes_are_reported_not_fitted():
    table = _sim("saturating", 3, oom_above=2048)
    keep16 = [r for r in table.records if r.batch_size == 16 and r.state == "COMPLETE"][:1]
    records = [r for r in table.records if r.batch_size != 16 or r.state != "COMPLETE"] + keep16
    a = analyze(dataclasses.replace(table, records=records))
    b16, b4096 = a.optimum(16), a.optimum(4096)
    assert b16.status == "too few trials (1 < 4)" and b16.lr is None and not b16.fitted
    assert b4096.status == "too few trials (0 < 4)" and b4096.n_failed == 40
    assert a.effective_fits["saturating"].n_points == 7


def _expected_loss(b: int, lr: float, m: float, truth: dict, epochs: int = 20, n_train: int = 50_000,
                   steps_scale: float = 40.0) -> float:
    """The simulated loss at (B, lr, m) before its noise (tests/simulate.py's model, its defaults)."""
    u, u_opt = math.log2(1.0 - m), math.log2(1.0 - truth["momentum"])
    d = math.log2(lr) - u - math.log2(truth["effective_lr"][b])
    s = valley_profile(d) + 0.005 * (u - u_opt) ** 2
    asymptote = truth["floor"] + (truth["initial"] - truth["floor"]) * (1.0 - math.exp(-s))
    rate = math.exp(-s) * b / (b + truth["b_crit"]) / steps_scale
    return asymptote + (truth["initial"] - asymptote) * math.exp(-rate * epochs * math.ceil(n_train / b))


def test_with_momentum_searched_the_value_is_held_at_the_best_trial_and_is_not_optimistic():
    # The pooled 2-D fit: its expectation at (lr*, m*), held at the best trial's where it claims less. Its
    # residual scatter is the shape's misfit across momenta on a real valley (0.13 val_loss on the default
    # digits study), so it cannot tell how far below every trial the value may go: the best trial bounds it.
    # On the shape it assumes the hold costs some pessimism; the best trial alone is optimistic.
    errors, best_errors = [], []
    for seed in range(4):
        table = _sim("saturating", seed, trials_per_batch=16)
        truth = table.meta["truth"]
        for o in analyze(table, seed=seed, n_boot=50).per_batch:
            assert o.fitted and o.fit == "pooled"
            assert o.value == max(o._fit_value, o.best_value)
            errors.append(o.value - _expected_loss(o.batch_size, o.lr, o.momentum, truth))
            best_errors.append(o.best_value - _expected_loss(o.batch_size, o.best_lr, o.best_momentum, truth))
    # 36 optima; one value's error has sd ~0.02 (the trials' noise). Measured: +0.011, the best trial's -0.011
    assert -0.005 < float(np.mean(errors)) < 0.02
    assert float(np.mean(best_errors)) < -0.005


def test_a_lone_quadratic_value_is_held_at_the_best_trial():
    # One batch size with momentum searched: no pooled fit, no smoother, a quadratic alone. Its bottom can lie
    # beyond every trial and overshoot what any run reached; only there is the value held at the best trial's
    held = 0
    for seed in range(4):
        table = simulate_trials("saturating", seed=seed, trials_per_batch=6, batch_sizes=(64,), prune=False)
        o = analyze(table, seed=seed, n_boot=50).per_batch[0]
        assert o.fit in ("1d-lr", "1d-effective", "2d") and o.value >= o.best_value
        assert o.value == max(o._fit_value, o.best_value)
        held += o._fit_value < o.best_value
    assert held > 0


def test_a_valley_too_sparse_to_smooth_holds_lr_between_the_best_trials_neighbours():
    # placed by the shape shared over the batch sizes, which may not be its own: the interval reaches at
    # least to the trials either side of the best one, where lr* of a one-bottomed valley lies
    checked = 0
    for seed in range(3):
        table = simulate_trials("power", seed=seed, trials_per_batch=5, momentum=0.9, prune=False, noise=0.05)
        for o in analyze(table, seed=seed, n_boot=50).per_batch:
            if not o.fitted or o.fit == "smooth":
                continue
            lrs = sorted({r.lr for r in table.records if r.batch_size == o.batch_size and r.state not in FAILED_STATES})
            i = lrs.index(o.best_lr)
            lo, hi = o.lr_interval
            assert i == 0 or lo <= lrs[i - 1] * (1 + 1e-12)
            assert i == len(lrs) - 1 or hi >= lrs[i + 1] * (1 - 1e-12)
            elo, ehi = o.effective_lr_interval  # at momentum 0.9 the effective lr is lr / 0.1
            assert elo <= lo / 0.1 * (1 + 1e-9) and ehi >= hi / 0.1 * (1 - 1e-9)
            checked += 1
    assert checked >= 5



def test_a_valley_too_sparse_to_smooth_reads_its_value_off_the_trials_either_side_of_its_lr():
    # at one momentum, where the shape shared over the batch sizes places the optimum, what a run there
    # reaches is read off the two trials either side (log-linear in log2 lr), never the best trial's value
    # read at another lr (the winner's curse: on the digits grid at 24 trials 0.04 below the seed-mean)
    errors, best_errors, checked = [], [], 0
    for seed in range(3):
        table = simulate_trials("power", seed=seed, trials_per_batch=5, momentum=0.9, prune=False, noise=0.05)
        truth = table.meta["truth"]
        for o in analyze(table, seed=seed, n_boot=50).per_batch:
            if not o.fitted or o.fit == "smooth":
                continue
            done = sorted((r.lr, r.value) for r in table.records
                          if r.batch_size == o.batch_size and r.state == State.COMPLETE)
            x, y = np.log2([d[0] for d in done]), np.log([d[1] for d in done])
            assert o.value == pytest.approx(math.exp(float(np.interp(math.log2(o.lr), x, y))), rel=1e-12)
            assert o.value >= o.best_value * (1.0 - 1e-12)
            errors.append(o.value - _expected_loss(o.batch_size, o.lr, o.momentum, truth))
            best_errors.append(o.best_value - _expected_loss(o.batch_size, o.best_lr, o.best_momentum, truth))
            checked += 1
    assert checked >= 5
    assert float(np.mean(errors)) > float(np.mean(best_errors))

def test_a_batch_size_with_two_completed_trials_is_placed_by_the_shared_valley_shape():
    table = _sim("saturating", 3)
    full = analyze(table).optimum(256)
    done = sorted((r for r in table.records if r.batch_size == 256 and r.state == "COMPLETE"),
                  key=lambda r: abs(math.log2(r.effective_lr / full.effective_lr)))
    two = [done[0], done[-1]] if done[0].effective_lr > full.effective_lr else [done[-1], done[0]]
    records = [r for r in table.records if r.batch_size != 256] + two
    o = analyze(dataclasses.replace(table, records=records)).optimum(256)
    assert o.fitted and o.status.startswith("fitted from 2 completed trials and the valley shape")
    assert o.fit.startswith("pooled") and o.n_complete == 2
    # two trials and the others' curvature put it within an octave of where all its trials put it
    assert abs(math.log2(o.effective_lr / full.effective_lr)) < 1.0


def test_an_optimum_outside_the_sampled_range_is_flagged_and_left_out():
    base = _sim("saturating", 3, momentum=0.9)
    shifted = simulate_trials("saturating", seed=4, momentum=0.9, lr_span=(-0.75, 2.0), batch_sizes=(256,))
    records = [r for r in base.records if r.batch_size != 256]
    records += [dataclasses.replace(r, number=1000 + i) for i, r in enumerate(shifted.records)]
    a = analyze(TrialTable(records))
    o = a.optimum(256)
    assert o.fitted and not o.bracketed
    assert o.status == "fitted, not bracketed (no worse trials at lower lr)"
    assert any(w.startswith("B=256: the optimum is not bracketed") for w in a.warnings)
    assert a.fits["power"].n_points == 8


def test_a_valley_in_plain_lr_is_fitted_in_plain_lr():
    # Adam-like: the momentum (beta1) does not matter, so the plain lr, not lr/(1-m), follows the law
    rng = np.random.default_rng(0)
    records = []
    for b in (32, 64, 128, 256, 512):
        opt = math.log2(1e-3 * (b / 32) ** 0.5)
        for _ in range(40):
            x, m = opt + rng.uniform(-4, 3), 1 - 2 ** rng.uniform(math.log2(0.01), 0)
            s = valley_profile(x - opt)
            value = 0.3 + 2 * (1 - math.exp(-s)) + 0.02 * rng.standard_normal()
            records.append(TrialRecord(number=len(records), batch_size=b, lr=2**x, momentum=m, value=value,
                                       state="COMPLETE"))
    a = analyze(TrialTable(records))
    assert a.basis == "lr"
    assert abs(a.fits["power"].alpha - 0.5) <= 0.05
    for o in a.per_batch:
        assert _octaves(o.lr, 1e-3 * (o.batch_size / 32) ** 0.5) <= 0.25
    r = a.recommend(128)
    assert r.basis == "lr" and _octaves(r.lr, 1e-3 * 2) <= 0.25


def test_a_floor_that_turns_from_effective_lr_to_plain_lr_with_the_batch_size_is_followed():
    # A short run (large B) leaves momentum no time to act as a multiplier on the lr: the valley's floor runs
    # along lr/(1 - m) at B = 32 and along the plain lr at B = 512 (as on digits). Few trials per batch size.
    rng = np.random.default_rng(1)
    u0 = math.log2(0.1)

    def floor(b: int, u: float) -> float:  # log2 lr* at log2(1 - m) = u
        t = math.log2(b / 32) / 4.0
        return math.log2(0.05) + 0.8 * math.log2(b / 32) + (1.0 - t) * (u - u0)

    records = []
    for b in (32, 64, 128, 256, 512):
        for _ in range(8):
            u = rng.uniform(math.log2(0.02), 0.0)
            x = floor(b, u) + rng.uniform(-2.0, 2.0)
            value = 0.3 + 0.05 * (x - floor(b, u)) ** 2 + 0.01 * (u - u0) ** 2 + 0.005 * rng.standard_normal()
            records.append(TrialRecord(number=len(records), batch_size=b, lr=2**x, momentum=1 - 2**u, value=value,
                                       state="COMPLETE"))
    a = analyze(TrialTable(records))
    for o in a.per_batch:
        assert o.fit == "pooled"
        # lr* is on the floor at the momentum the fit chose, whichever way the floor runs at this B
        assert abs(math.log2(o.lr) - floor(o.batch_size, math.log2(1 - o.momentum))) <= 0.3, o.batch_size


# ------------------------------------------------------------------------------------ steps to target


STEPS_SIM = {"curves": True, "epochs": 128, "steps_scale": 260.0, "trials_per_batch": 30}


@pytest.mark.slow
def test_steps_to_target_recovers_b_crit_and_s_min():
    s_min_true = 260.0 * math.log((2.3 - 0.3) / (0.4 - 0.3))  # progress needed to get from 2.3 to 0.4
    for seed in range(3):
        table = _sim("saturating", seed, **STEPS_SIM)
        steps = analyze(table, target=0.4, seed=seed).steps
        assert steps is not None and steps.target == 0.4 and steps.target_rule == "given"
        assert abs(steps.b_crit / table.meta["truth"]["b_crit"] - 1.0) <= 0.2
        assert abs(steps.s_min / s_min_true - 1.0) <= 0.2
        assert steps.e_min == pytest.approx(steps.s_min * steps.b_crit)
        lo, hi = steps.b_crit_interval
        assert lo <= steps.b_crit <= hi
        for p in steps.points:
            assert p.examples == pytest.approx(p.steps * p.batch_size) and 0 < p.n_reached <= p.n_curves
        default = analyze(table, seed=seed).steps  # default target: see analyze()'s docstring
        assert default is not None and default.target_rule.startswith("10% of the way")
        assert 0.3 < default.target < 0.6
        assert abs(default.b_crit / B_NOISE - 1.0) <= 0.2


def test_steps_to_target_needs_curves_and_a_reachable_target():
    a = _analysis("saturating", 0)
    assert a.steps is None and "no learning curves in the table: no steps-to-target fit" in a.warnings
    table = _sim("saturating", 0, **STEPS_SIM)
    hard = analyze(table, target=0.0)
    assert hard.steps is None and any("reach the target 0" in w for w in hard.warnings)
    coarse = analyze(_sim("saturating", 0, curves=True, epochs=20))  # small batches done within epoch 1
    assert coarse.steps is not None and coarse.steps.points[0].upper_bound
    assert any("only an upper bound" in w for w in coarse.warnings)


# --------------------------------------------------------------------------------------- recommend()


def test_recommend_flags_extrapolation_and_batches_above_the_critical_size():
    table = _sim("saturating", 0)
    a = _analysis("saturating", 0)
    inside = a.recommend(48)
    assert not inside.extrapolated and not inside.above_critical
    lo, hi = inside.lr_interval
    assert lo <= inside.lr <= hi and inside.form == "saturating" and inside.basis == "effective"
    truth = table.meta["truth"]["effective_lr"]
    assert _octaves(inside.effective_lr, math.sqrt(truth[32] * truth[64])) <= 0.25
    assert inside.lr == pytest.approx(inside.effective_lr * (1 - inside.momentum))
    measured = a.recommend(64)  # a measured batch size: its own optimum, not the law's
    assert measured.form == "measured" and measured.lr == a.optimum(64).lr
    assert measured.momentum == a.optimum(64).momentum and measured.plateau == a.optimum(64).plateau
    assert any("B=64 was measured" in n for n in measured.notes)

    big = a.recommend(8192)
    assert big.extrapolated and big.above_critical
    assert any("outside the measured range 16..4096" in n for n in big.notes)
    assert any("above the critical batch size" in n for n in big.notes)
    assert "extrapolated" in format_recommendation(big) and "above critical" in format_recommendation(big)
    assert a.recommend(512).above_critical and not a.recommend(512).extrapolated
    small = a.recommend(8)
    assert small.extrapolated and not small.above_critical
    json.dumps(big.to_dict(), allow_nan=False)

    linear = _analysis("power", 0, alpha=1.0).recommend(8192)
    assert linear.extrapolated and not linear.above_critical  # no saturation, no curves: no critical size


def test_recommend_uses_b_crit_from_the_steps_when_b_noise_is_unsupported():
    table = _sim("power", 0, alpha=1.0, b_crit=128.0, **STEPS_SIM)
    a = analyze(table, target=0.4)
    assert a.b_noise is None and a.steps is not None and a.steps.b_crit is not None
    assert a.recommend(1024).above_critical and not a.recommend(64).above_critical


def test_two_batch_sizes_are_enough_but_the_comparison_is_weak():
    table = simulate_trials("saturating", seed=5, batch_sizes=(64, 1024))
    a = analyze(table)
    assert a.criterion == "AIC" and any("only 2 batch sizes" in w for w in a.warnings)
    assert set(a.fits) == set(FORMS)
    assert a.recommend(256).lr > 0


def test_a_surge_is_recognised_with_its_peak_and_recommend_says_lr_falls_beyond_it():
    table = simulate_trials("surge", b_noise=256.0, momentum=0.9, trials_per_batch=16, seed=2,
                            batch_sizes=(16, 32, 64, 128, 256, 512, 1024))
    a = analyze(table)
    assert a.fits_for()[1] == "surge" and a.trend == "peaks"
    lo, hi = a.peak_interval
    assert 256 / 1.3 < a.peak < 256 * 1.3 and lo <= a.peak <= hi
    assert a.b_noise is None  # a peak is no critical batch size
    assert any("peaks at B ~" in w for w in a.warnings)
    assert any("falls with B above its peak" in n for n in a.recommend(2048).notes)
    assert a.recommend(2048).lr < a.recommend(700).lr  # no rising law past the peak
    assert "peaks at B ~" in format_analysis(a)


def test_a_power_law_reports_no_peak():
    a = _analysis("power", 0, alpha=1.0)
    assert a.peak is None and a.trend == "rises" and a.fits_for()[1] != "surge"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_estimates_lie_inside_their_intervals(seed):
    a = analyze(simulate_trials("saturating", momentum=0.9, trials_per_batch=14, seed=seed,
                                batch_sizes=(16, 32, 64, 128, 256, 512, 1024)))
    for o in a.per_batch:
        lo, hi = o.lr_interval
        assert lo <= o.lr <= hi, o
        assert o.plateau[0] <= o.lr <= o.plateau[1]  # equal at the sampled range's edge
        assert o.plateau_low_interval[0] <= o.plateau[0] <= o.plateau_low_interval[1]
        assert o.plateau_high_interval[0] <= o.plateau[1] <= o.plateau_high_interval[1]
    for f in a.fits_for()[0].values():
        if f.note:  # B_noise at the end of the grid: a bound, its interval open
            continue
        for name, (lo, hi) in f.intervals.items():
            value = f.params[name]
            assert lo <= value <= hi, (f.form, name)


def test_recommend_warns_above_the_training_set_and_the_largest_stable_lr():
    a = _analysis("power", 0, alpha=1.0)
    rec = a.recommend(10_000_000)
    assert any("larger than the training set (50000 examples)" in n for n in rec.notes)
    edge = max(o.max_stable_lr for o in a.per_batch if o.max_stable_lr is not None)
    assert rec.lr > edge and any("above the largest lr that stayed stable" in n for n in rec.notes)
    assert not any("stayed stable" in n for n in a.recommend(64).notes)


def test_the_answer_names_the_best_the_fastest_and_the_critical_batch_size():
    table = _sim("power", 0, alpha=1.0, b_crit=128.0, **STEPS_SIM)
    table.records[:] = [dataclasses.replace(r, train_seconds=r.examples_seen / (100.0 * r.batch_size ** 0.5))
                        for r in table.records]  # examples/s grows as sqrt(B)
    a = analyze(table, target=0.4)
    ans = a.answer
    best = min((o for o in a.per_batch if o.fitted), key=lambda o: o.value)
    assert ans.best.batch_size == best.batch_size and ans.best.lr == best.lr and ans.best.plateau == best.plateau
    assert ans.critical == a.steps.b_crit and ans.critical_source == "steps to target"
    assert ans.regimes[16] == "perfect scaling" and ans.regimes[4096] == "maximal data parallelism"
    rate = {o.batch_size: 100.0 * o.batch_size ** 0.5 for o in a.per_batch}
    times = {b: a.steps.predict(b) * b / rate[b] for b in rate if a.optimum(b).fitted}
    order = sorted(times, key=times.__getitem__)
    if times[order[1]] >= SEPARATES * times[order[0]]:
        assert ans.fastest.batch_size == order[0]
    else:  # the target does not separate the batch sizes: no "fastest" is named
        assert ans.fastest is None and "does not separate" in ans.why_not["fastest"]
    lines = format_analysis(a).splitlines()
    assert lines[0] == "Which batch size to use:" and f"B={ans.best.batch_size}" in lines[1]
    assert json.loads(json.dumps(a.to_dict()))["answer"]["best"]["batch_size"] == ans.best.batch_size


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_batch_sizes_near_the_best_are_those_within_one_runs_noise_of_it(direction):
    from bstune.analysis.answer import answer
    from bstune.analysis.results import BatchOptimum
    from bstune.report.text import answer_lines

    sign = 1.0 if direction == "minimize" else -1.0

    def opt(b: int, value: float, noise: float) -> BatchOptimum:
        return BatchOptimum(batch_size=b, n_complete=20, n_pruned=0, n_diverged=0, n_failed=0, best_lr=0.1,
                            best_momentum=0.9, best_value=value, status="fitted", lr=0.1, momentum=0.9,
                            value=value, noise=noise)

    # one run's noise 0.01 at the best (value 0.06): 0.068 is as good as far as the trials can tell (13% worse:
    # far beyond the old 1%), 0.075 is not
    per_batch = [opt(16, 0.06, 0.01), opt(32, 0.06 + sign * 0.008, 0.02), opt(64, 0.06 + sign * 0.015, 0.01)]
    ans = answer(per_batch, None, {}, sign, None, None)
    assert ans.best.batch_size == 16 and ans.best.noise == 0.01 and ans.best.near == [32]
    a = dataclasses.replace(_analysis("power", 0, alpha=1.0), answer=ans, direction=direction)
    assert "within one run's seed noise (0.01) of it: B=32" in answer_lines(a)[0]


# -------------------------------------------------------------------------------------------- output


def test_to_dict_is_json_and_format_table_reads_well():
    for a in (_analysis("power", 0, alpha=1.0), analyze(_sim("saturating", 0, **STEPS_SIM), target=0.4)):
        d = json.loads(json.dumps(a.to_dict(), allow_nan=False))
        assert len(d["per_batch"]) == 9 and set(d["fits"]) == set(FORMS) == set(d["effective_fits"])
        assert d["effective_preferred"] == a.effective_preferred
        first = d["per_batch"][0]
        assert first["lr_interval"][0] <= first["lr"] <= first["lr_interval"][1]
        text = format_analysis(a)
        for b in (16, 256, 4096):
            assert f"\n{b:>6} " in text
        assert "<- preferred" in text and "alpha=" in text and "B_noise" in text
    assert d["steps"]["b_crit"] == pytest.approx(a.steps.b_crit) and "Steps to target" in text
    assert d["b_noise"] == pytest.approx(a.b_noise) and "B_noise of the saturating fit" in text
    # one critical batch size, the answer's, wherever it is printed
    assert f"Critical batch size ~ {a.answer.critical:.0f}" in text


# ----------------------------------------------------------------------------------------- bad input


def _records(sizes: dict[int, int]) -> list[TrialRecord]:
    out: list[TrialRecord] = []
    for b, n in sizes.items():
        out += _valley_records(b, [0.01 * 2**i for i in range(n)], opt=0.04, start=len(out))
    return out


@pytest.mark.parametrize(("table", "kwargs", "message"), [
    (TrialTable([]), {}, "the trial table is empty"),
    (TrialTable(_records({32: 6, 64: 1})), {},
     "need at least 2 batch sizes that can be fitted (>= 4 completed trials each, or >= 2 where the other batch "
     "sizes show the valley's shape); found B=32: 6, B=64: 1; run more trials"),
    (TrialTable(_records({32: 3})), {}, "the trials cover one batch size (B=32) with 3 completed trial(s); "
     "its optimum needs >= 4: run more trials"),
    (TrialTable([dataclasses.replace(r, state=State.DIVERGED, value=None) for r in _records({32: 5, 64: 5})]), {},
     "none of the 10 trials completed with a finite value, so there is nothing to fit"),
    (TrialTable(_records({32: 3, 64: 3})), {"min_trials": 3}, None),
    (TrialTable(_records({32: 5, 64: 5})), {"n_boot": 5}, "n_boot must be an integer >= 20"),
    (TrialTable(_records({32: 5, 64: 5})), {"min_trials": 2}, "min_trials must be an integer >= 3"),
    (TrialTable(_records({32: 5, 64: 5})), {"target": float("nan")}, "target must be a finite number"),
    ("trials.csv", {}, "analyze() needs a TrialTable, got str"),
])
def test_bad_arguments_raise_one_clear_line(table, kwargs, message):
    if message is None:
        assert analyze(table, **kwargs).per_batch[0].fitted
        return
    with pytest.raises(BstuneError) as err:
        analyze(table, **kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_one_batch_size_gives_its_own_optimum_and_no_law():
    a = analyze(TrialTable(_records({32: 12})))
    assert a.per_batch[0].fitted and not a.fits and any("cover one batch size (B=32)" in w for w in a.warnings)
    rec = a.recommend(32)
    assert rec.form == "measured" and rec.lr == a.optimum(32).lr
    with pytest.raises(BstuneError, match="no fit of lr"):
        a.recommend(64)
    assert a.answer.best.batch_size == 32


@pytest.mark.parametrize(("field", "value", "message"), [
    ("lr", 0.0, "trial 3: lr must be > 0, got 0.0"),
    ("lr", -0.1, "trial 3: lr must be > 0, got -0.1"),
    ("batch_size", 0, "trial 3: batch_size must be a positive integer, got 0"),
    ("momentum", 1.0, "trial 3: momentum must lie in [0, 1), got 1.0"),
])
def test_bad_trials_raise_one_clear_line(field, value, message):
    records = _records({32: 5, 64: 5})
    records[3] = dataclasses.replace(records[3], **{field: value})
    with pytest.raises(BstuneError) as err:
        analyze(TrialTable(records))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_calls_to_recommend_and_simulate():
    a = _analysis("saturating", 0)
    for bad in (0, -8, 2.5, True):
        with pytest.raises(BstuneError, match="batch_size must be a positive integer"):
            a.recommend(bad)
    with pytest.raises(BstuneError, match="batch size 48 was not measured"):
        a.optimum(48)
    with pytest.raises(BstuneError, match="law must be one of power, saturating"):
        simulate_trials("cubic")
    with pytest.raises(BstuneError, match="trials_per_batch must be >= 1"):
        simulate_trials("power", trials_per_batch=0)
