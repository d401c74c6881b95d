"""How bstune's answer holds on real trials: studies drawn from the dense grids of real_grids.py, each read by
the analysis ``bstune analyze --csv`` runs, scored against the grid's multi-seed reference.

    python benchmarks/real_coverage.py [--grids digits-sgd] [--seeds 4-7] [--replicates 100]
                                       [--trials 8,16,24,27] [--cells all,16-256] [--out FILE]

A study: one training seed s; at each of its batch sizes, n lrs drawn at random from the grid's 27 lrs
without replacement (27: the seed's whole grid; one seed cannot give more distinct trials, and a repeat at
one seed is the same run again); its completed and diverged runs form the trial table. The reference for
that study comes from the grid's other seeds (never s): per batch size the seed-mean val_loss over the lr
grid (a diverged run counts as missing where at least half the seeds completed that lr, else the lr is a
wall at the worst completed val_loss of its batch size), its minimum refined by the parabola through the
best grid point and its two neighbours (in log2 lr); the reference's own 95% interval from a bootstrap over
those seeds. alpha's reference: the least-squares line of the reference log2 lr* on log2 B over the study's
batch sizes. An interval "holds" the reference when the reference point lies inside it; "meets" counts one
that overlaps the reference's own interval (the reference's uncertainty counted). Seeds 0-3 develop, 4-7
report.

A grid with several momenta (digits-momentum) is read as a study that searches momentum: its n trials per
batch size are (lr, momentum) pairs drawn from the seed's whole grid, and the reference per batch size is the
momentum m* whose seed-mean curve is lowest, lr* its vertex (the bootstrap picks each replicate's own m*).
Scored (``MomentumTally``): the lr interval against lr* at m* and against lr* at the study's own m; the
effective lr against lr*/(1 - m*); whether the recommended m is m*, or its curve's best lies within one seed
sd (at the reference optimum) of m*'s; the value reported, and the fit's value before its clip at the best
trial, against the reference at the recommended (lr, m); how often the value is the best trial's.

    python benchmarks/real_coverage.py --summary --grids digits-adam   # what a grid shows, all seeds
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_grids import GRIDS, load  # noqa: E402
from bstune.analysis import analyze  # noqa: E402
from bstune.analysis.laws import fit_forms  # noqa: E402
from bstune.errors import BstuneError  # noqa: E402
from bstune.trials import State, TrialRecord, TrialTable  # noqa: E402

CELLS = {"all": None, "16-256": (16, 32, 64, 128, 256)}  # batch sizes kept (None: the grid's all)
REF_BOOT = 200


@dataclass
class Reference:
    """The multi-seed reference of one grid, leaving one seed out. With several momenta, ``curve``, ``lr`` and
    ``boot`` are at the best momentum m* of each batch size (the one whose seed-mean curve is lowest)."""

    log2_lrs: np.ndarray
    curve: dict[int, np.ndarray]  # per B: seed-mean val_loss over log2_lrs
    lr: dict[int, float]  # log2 lr* per B
    lr_interval: dict[int, tuple[float, float]]
    boot: dict[int, np.ndarray]  # per B: log2 lr* of each seed-bootstrap replicate (at its own best momentum)
    momentum: dict[int, float] = field(default_factory=dict)  # m* per B
    curves: dict[tuple[int, float], np.ndarray] = field(default_factory=dict)  # per (B, m): seed-mean curve
    sd: dict[int, float] = field(default_factory=dict)  # per B: sd over seeds at the best grid point


def _vertex(x: np.ndarray, y: np.ndarray) -> float:
    """log2 lr of the minimum of y, refined by the parabola through it and its neighbours."""
    i = int(np.argmin(y))
    if 0 < i < len(y) - 1:
        y0, y1, y2 = y[i - 1], y[i], y[i + 1]
        den = y0 - 2 * y1 + y2
        if den > 0:
            return float(x[i] + 0.5 * (y0 - y2) / den * (x[1] - x[0]))
    return float(x[i])


def _seed_mean(mat: np.ndarray) -> np.ndarray:
    """The seed-mean val_loss per lr (rows: seeds): the mean of the seeds that completed where at least half
    did, else the worst completed val_loss of the batch size (a wall)."""
    done = np.isfinite(mat)
    with np.errstate(invalid="ignore"):
        mean = np.nansum(np.where(done, mat, 0.0), axis=0) / np.maximum(done.sum(axis=0), 1)
    return np.where(done.sum(axis=0) * 2 >= len(mat), mean, np.nanmax(mat))


def reference(rows: Sequence[dict], seeds: Sequence[int], rng: np.random.Generator) -> Reference:
    """The reference from the runs of ``seeds`` (see the module doc)."""
    xs = np.unique(np.round(np.log2([r["lr"] for r in rows]), 6))
    sizes = sorted({r["batch_size"] for r in rows})
    momenta = sorted({r["momentum"] for r in rows})
    ref = Reference(xs, {}, {}, {}, {})
    for b in sizes:
        mats = np.full((len(momenta), len(seeds), len(xs)), np.nan)
        for r in rows:
            if r["batch_size"] == b and r["seed"] in seeds:
                mats[momenta.index(r["momentum"]), list(seeds).index(r["seed"]),
                     np.searchsorted(xs, round(math.log2(r["lr"]), 6))] = r["value"]
        curves = [_seed_mean(mat) for mat in mats]
        k = int(np.argmin([c.min() for c in curves]))
        ref.momentum[b], ref.curve[b], ref.lr[b] = momenta[k], curves[k], _vertex(xs, curves[k])
        ref.curves.update({(b, m): c for m, c in zip(momenta, curves, strict=True)})
        at = mats[k][:, int(np.argmin(curves[k]))]
        ref.sd[b] = float(np.std(at[np.isfinite(at)], ddof=1)) if np.isfinite(at).sum() > 1 else math.nan
        picks = rng.integers(0, len(seeds), size=(REF_BOOT, len(seeds)))
        ref.boot[b] = np.array([_boot_vertex(xs, mats[:, p]) for p in picks])
        ref.lr_interval[b] = (float(np.quantile(ref.boot[b], 0.025)), float(np.quantile(ref.boot[b], 0.975)))
    return ref


def _boot_vertex(xs: np.ndarray, mats: np.ndarray) -> float:
    """log2 lr* of one seed-bootstrap replicate (mats: momenta x seeds x lrs), at its own best momentum."""
    curves = [_seed_mean(mat) for mat in mats]
    return _vertex(xs, curves[int(np.argmin([c.min() for c in curves]))])


def ref_value(ref: Reference, b: int, log2_lr: float, momentum: float | None = None) -> float:
    """The reference val_loss at (lr, momentum) (linear in log2 lr; default: at m*)."""
    curve = ref.curve[b] if momentum is None else ref.curves[(b, momentum)]
    return float(np.interp(log2_lr, ref.log2_lrs, curve))


def draw_study(rows: Sequence[dict], seed: int, sizes: Sequence[int], n: int,
               rng: np.random.Generator) -> TrialTable:
    """One study's trial table (see the module doc)."""
    records = []
    for b in sizes:
        runs = [r for r in rows if r["batch_size"] == b and r["seed"] == seed]
        k = len(runs)
        picks = rng.permutation(k)[:n]
        for i in picks:
            r = runs[int(i)]
            ok = r["state"] == "COMPLETE" and math.isfinite(r["value"])
            records.append(TrialRecord(number=len(records), batch_size=b, lr=r["lr"], momentum=r["momentum"],
                                       value=r["value"] if ok else None,
                                       state=State.COMPLETE if ok else State.DIVERGED))
    return TrialTable(records)


