"""Synthetic trial tables drawn from a known law, to test and benchmark the analysis.

The law is on the *effective* learning rate lr/(1 - m), the quantity that SGD with momentum responds to
(Smith & Le 2018, Shallue et al. 2018):

- ``"power"``:      eff*(B) = lr_max * (B / B_largest) ** alpha   (lr_max: the optimum at the largest B)
- ``"saturating"``: eff*(B) = lr_max / (1 + b_noise / B)           (McCandlish et al. 2018)
- ``"surge"``:      eff*(B) = lr_max / (0.5 (sqrt(b_noise / B) + sqrt(B / b_noise)))   (Li et al. 2024: Adam's
  optimum rises, peaks at B = b_noise and falls)

The best momentum is ``momentum_opt`` at every batch size, so the plain optimum lr*(B) = eff*(B) (1 - m*)
follows the same law, shifted by a constant. ``table.meta["truth"]`` holds the true optima.

Each trial draws log2 lr uniformly over ``lr_span`` octaves around the true plain optimum (the range moved by
up to ``range_jitter`` octaves per batch size, so the truth is not always at the same place in it) and
log2(1 - m) uniformly over [log2 0.01, 0], i.e. m in [0, 0.99). Its loss is a valley in the effective lr:
with d = log2(eff / eff*) and v = log2(1 - m) - log2(1 - m*),

    s = 0.01 (e^(1.5 d) - 1 - 1.5 d) + 0.01 d^2  +  0.005 v^2          (``valley_profile`` is the d part)
    asymptote = floor + (initial - floor) * (1 - exp(-s))

flat within the noise for about an octave either side of the optimum and lopsided, as the valley of a
training run is (the dense digits grid of benchmarks/SEARCH.md): a long, slow slope towards small lr (a run
that learns too slowly) and a steep wall towards large lr (a run at the edge of stability). Trials with d
above ``diverge_at`` (give or take a quarter octave) diverge. The learning curve decays towards the asymptote
with a per-step rate exp(-s) * B / (B + b_crit) / steps_scale, so at the optimum the steps to reach any loss
follow S(B) = S_min (1 + b_crit / B) exactly (before the per-epoch noise and the epoch granularity).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bstune.errors import BstuneError
from bstune.trials import CSV_COLUMNS, EpochPoint, TrialRecord, TrialTable

LAWS = ("power", "saturating", "surge")
DEFAULT_BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

FLOOR = 0.3  # the best loss the simulated model reaches
INITIAL = 2.3  # the loss before training (ln 10: ten classes)
_MOMENTUM_CURVATURE = 0.005
_LOG2_ONE_MINUS_M_RANGE = (math.log2(0.01), 0.0)


def valley_profile(d: Any) -> Any:
    """s(d): how far above the floor a run ends, d octaves of lr from the optimum (see the module doc)."""
    return 0.01 * (np.exp(1.5 * d) - 1.0 - 1.5 * d) + 0.01 * d**2


def true_effective_lr(law: str, batch_size: float, *, alpha: float = 1.0, b_noise: float = 256.0,
                      lr_max: float = 1.0, batch_largest: float = 4096) -> float:
    """The optimum effective lr lr/(1 - m) at ``batch_size`` under ``law``."""
    if law == "power":
        return lr_max * (batch_size / batch_largest) ** alpha
    if law == "saturating":
        return lr_max / (1.0 + b_noise / batch_size)
    if law == "surge":
        return lr_max / (0.5 * (math.sqrt(b_noise / batch_size) + math.sqrt(batch_size / b_noise)))
    raise BstuneError(f"law must be one of {', '.join(LAWS)}, got {law!r}")


def simulate_trials(
    law: str,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    trials_per_batch: int = 40,
    alpha: float = 1.0,
    b_noise: float = 256.0,
    lr_max: float = 1.0,
    noise: float = 0.02,
    seed: int = 0,
    momentum: float | None = None,
    momentum_opt: float = 0.9,
    lr_span: tuple[float, float] = (4.0, 3.0),
    range_jitter: float = 0.5,
    diverge_at: float = 2.0,
    prune: bool = True,
    curves: bool = False,
    epochs: int = 20,
    n_train: int = 50_000,
    b_crit: float | None = None,
    steps_scale: float = 40.0,
    direction: str = "minimize",
    oom_above: int | None = None,
) -> TrialTable:
    """A table of ``trials_per_batch`` random trials per batch size from a known law (see the module doc).

    ``momentum``: a fixed momentum for every trial (None: searched). ``noise``: standard deviation of the
    loss noise. ``prune``: after 5 trials of a batch size, half the trials worse than the median so far are
    PRUNED a quarter of the way through (their value is the loss then). ``curves``: attach per-epoch curves
    with optimizer_steps = epoch * ceil(n_train / B). ``b_crit``: the critical batch size of the steps
    model (default: b_noise). ``direction="maximize"`` reports an accuracy-like 0.98 - 0.4 (loss - floor).
    ``oom_above``: batch sizes above this run out of memory (state OOM).
    """
    if law not in LAWS:
        raise BstuneError(f"law must be one of {', '.join(LAWS)}, got {law!r}")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise BstuneError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
    if trials_per_batch < 1:
        raise BstuneError(f"trials_per_batch must be >= 1, got {trials_per_batch}")
    for name, v in (("b_noise", b_noise), ("lr_max", lr_max), ("steps_scale", steps_scale)):
        if not v > 0:
            raise BstuneError(f"{name} must be > 0, got {v}")
    if not noise >= 0:
        raise BstuneError(f"noise must be >= 0, got {noise}")
    if momentum is not None and not 0 <= momentum < 1:
        raise BstuneError(f"momentum must lie in [0, 1) or be None (searched), got {momentum}")
    if not 0 <= momentum_opt < 1:
        raise BstuneError(f"momentum_opt must lie in [0, 1), got {momentum_opt}")
    if epochs < 1 or n_train < 1:
        raise BstuneError(f"epochs and n_train must be >= 1, got {epochs} and {n_train}")
    if direction not in ("minimize", "maximize"):
        raise BstuneError(f"direction must be minimize or maximize, got {direction!r}")
    b_crit = b_noise if b_crit is None else b_crit

    rng = np.random.default_rng(seed)
    largest = max(sizes)
    u_opt = math.log2(1.0 - momentum_opt)
    records: list[TrialRecord] = []
    truth_eff: dict[int, float] = {}
    truth_lr: dict[int, float] = {}
    epoch_idx = np.arange(1, epochs + 1)
    for b in sorted(set(sizes)):
        eff_star = true_effective_lr(law, b, alpha=alpha, b_noise=b_noise, lr_max=lr_max,
                                     batch_largest=largest)
        m_star = momentum_opt if momentum is None else momentum
        truth_eff[b] = eff_star
        truth_lr[b] = eff_star * (1.0 - m_star)
        n = trials_per_batch
        if momentum is None:
            u = rng.uniform(*_LOG2_ONE_MINUS_M_RANGE, size=n)
        else:
            u = np.full(n, math.log2(1.0 - momentum))
        # the plain optimum (at the best momentum, or the fixed one), moved at random within the jitter
        centre = math.log2(eff_star) + (u_opt if momentum is None else u[0])
        centre += rng.uniform(-1, 1) * range_jitter
        x = rng.uniform(centre - lr_span[0], centre + lr_span[1], size=n)
        d = x - u - math.log2(eff_star)
        s = valley_profile(d) + _MOMENTUM_CURVATURE * (u - u_opt) ** 2
        asymptote = FLOOR + (INITIAL - FLOOR) * (1.0 - np.exp(-s))
        steps_per_epoch = math.ceil(n_train / b)
        rate = np.exp(-s) * b / (b + b_crit) / steps_scale
        progress = rate[:, None] * (epoch_idx * steps_per_epoch)[None, :]
        clean = asymptote[:, None] + (INITIAL - asymptote[:, None]) * np.exp(-progress)
        loss = clean + noise * rng.standard_normal(clean.shape)
        diverged = d > diverge_at + 0.25 * rng.standard_normal(n)
        prune_draw = rng.random(n)
        gns = b_noise * np.exp(0.2 * rng.standard_normal(n)) if law == "saturating" else None

        finals: list[float] = []
        for i in range(n):
            lr = float(2.0 ** x[i])
            m = float(1.0 - 2.0 ** u[i]) if momentum is None else float(momentum)
            state, last = "COMPLETE", epochs
            if oom_above is not None and b > oom_above:
                state, last = "OOM", 0
            elif diverged[i]:
                state, last = "DIVERGED", 0
            elif prune and len(finals) >= 5 and clean[i, -1] > np.median(finals) and prune_draw[i] < 0.5:
                state, last = "PRUNED", max(1, epochs // 4)
            if state == "COMPLETE":
                finals.append(float(clean[i, -1]))
            values = loss[i, :last] if direction == "minimize" else 0.98 - 0.4 * (loss[i, :last] - FLOOR)
            curve: tuple[EpochPoint, ...] = ()
            if curves:
                curve = tuple(
                    EpochPoint(epoch=e + 1, value=float(values[e]), optimizer_steps=(e + 1) * steps_per_epoch,
                               examples_seen=(e + 1) * steps_per_epoch * b)
                    for e in range(last)
                )
            records.append(TrialRecord(
                number=len(records), batch_size=b, lr=lr, momentum=m,
                value=float(values[-1]) if last else None, state=state, curve=curve,
                examples_seen=last * steps_per_epoch * b,
                grad_noise_scale=None if gns is None else float(gns[i]),
                reason="CUDA out of memory" if state == "OOM" else "",
            ))

    truth = {
        "law": law, "alpha": alpha if law == "power" else None,
        "b_noise": b_noise if law in ("saturating", "surge") else None,
        "lr_max": lr_max, "momentum": momentum_opt if momentum is None else momentum, "b_crit": b_crit,
        "steps_scale": steps_scale, "floor": FLOOR, "initial": INITIAL,
        "effective_lr": truth_eff, "lr": truth_lr,
    }
    metric = "val_loss" if direction == "minimize" else "val_accuracy"
    return TrialTable(records, direction=direction, metric=metric, n_train=n_train,
                      study_name=f"simulated-{law}", meta={"truth": truth})


def write_csv(table: TrialTable, path: str | Path) -> None:
    """One row per trial epoch (or one per trial without a curve), in the columns `bstune.trials.from_csv` reads."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in table.records:
            base = [r.number, r.batch_size, r.lr, r.momentum, "" if r.value is None else r.value, r.state]
            if not r.curve:
                w.writerow(base + ["", "", "", r.examples_seen or ""])
            for p in r.curve:
                w.writerow(base + [p.epoch, p.value, _blank(p.optimizer_steps), _blank(p.examples_seen)])


def _blank(v: Any) -> Any:
    return "" if v is None else v
