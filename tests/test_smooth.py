"""bstune.analysis.smooth: one batch size's valley smoothed on its own (no shape assumed), on seeded tables."""

from __future__ import annotations

import math

import numpy as np

from bstune.analysis import analyze
from bstune.analysis.smooth import smooth_valley
from bstune.trials import State, TrialRecord, TrialTable


def _cliff_valley(x: np.ndarray) -> np.ndarray:
    """A real valley's shape at a large batch size: a long slow slope on the left, a cliff half an octave
    right of the optimum (at log2 lr = -4), flat at chance level beyond it."""
    left = 0.06 * (1.0 + 0.35 * np.maximum(-4.0 - x, 0.0) ** 1.5)
    right = np.where(x > -4.0, 0.06 * np.exp(4.0 * (x + 4.0)), left)
    return np.minimum(np.where(x > -4.0, right, left), 2.3)


def _table(noise: float, seed: int, n: int = 24) -> TrialTable:
    rng = np.random.default_rng(seed)
    records = []
    for b in (32, 64, 128, 256):
        shift = math.log2(b / 32) * 0.5  # lr* = 2^-4 at B = 32, half an octave more per doubling
        x = rng.uniform(-10.0, 3.0, size=n)
        y = _cliff_valley(x - shift) * np.exp(noise * rng.standard_normal(n))
        for xi, yi in zip(x, y, strict=True):
            diverged = xi - shift > -1.0
            records.append(TrialRecord(number=len(records), batch_size=b, lr=float(2.0**xi), momentum=0.9,
                                       value=None if diverged else float(yi),
                                       state=State.DIVERGED if diverged else State.COMPLETE))
    return TrialTable(records)


def test_a_lopsided_valley_is_placed_near_its_bottom_not_pulled_towards_its_long_side():
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(-10.0, -1.5, size=40))
    y = _cliff_valley(x) * np.exp(0.03 * rng.standard_normal(len(x)))
    v = smooth_valley(x, y, np.array([-1.0, 0.0]), np.ones((1, len(x))), np.ones((1, 2)))
    assert v is not None and v.kind == "smooth"
    assert abs(float(v.log2_lr[0]) + 4.0) <= 0.5
    # the value is the smoothed expectation at the optimum: above the floor (smoothing reaches over the cliff
    # next to it), never the luckiest trial's
    assert 0.06 <= v.value <= 0.06 * 1.3 and v.value > y.min()
    lo, hi = v.plateau[0]
    assert lo <= v.log2_lr[0] <= hi and hi < -3.0  # the plateau stops before the cliff


def test_too_few_trials_in_the_valley_are_not_smoothed():
    x = np.array([-10.0, -9.0, -4.0, -3.5, 0.0])
    y = _cliff_valley(x)
    assert smooth_valley(x, y, np.zeros(0), np.ones((1, 5)), np.ones((1, 0))) is None


def test_each_batch_size_is_smoothed_with_a_bootstrap_that_refits_and_an_interval_holding_its_point():
    a = analyze(_table(0.05, seed=1, n=40), seed=1, n_boot=100)
    held = 0
    for o in a.per_batch:
        assert o.fit == "smooth", o
        lo, hi = o.lr_interval
        assert lo <= o.lr <= hi
        assert o.plateau[0] <= o.lr <= o.plateau[1]
        truth = -4.0 + 0.5 * math.log2(o.batch_size / 32)
        held += math.log2(lo) - 1e-9 <= truth <= math.log2(hi) + 1e-9
        assert o.value == o._fit_value  # the fitted expectation, never the best trial's value
    # a bottom right next to a cliff is pulled towards the long side (the smoother reaches over the cliff; here
    # by 1.1 octave at B = 256, out of its interval): a known weakness, docs/analysis.md
    assert held >= 3


def test_the_near_optimal_set_grows_with_the_noise_of_one_run_and_the_plateau_holds_it():
    rng = np.random.default_rng(2)
    x = np.sort(rng.uniform(-10.0, -1.5, size=40))
    z = rng.standard_normal(len(x))
    counts = np.ones((51, len(x)))
    counts[1:] = rng.multinomial(len(x), np.full(len(x), 1.0 / len(x)), size=50)

    def fit(noise: float):
        y = _cliff_valley(x) * np.exp(noise * z)
        v = smooth_valley(x, y, np.array([-1.0]), counts, np.ones((51, 1)))
        assert v is not None and v.near is not None
        # the plateau: the data's near-optimal set, widened to where a quarter of the bootstrap's sets reach
        assert v.plateau[0, 0] <= v.near[0, 0] and v.plateau[0, 1] >= v.near[0, 1]
        assert v.plateau[0, 0] <= v.log2_lr[0] <= v.plateau[0, 1]
        return float(v.near[0, 1] - v.near[0, 0])

    assert fit(0.12) > fit(0.02) + 0.2


def test_the_value_at_the_smoothed_minimum_has_the_smoothers_own_bias_taken_off():
    # A flat floor two octaves wide under 20% noise (one run's, as on the digits grid): the smoothed curve's
    # minimum is where its noise ran low, a winner's curse; the residual bootstrap measures it and takes it
    # off. Measured over these 100 valleys (log value - truth at the recommended lr): -0.113 before, -0.076
    # after (se 0.011); the rest is what the refits of a smoothed (already flatter) curve cannot see.
    errors, before, biases = [], [], []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        x = rng.uniform(-10.0, 2.0, 24)
        truth = math.log(0.05) + 0.08 * np.maximum(np.abs(x + 4.0) - 1.0, 0.0) ** 2
        v = smooth_valley(x, np.exp(truth + 0.2 * rng.standard_normal(24)), np.zeros(0), np.ones((1, 24)),
                          np.ones((1, 0)))
        assert v is not None
        at = math.log(0.05) + 0.08 * max(abs(float(v.log2_lr[0]) + 4.0) - 1.0, 0.0) ** 2
        errors.append(math.log(v.value) - at)
        before.append(math.log(v.value) + v.bias - at)
        biases.append(v.bias)
    assert float(np.mean(biases)) < 0.0
    assert float(np.mean(before)) < -0.09  # the uncorrected minimum: optimistic by about half the noise
    assert abs(float(np.mean(errors))) < 0.8 * abs(float(np.mean(before)))