@dataclass
class Tally:
    """What the studies of one cell found."""

    lr_hold: list[bool] = field(default_factory=list)
    lr_hold_bracketed: list[bool] = field(default_factory=list)  # over the optima the analysis calls bracketed
    lr_meet: list[bool] = field(default_factory=list)
    lr_width: list[float] = field(default_factory=list)
    lr_err: list[float] = field(default_factory=list)
    outside: list[bool] = field(default_factory=list)
    alpha_hold: list[bool] = field(default_factory=list)
    alpha_meet: list[bool] = field(default_factory=list)
    alpha_err: list[float] = field(default_factory=list)
    alpha_width: list[float] = field(default_factory=list)
    plateau_hold: list[bool] = field(default_factory=list)
    plateau_wide: list[bool] = field(default_factory=list)
    plateau_width: list[float] = field(default_factory=list)
    value_err: list[float] = field(default_factory=list)
    best_value_err: list[float] = field(default_factory=list)
    value_at: list[tuple[int, int]] = field(default_factory=list)  # each value_err's (training seed, batch size)
    named: list[tuple[int, int]] = field(default_factory=list)  # (training seed, named batch size)
    failed: int = 0


def score(t: Tally, a, ref: Reference, ref_alpha: tuple[float, float, float], seed: int) -> None:
    """Add one study's analysis ``a`` to the tally, against the reference."""
    for o in a.per_batch:
        if not o.fitted or o.lr_interval is None:
            continue
        b, lo, hi, pt = o.batch_size, math.log2(o.lr_interval[0]), math.log2(o.lr_interval[1]), math.log2(o.lr)
        r, (rlo, rhi) = ref.lr[b], ref.lr_interval[b]
        t.lr_hold.append(lo <= r <= hi)
        if o.bracketed:
            t.lr_hold_bracketed.append(lo <= r <= hi)
        t.lr_meet.append(lo <= rhi and rlo <= hi)
        t.lr_width.append(hi - lo)
        t.lr_err.append(pt - r)
        t.outside.append(not lo <= pt <= hi)
        best = float(ref.curve[b].min())
        if o.plateau is not None:
            edge = (float(ref.log2_lrs[0]), float(ref.log2_lrs[-1]))  # an open end reaches the grid's edge
            p0 = max(math.log2(o.plateau[0]), edge[0]) if o.plateau[0] > 0 else edge[0]
            p1 = min(math.log2(o.plateau[1]), edge[1]) if math.isfinite(o.plateau[1]) else edge[1]
            t.plateau_hold.append(p0 - 1e-9 <= r <= p1 + 1e-9)
            span = np.linspace(p0, p1, 25)
            t.plateau_wide.append(bool(max(ref_value(ref, b, s) for s in span) >= 1.5 * best))
            t.plateau_width.append(p1 - p0)
        if o.value is not None:
            t.value_err.append(float(o.value) - ref_value(ref, b, pt))
            t.value_at.append((seed, b))
            t.best_value_err.append(float(o.best_value) - ref_value(ref, b, math.log2(o.best_lr)))
    power = a.fits.get("power")
    if power is not None:
        alo, ahi = power.intervals["alpha"]
        t.alpha_hold.append(alo <= ref_alpha[0] <= ahi)
        t.alpha_meet.append(alo <= ref_alpha[2] and ref_alpha[1] <= ahi)
        t.alpha_err.append(power.params["alpha"] - ref_alpha[0])
        t.alpha_width.append(ahi - alo)
    if a.answer is not None and a.answer.best is not None:
        t.named.append((seed, a.answer.best.batch_size))


@dataclass
class MomentumTally:
    """What the studies of one cell found where momentum is searched (lr and momentum drawn together)."""

    lr_hold: list[bool] = field(default_factory=list)  # the lr interval holds the reference lr* (at its m*)
    lr_hold_own: list[bool] = field(default_factory=list)  # ... the reference lr* at the study's own m
    eff_hold: list[bool] = field(default_factory=list)  # the effective-lr interval holds lr*/(1 - m*)
    lr_width: list[float] = field(default_factory=list)
    lr_err: list[float] = field(default_factory=list)  # octaves from the reference lr* at m*
    m_best: list[bool] = field(default_factory=list)  # the recommended momentum is the reference's m*
    m_near: list[bool] = field(default_factory=list)  # ... or its curve's best is within one seed sd of m*'s
    m_hold: list[bool] = field(default_factory=list)  # the momentum interval holds m*
    plateau_hold: list[bool] = field(default_factory=list)  # the plateau holds lr* at the study's m
    value_err: list[float] = field(default_factory=list)  # value reported - reference at (lr, m) recommended
    on_wall: list[bool] = field(default_factory=list)  # the reference there is >= 1.5x its best at that B
    fit_err: list[float] = field(default_factory=list)  # the same for the fit's value before its clip
    clipped: list[bool] = field(default_factory=list)  # the value reported is the best trial's
    best_other_m: list[bool] = field(default_factory=list)  # the best trial ran at another momentum than m
    best_value_err: list[float] = field(default_factory=list)
    named: list[tuple[int, int]] = field(default_factory=list)
    failed: int = 0


def score_momentum(t: MomentumTally, a, ref: Reference, seed: int) -> None:
    """Add one momentum-searched study's analysis ``a`` to the tally, against the reference."""
    momenta = sorted({m for _, m in ref.curves})
    for o in a.per_batch:
        if not o.fitted or o.lr_interval is None or o.momentum is None:
            continue
        b, lo, hi, pt = o.batch_size, math.log2(o.lr_interval[0]), math.log2(o.lr_interval[1]), math.log2(o.lr)
        m = _nearest(momenta, o.momentum)
        own = _vertex(ref.log2_lrs, ref.curves[(b, m)])
        t.lr_hold.append(lo <= ref.lr[b] <= hi)
        t.lr_hold_own.append(lo <= own <= hi)
        t.lr_width.append(hi - lo)
        t.lr_err.append(pt - ref.lr[b])
        eff = ref.lr[b] - math.log2(1.0 - ref.momentum[b])
        t.eff_hold.append(math.log2(o.effective_lr_interval[0]) <= eff <= math.log2(o.effective_lr_interval[1]))
        t.m_best.append(m == ref.momentum[b])
        t.m_near.append(float(ref.curves[(b, m)].min()) - float(ref.curve[b].min()) <= ref.sd[b])
        if o.momentum_interval is not None:
            t.m_hold.append(o.momentum_interval[0] - 1e-9 <= ref.momentum[b] <= o.momentum_interval[1] + 1e-9)
        if o.plateau is not None:
            p0 = math.log2(o.plateau[0]) if o.plateau[0] > 0 else -math.inf
            t.plateau_hold.append(p0 - 1e-9 <= own <= math.log2(o.plateau[1]) + 1e-9)
        if o.value is not None:
            here = ref_value(ref, b, pt, m)
            t.value_err.append(float(o.value) - here)
            t.on_wall.append(here >= 1.5 * float(ref.curve[b].min()))
            t.fit_err.append(float(o._fit_value) - here)
            t.clipped.append(float(o.value) == float(o.best_value))
            t.best_other_m.append(abs(float(o.best_momentum) - m) > 1e-6)
            t.best_value_err.append(float(o.best_value) - ref_value(
                ref, b, math.log2(o.best_lr), _nearest(momenta, o.best_momentum)))
    if a.answer is not None and a.answer.best is not None:
        t.named.append((seed, a.answer.best.batch_size))


def _nearest(momenta: Sequence[float], m: float) -> float:
    """The grid momentum nearest to m in log2(1 - m). The pooled fit's m* is a trial's momentum (a weighted
    median); a batch size fitted alone (2-D quadratic) has a continuous one, read at the nearest grid curve."""
    return min(momenta, key=lambda q: abs(math.log2(1.0 - q) - math.log2(1.0 - m)))


def momentum_row(grid: str, cell: str, n: int, t: MomentumTally, replicates: int) -> str:
    return (f"| {grid} | {cell} | {n} | {replicates} | {_m(t.lr_hold)} | {_m(t.lr_hold_own)} | "
            f"{_m(t.eff_hold)} | {_med(t.lr_width)} | {_m(t.lr_err, '{:+.2f}')} | {_m(t.m_best)} | "
            f"{_m(t.m_near)} | {_m(t.m_hold)} | {_m(t.plateau_hold)} | {_m(t.value_err, '{:+.4f}')} | "
            f"{_med(t.value_err, '{:+.4f}')} | {_m(t.on_wall)} | "
            f"{_m(t.fit_err, '{:+.4f}')} | {_m(t.clipped)} | {_m(t.best_other_m)} | "
            f"{_m(t.best_value_err, '{:+.4f}')} | {t.failed} |")


MOMENTUM_HEADER = (
    "| grid | batch sizes | n (lr, m) per B | replicates | lr\\* holds (ref m\\*) | lr\\* holds (at the study's m) | "
    "effective lr\\* holds | lr\\* width (oct, median) | lr\\* bias (oct) | m = ref m\\* | m within 1 sd | "
    "m interval holds m\\* | plateau holds lr\\*(m) | value bias (mean) | value bias (median) | "
    "reference there >= 1.5x its best | fit value bias (before clip) | "
    "value = best trial's | best trial at another m | best-trial value bias | failed |\n" + "|---" * 21 + "|")


def ref_alpha(ref: Reference, sizes: Sequence[int]) -> tuple[float, float, float]:
    """alpha of the reference's power law over ``sizes``, and its 95% interval over the seed bootstrap."""
    lb = np.log2(sizes)
    point = float(np.polyfit(lb, [ref.lr[b] for b in sizes], 1)[0])
    boot = np.array([np.polyfit(lb, [ref.boot[b][i] for b in sizes], 1)[0] for i in range(REF_BOOT)])
    return point, float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def run_cell(rows: Sequence[dict], grid: str, seeds: Sequence[int], sizes: Sequence[int], n: int,
             replicates: int, all_seeds: Sequence[int], n_boot: int,
             progress: Callable[[Tally | MomentumTally, int], None] | None = None) -> Tally | MomentumTally:
    """``replicates`` studies spread over the training ``seeds``, each scored against the other seeds; a grid
    with several momenta is scored as a momentum-searched study (``MomentumTally``). ``progress(t, done)``
    is called after every round of the seeds (the tally so far is a table of its own, seeds balanced)."""
    searched = len({r["momentum"] for r in rows}) > 1
    t = MomentumTally() if searched else Tally()
    refs = {}
    for s in seeds:
        others = [q for q in all_seeds if q != s]
        ref = reference(rows, others, np.random.default_rng(1000 + s))
        refs[s] = (ref, ref_alpha(ref, sizes))
    for i in range(replicates):
        s = seeds[i % len(seeds)]
        rng = np.random.default_rng([zlib.crc32(grid.encode()), n, len(sizes), i])
        table = draw_study(rows, s, sizes, n, rng)
        try:
            a = analyze(table, n_boot=n_boot, seed=i)
        except BstuneError:
            t.failed += 1
            continue
        if isinstance(t, MomentumTally):
            score_momentum(t, a, refs[s][0], s)
        else:
            score(t, a, refs[s][0], refs[s][1], s)
        if progress is not None and (i + 1) % len(seeds) == 0:
            progress(t, i + 1)
    return t


def _m(v: Sequence[float | bool], fmt: str = "{:.2f}") -> str:
    return fmt.format(float(np.mean(v))) if len(v) else "-"


def _med(v: Sequence[float], fmt: str = "{:.2f}") -> str:
    return fmt.format(float(np.median(v))) if len(v) else "-"


def row(grid: str, cell: str, n: int, t: Tally, replicates: int) -> str:
    return (f"| {grid} | {cell} | {n} | {replicates} | {_m(t.lr_hold)} | {_m(t.lr_hold_bracketed)} | "
            f"{_m(t.lr_meet)} | {_med(t.lr_width)} | {_m(t.lr_err, '{:+.2f}')} | {_m(t.outside)} | "
            f"{_m(t.alpha_hold)} | {_m(t.alpha_meet)} | {_m(t.alpha_err, '{:+.2f}')} | {_med(t.alpha_width)} | "
            f"{_m(t.plateau_hold)} | {_m(t.plateau_wide)} | {_med(t.plateau_width)} | "
            f"{_m(t.value_err, '{:+.4f}')} | {_m(t.best_value_err, '{:+.4f}')} | {t.failed} |")


HEADER = ("| grid | batch sizes | n per B | replicates | lr* holds | lr* holds (bracketed) | lr* meets | "
          "lr* width (oct, median) | lr* bias (oct) | point outside | alpha holds | alpha meets | alpha bias | "
          "alpha width | plateau holds argmin | plateau reaches 1.5x | plateau width (oct) | value bias | "
          "best-trial value bias | failed |\n"
          "|" + "---|" * 20)


def named_lines(grid: str, tallies: dict[int, Tally | MomentumTally]) -> list[str]:
    out = []
    for n, t in tallies.items():
        by_seed: dict[int, dict[int, int]] = {}
        for s, b in t.named:
            by_seed.setdefault(s, {}).setdefault(b, 0)
            by_seed[s][b] += 1
        words = "; ".join(f"seed {s}: " + ", ".join(f"B={b} x{c}" for b, c in sorted(d.items()))
                          for s, d in sorted(by_seed.items()))
        out.append(f"- {grid}, n = {n}: {words}")
    return out


def summary(rows: Sequence[dict], rng: np.random.Generator) -> list[str]:
    """What a grid shows, per (batch size, momentum), from all its seeds: the seed-mean vertex lr*, its 95%
    interval over a seed bootstrap (one resample of the seeds shared by every batch size), the best seed-mean
    value, the sd over seeds there, the sd of each seed's own lr*; then how lr*(B) moves (``_law_lines``)."""
    xs = np.unique(np.round(np.log2([r["lr"] for r in rows]), 6))
    seeds = sorted({r["seed"] for r in rows})
    picks = rng.integers(0, len(seeds), size=(REF_BOOT, len(seeds)))
    out = ["| B | momentum | lr\\* (log2) | 95% interval (seed bootstrap) | best seed-mean value | sd over seeds there "
           "| each seed's own lr\\* (sd, octaves) | within 1.5x of the best (log2 lr) | its centre [95%] |",
           "|---" * 9 + "|"]
    by_m: dict[float, list[tuple[int, float, np.ndarray]]] = {}
    centres: dict[float, list[tuple[int, float, np.ndarray]]] = {}
    for m in sorted({r["momentum"] for r in rows}):
        for b in sorted({r["batch_size"] for r in rows}):
            mat = np.full((len(seeds), len(xs)), np.nan)
            for r in rows:
                if r["batch_size"] == b and r["momentum"] == m:
                    mat[seeds.index(r["seed"]), np.searchsorted(xs, round(math.log2(r["lr"]), 6))] = r["value"]
            curve = _seed_mean(mat)
            boot = np.array([_vertex(xs, _seed_mean(mat[p])) for p in picks])
            by_m.setdefault(m, []).append((b, _vertex(xs, curve), boot))
            at = mat[:, int(np.argmin(curve))]
            own = [_vertex(xs, np.where(np.isfinite(v), v, np.nanmax(mat))) for v in mat]
            lo, hi = _span(xs, curve)
            mid = np.array([sum(_span(xs, _seed_mean(mat[p]))) / 2.0 for p in picks])
            centres.setdefault(m, []).append((b, (lo + hi) / 2.0, mid))
            out.append(f"| {b} | {m:g} | {_vertex(xs, curve):.2f} | {np.quantile(boot, 0.025):.2f} .. "
                       f"{np.quantile(boot, 0.975):.2f} | {curve.min():.4f} | {np.nanstd(at, ddof=1):.4f} | "
                       f"{np.std(own, ddof=1):.2f} | {lo:.2f} .. {hi:.2f} | {(lo + hi) / 2:.2f} "
                       f"[{np.quantile(mid, 0.025):.2f}, {np.quantile(mid, 0.975):.2f}] |")
    for m, pts in by_m.items():
        out += _law_lines(m, pts, "the seed-mean vertex")
        out += _law_lines(m, centres[m], "the centre of the span within 1.5x of the best")
    return out


def _span(xs: np.ndarray, curve: np.ndarray, factor: float = 1.5) -> tuple[float, float]:
    """log2 lr at the two ends of the stretch around the curve's minimum where it lies within ``factor`` of
    it (linear between grid points; the grid's end where the curve does not rise that far)."""
    i, level = int(np.argmin(curve)), factor * float(curve.min())
    ends = []
    for step in (-1, 1):
        j = i
        while 0 <= j + step < len(xs) and curve[j + step] <= level:
            j += step
        k = j + step
        if not 0 <= k < len(xs):
            ends.append(float(xs[j]))
            continue
        ends.append(float(xs[j] + (level - curve[j]) / (curve[k] - curve[j]) * (xs[k] - xs[j])))
    return ends[0], ends[1]


def _law_lines(m: float, pts: list[tuple[int, float, np.ndarray]], what: str) -> list[str]:
    """How the reference lr*(B) moves at one momentum: the least-squares alpha on log2 B, the form bstune's
    ``fit_forms`` prefers for it (AICc, the seed-bootstrap replicates as its rows), and where lr* peaks, with
    the fall (octaves) from the peak to the largest batch size over the seed bootstrap."""
    sizes = np.array([b for b, _, _ in pts], dtype=float)
    rows = np.vstack([[x for _, x, _ in pts], np.stack([bt for _, _, bt in pts], axis=1)])
    lb = np.log2(sizes)
    slope = np.polyfit(lb, rows.T, 1)[0]
    out = [f"- momentum {m:g}, lr* as {what}: alpha (least squares on log2 B) {slope[0]:.2f} "
           f"[{np.quantile(slope[1:], 0.025):.2f}, {np.quantile(slope[1:], 0.975):.2f}]"]
    if len(sizes) >= 3:
        fits, preferred = fit_forms(sizes, rows, "AICc" if len(sizes) >= 5 else "AIC")
        weights = ", ".join(f"{f} {fits[f].weight:.2f}" for f in sorted(fits, key=lambda f: -fits[f].weight))
        out.append(f"  - forms (bstune's fit_forms on the reference): preferred {preferred}; weights {weights}")
    k = int(np.argmax(rows[0]))
    if k < len(sizes) - 1:
        fall = rows[:, -1] - rows[:, k]
        out.append(f"  - lr* peaks at B = {int(sizes[k])} (2^{rows[0, k]:.2f}) and moves {fall[0]:+.2f} octave "
                   f"[{np.quantile(fall[1:], 0.025):+.2f}, {np.quantile(fall[1:], 0.975):+.2f}] to B = "
                   f"{int(sizes[-1])}")
    return out


def _so_far(grid: str, cell: str, n: int, t0: float, t: Tally | MomentumTally, done: int) -> None:
    fmt = momentum_row if isinstance(t, MomentumTally) else row
    print("so far:", fmt(grid, cell, n, t, done), f"{time.perf_counter() - t0:.0f}s", flush=True)


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default="digits-sgd,mnist1d-sgd")
    p.add_argument("--seeds", default="4-7", help="training seeds the studies are drawn at (0-3: development)")
    p.add_argument("--replicates", type=int, default=100)
    p.add_argument("--trials", default="8,16,24,27")
    p.add_argument("--cells", default="all,16-256")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--out", default="")
    p.add_argument("--progress", action="store_true", help="print each cell's row so far after every round of seeds")
    p.add_argument("--summary", action="store_true", help="print what each grid shows (all seeds) and stop")
    args = p.parse_args()
    if args.summary:
        for grid in args.grids.split(","):
            print(f"{grid}:", *summary(load(grid), np.random.default_rng(0)), sep="\n")
        return
    lines, named = [], []
    t0 = time.perf_counter()
    for grid in args.grids.split(","):
        if not GRIDS[grid].path.exists():
            print(f"{grid}: not cached (run benchmarks/real_grids.py)", flush=True)
            continue
        rows = load(grid)
        all_seeds = sorted({r["seed"] for r in rows})
        grid_sizes = sorted({r["batch_size"] for r in rows})
        searched = len({r["momentum"] for r in rows}) > 1
        lines += ["", MOMENTUM_HEADER if searched else HEADER]
        for cell in args.cells.split(","):
            sizes = [b for b in CELLS[cell] or grid_sizes if b in grid_sizes]
            if cell != "all" and sizes == grid_sizes:
                continue  # the grid has no batch size outside the cell
            tallies = {}
            for n in map(int, args.trials.split(",")):
                progress = functools.partial(_so_far, grid, cell, n, t0) if args.progress else None
                tallies[n] = t = run_cell(rows, grid, _seeds(args.seeds), sizes, n, args.replicates, all_seeds,
                                          args.n_boot, progress)
                lines.append((momentum_row if searched else row)(grid, cell, n, t, args.replicates))
                print(lines[-1], f"{time.perf_counter() - t0:.0f}s", flush=True)
            if cell == "all":
                named += named_lines(grid, tallies)
    text = "\n".join(lines) + "\n\nNamed batch size (best fitted value) per training seed:\n\n" + "\n".join(named)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
