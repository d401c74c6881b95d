"""Time to a trustworthy answer: bstune, whole, against the standard protocol as it is run, end to end, in
wall-clock seconds. A benchmark, not a test:

    python benchmarks/time_to_answer.py [--seeds 5] [--budget 400] [--step 2] [--out benchmarks/TIME.md]
        [--save-runs runs.json]
    python benchmarks/time_to_answer.py --quick          # 2 seeds, 40 full trials, no file: development
    python benchmarks/time_to_answer.py --rescore runs.json    # the report again from saved runs, no training

The full run takes about half an hour on 2 CPU cores (one seed's three searches at 400 full trials took 5.2
min there, with another job on the second core; scoring about 15 s a seed); --quick about 2 minutes.

The workload and the reference are those of ``search_efficiency.py`` (digits, batch sizes 32..512, its cached
4,000-trial grid, whose key must match: this script never recomputes it). Every search runs through bstune's
real ``run_study`` in fresh temporary stores (an Optuna SQLite storage and an MLflow SQLite tracking store
per search, on disk, as a user's would be), one search at a time, all in this one process:

- **protocol** (Shallue et al. 2018): scrambled Sobol (lr, momentum) per batch size, one trial at a time
  (``fuse`` 1), no pruning (``search_efficiency.protocol_spec``); its answer at each batch size is the best
  trial so far, its lr and momentum as run;
- **bstune**: the default study's search as shipped (``studies/digits.yaml``: law sampler, median pruning
  within a batch size, trials fused by the device's default), its answer ``analyze()``'s lr* and m* per batch
  size;
- component rows: **protocol + analyze()**, the protocol's own trials (the same runs) read by ``analyze()``;
  **bstune --fuse 1**, bstune's search with one trial at a time.

While a search runs, only the wall time at which each trial finishes is recorded (from the call of
``run_study``). The answers are scored afterwards, offline, every ``--step`` seconds of that clock from the
trials finished by then, so the analysis never counts as search time. Two scores per answer, each a mean over
the batch sizes: the lr error (octaves) against the reference's lr* at the answer's momentum, and the regret,
the reference's val_loss (averaged over its eight training seeds) at the answer's (lr, m) minus the
reference's best (``ReferenceSurface``). A search *has the answer* from the first scoring time after which
both stay under their targets (error <= 0.5 octave, regret <= 0.01) to the end of its budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import search_efficiency as se  # benchmarks/, on the path when run as a script

from bstune.analysis import analyze
from bstune.errors import BstuneError
from bstune.search import SilentProgress, run_study
from bstune.search.study import default_fuse
from bstune.spec import Budget, Execution, StudySpec, load_spec
from bstune.train import load_dataset, pick_device
from bstune.trials import TrialTable

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "TIME.md"
ERROR_TARGET = 0.5  # octaves, mean over the batch sizes
REGRET_TARGET = 0.01  # val_loss, mean over the batch sizes
TARGETS = (ERROR_TARGET, REGRET_TARGET)
# Shown beside the targets, from the same runs (not in the ratio): whether the ratio depends on where the bar is.
OTHER_TARGETS = ((0.5, 0.01), (0.5, 0.02), (0.75, 0.02), (0.5, 0.03), (1.0, 0.05))
# The searches run, and the rows scored from them: (row, search whose trials it reads, how it answers).
SEARCHES = ("protocol", "bstune", "bstune --fuse 1")
ROWS = (
    ("protocol", "protocol", "best"),
    ("bstune", "bstune", "analyze"),
    ("protocol + analyze()", "protocol", "analyze"),
    ("bstune --fuse 1", "bstune --fuse 1", "analyze"),
)
FULL = {"seeds": 5, "budget": 400.0}
QUICK = {"seeds": 2, "budget": 40.0}


# ------------------------------------------------------------------------------------------ searches


def search_specs(spec: StudySpec) -> dict[str, StudySpec]:
    """The three searches on the benchmark's workload: the protocol (one trial at a time), bstune as shipped
    (its fuse left to the device's default) and bstune one trial at a time."""
    one = Execution(fuse=1)
    return {
        "protocol": se.protocol_spec(spec).with_overrides(execution=one),
        "bstune": spec,
        "bstune --fuse 1": spec.with_overrides(execution=one),
    }


class _Clock(SilentProgress):
    """Wall time, since the search's start, at which the first trial started and each trial finished."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first_start: float | None = None
        self.finished: dict[int, float] = {}

    def trial_started(self, number: int, config: Any) -> None:
        if self.first_start is None:
            self.first_start = time.perf_counter() - self.t0

    def trial_finished(
        self, number: int, config: Any, state: str, value: float | None, seconds: float, reason: str
    ) -> None:
        self.finished[number] = time.perf_counter() - self.t0


def run_search(label: str, spec: StudySpec, seed: int, examples: float, folder: Path) -> dict[str, Any]:
    """One search, to `examples` processed, in fresh stores under `folder`: its trials, each with the wall
    time at which it finished, and the search's own times (seconds since ``run_study`` was called)."""
    slug = label.replace(" ", "").replace("-", "")
    sampler = dataclasses.replace(spec.search.sampler, seed=seed)  # the training seed stays the spec's
    spec = spec.with_overrides(
        name=f"{slug}-{seed}",
        search=dataclasses.replace(spec.search, sampler=sampler),
        budget=Budget(examples=examples),
        storage=f"sqlite:///{folder}/{slug}-{seed}-optuna.db",
        tracking_uri=f"sqlite:///{folder}/{slug}-{seed}-mlflow.db",
    )
    data = load_dataset(spec.workload)  # before the clock: the same for every search
    clock = _Clock()
    result = run_study(spec, data=data, progress=clock)
    seconds = time.perf_counter() - clock.t0
    trials = [se._trial_row(r) | {"finished": clock.finished.get(r.number, seconds)} for r in result.table.records]
    trials.sort(key=lambda r: r["finished"])
    return {
        "label": label,
        "seed": seed,
        "seconds": seconds,
        "first_start": clock.first_start or seconds,
        "fuse": spec.execution.fuse or default_fuse(pick_device(None).type, spec.workload.model),
        "trials": trials,
    }


def run_all(spec: StudySpec, seeds: Sequence[int], examples: float, log: Callable[[str], None]) -> list[dict]:
    """Every search at every seed, one at a time, the order of the searches reversed every other seed (so a
    busy spell on the machine does not always fall on the same one); a short warm-up first, not measured."""
    specs = search_specs(spec)
    unit = se.trial_examples(spec, load_dataset(spec.workload).n_train)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bstune-time-") as tmp:
        for label in SEARCHES:  # imports, the stores' first creation, the fused trainer's first call
            run_search(f"warmup {label}", specs[label], 0, 2 * unit, Path(tmp))
        for seed in seeds:
            order = SEARCHES if seed % 2 == 0 else tuple(reversed(SEARCHES))
            for label in order:
                r = run_search(label, specs[label], seed, examples, Path(tmp))
                runs.append(r)
                log(f"{label} seed {seed}: {len(r['trials'])} trials in {r['seconds']:.1f}s")
    return runs


# ------------------------------------------------------------------------------------------ scoring


class ReferenceSurface:
    """The reference's val_loss, averaged over its training seeds, at any (B, lr, m) of the searched space.

    A diverged reference trial counts as the worst value any completed reference trial at its batch size
    reached (about chance level: the cells next to a cliff are there already), so the average stays finite.
    Between two grid momenta the surface is read at the same offset in log2 lr from each column's valley
    floor (the reference's lr* at that momentum, as ``search_efficiency.reference_lr`` gives it) and
    interpolated linearly in log2(1 - m); within a column, linearly in log2 lr. Reading two columns at the
    same lr instead puts a point on the floor between them on the walls of both (the floor runs along
    lr/(1 - m) at small B), which ``interpolation_check`` measures. A point outside a column's lr range, or
    beyond the grid's momenta, is read at the nearest edge (clamped), and counted."""

    def __init__(self, ref: dict[str, Any]) -> None:
        self.ref = ref
        self.columns: dict[int, list[tuple[float, np.ndarray, np.ndarray, float]]] = {}
        self.best: dict[int, float] = {}
        sign = 1.0 if ref["objective"] != "val_accuracy" else -1.0
        for b_key, r in ref["per_batch"].items():
            b = int(b_key)
            rows = [x for x in ref["rows"] if x["batch_size"] == b]
            worst = max(sign * x["value"] for x in rows if x["value"] is not None)
            cols = []
            for m in se.GRID_MOMENTA:
                column = [x for x in rows if x["momentum"] == m]
                if not column:
                    continue
                lrs = sorted({x["lr"] for x in column})
                values = {(x["lr"], x["seed"]): sign * x["value"] if x["value"] is not None else worst for x in column}
                y = np.array([np.mean([values.get((lr, s), worst) for s in ref["seeds"]]) for lr in lrs])
                cols.append((m, np.log2(lrs), y, math.log2(se.reference_lr(r, m))))
            self.columns[b] = cols
            self.best[b] = min(float(c[2].min()) for c in cols)  # the grid's best point

    def value(self, b: int, lr: float, m: float) -> tuple[float, bool]:
        """The surface at (lr, m) at batch size b, and whether the point was clamped to the grid's edge."""
        cols = self.columns[b]
        us = [math.log2(1.0 - c[0]) for c in cols]  # decreasing with m
        u = math.log2(max(1.0 - m, 1e-12))
        clamped = not us[-1] <= u <= us[0]
        u = min(max(u, us[-1]), us[0])
        j = next((i for i in range(1, len(cols)) if us[i] <= u), len(cols) - 1)
        offset = math.log2(lr) - math.log2(se.reference_lr(self.ref["per_batch"][str(b)], m))
        out = 0.0
        w = (us[j - 1] - u) / (us[j - 1] - us[j])
        for col, weight in ((cols[j - 1], 1.0 - w), (cols[j], w)):
            _, x, y, floor = col
            at = floor + offset
            clamped |= weight > 0 and not x[0] <= at <= x[-1]
            out += weight * float(np.interp(at, x, y))
        return out, clamped

    def regret(self, b: int, lr: float, m: float) -> tuple[float, bool]:
        v, clamped = self.value(b, lr, m)
        return v - self.best[b], clamped


Answers = dict[int, tuple[float, float]]  # batch size -> (lr, momentum)


def best_trial_answers(table: TrialTable) -> Answers:
    """The protocol's answer: per batch size the best completed trial's lr and momentum."""
    out = {}
    for b, rs in table.by_batch_size().items():
        r = table.best(rs)
        if r is not None:
            out[b] = (r.lr, r.momentum)
    return out


# Bootstrap resamples when scoring: they make the intervals, not lr* and m*, so the fewest analyze() allows;
# ``same_as_default`` checks the answers against the default's at every search's end.
SCORING_N_BOOT = 20


def analyze_answers(table: TrialTable, n_boot: int = SCORING_N_BOOT) -> Answers:
    """bstune's answer: ``analyze()``'s lr* and m* per batch size (where it gives one)."""
    try:
        result = analyze(table, n_boot=n_boot)
    except BstuneError:
        return {}
    return {o.batch_size: (o.lr, o.momentum) for o in result.per_batch if o.lr is not None and o.momentum is not None}


ANSWER = {"best": best_trial_answers, "analyze": analyze_answers}


def same_as_default(run: dict[str, Any], spec: StudySpec, n_train: int) -> bool:
    """Whether ``analyze()`` on all of a search's trials answers the same with SCORING_N_BOOT resamples as with
    its default number."""
    table = se.trial_table(run["trials"], spec, n_train)
    return analyze_answers(table) == analyze_answers(table, n_boot=200)


def score(answers: Answers, ref: dict[str, Any], surface: ReferenceSurface) -> dict[str, Any]:
    """Mean lr error (octaves) and mean regret over the reference's batch sizes; inf while one has no answer."""
    errors, regrets, clamped = [], [], 0
    for b_key, r in ref["per_batch"].items():
        a = answers.get(int(b_key))
        if a is None:
            return {"error": math.inf, "regret": math.inf, "clamped": 0}
        lr, m = a
        errors.append(abs(math.log2(lr / se.reference_lr(r, m))))
        regret, c = surface.regret(int(b_key), lr, m)
        regrets.append(regret)
        clamped += c
    return {"error": float(np.mean(errors)), "regret": float(np.mean(regrets)), "clamped": clamped}


def score_run(
    run: dict[str, Any], answer: str, spec: StudySpec, ref: dict[str, Any], surface: ReferenceSurface, step: float
) -> list[dict[str, Any]]:
    """A search's answer scored every `step` seconds of its wall clock and at its end, from the trials
    finished by then (the analysis re-run only when a trial has finished since the last time)."""
    trials, end = run["trials"], run["seconds"]
    times = [step * k for k in range(1, int(end / step) + 1) if step * k < end] + [end]
    points, last, n = [], None, 0
    for t in times:
        while n < len(trials) and trials[n]["finished"] <= t:
            n += 1
        if last is None or last["n"] != n:
            table = se.trial_table(trials[:n], spec, ref["n_train"])
            last = {"n": n, "examples": sum(r["examples_seen"] for r in trials[:n])} | score(
                ANSWER[answer](table), ref, surface
            )
        points.append(last | {"t": t})
    return points


def under(p: dict[str, Any], targets: tuple[float, float] = TARGETS) -> bool:
    return p["error"] <= targets[0] and p["regret"] <= targets[1]


def time_to_answer(points: Sequence[dict[str, Any]], targets: tuple[float, float] = TARGETS) -> tuple[float, float]:
    """(seconds, examples) from which the answer stays under both targets to the end; inf where it does not
    hold at the end."""
    hit = (math.inf, math.inf)
    for p in reversed(points):
        if not under(p, targets):
            break
        hit = (p["t"], p["examples"])
    return hit


def interpolation_check(surface: ReferenceSurface) -> list[tuple[int, float, float, float]]:
    """Leave one grid momentum out and predict its column near the floor (within 0.05 of the batch size's best)
    from its two neighbours: (B, momentum, median |error| of the floor-aligned reading, of the same-lr reading).
    Twice the spacing the surface interpolates over: a pessimistic measure of its own error there."""
    out = []
    for b, cols in surface.columns.items():
        for i in range(1, len(cols) - 1):
            (m0, x0, y0, f0), (m1, x1, y1, _), (m2, x2, y2, f2) = cols[i - 1], cols[i], cols[i + 1]
            u0, u1, u2 = (math.log2(1.0 - m) for m in (m0, m1, m2))
            w = (u0 - u1) / (u0 - u2)
            f1 = (1.0 - w) * f0 + w * f2
            aligned, same = [], []
            for x, y in zip(x1, y1, strict=True):
                if y > surface.best[b] + 0.05:
                    continue
                d = x - f1
                aligned.append(abs((1 - w) * np.interp(f0 + d, x0, y0) + w * np.interp(f2 + d, x2, y2) - y))
                same.append(abs((1 - w) * np.interp(x, x0, y0) + w * np.interp(x, x2, y2) - y))
            if aligned:
                out.append((b, m1, float(np.median(aligned)), float(np.median(same))))
    return out


# ------------------------------------------------------------------------------------------ report

Bounds = tuple[float, float]  # a quantity known to lie in [low, high]; equal where it is measured


def needed(
    run: dict[str, Any], points: Sequence[dict[str, Any]], unit: float, targets: tuple[float, float] = TARGETS
) -> tuple[Bounds, Bounds]:
    """(seconds, full trials of examples) a row needed to have the answer; where it never did within its
    budget, at least all it ran (an open bound)."""
    t, ex = time_to_answer(points, targets)
    if math.isfinite(t):
        return (t, t), (ex / unit, ex / unit)
    spent = points[-1]["examples"] / unit
    return (run["seconds"], math.inf), (spent, math.inf)


def needs_at(
    scored: dict, by: dict, seeds: Sequence[int], unit: float, targets: tuple[float, float] = TARGETS
) -> dict[tuple[str, int], tuple[Bounds, Bounds]]:
    """What every row needed at every seed to have the answer at `targets` (`needed`)."""
    return {(row, x): needed(by[(src, x)], scored[(row, x)], unit, targets) for row, src, _ in ROWS for x in seeds}


def median_ratio(need: dict, a: str, b: str, seeds: Sequence[int], k: int = 0) -> Bounds:
    """The median over seeds of row a's need over row b's: seconds (k 0) or examples (k 1)."""
    return median_bounds([ratio(need[(a, x)][k], need[(b, x)][k]) for x in seeds])


def got_there(need: dict, row: str, seeds: Sequence[int]) -> int:
    """At how many seeds the row had the answer within its budget (its need is known, not a bound)."""
    return sum(need[(row, x)][0][0] == need[(row, x)][0][1] for x in seeds)


def ratio(a: Bounds, b: Bounds) -> Bounds:
    """a / b for two quantities known within bounds."""
    low = a[0] / b[1] if b[1] > 0 else math.inf
    high = a[1] / b[0] if b[0] > 0 else math.inf
    return (0.0 if math.isnan(low) else low), (math.inf if math.isnan(high) else high)


def median_bounds(values: Sequence[Bounds]) -> Bounds:
    """Bounds on the median of quantities known within bounds: the medians of the ends."""
    return statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)


def show(v: Bounds, nd: int = 2) -> str:
    low, high = v
    if low == high:
        return f"{low:.{nd}f}"
    if math.isinf(high):
        return f">= {low:.{nd}f}" if low > 0 else "-"
    return f"<= {high:.{nd}f}" if low == 0 else f"{low:.{nd}f}..{high:.{nd}f}"


def spread(values: Sequence[Bounds], nd: int = 1) -> str:
    """The median, [min, max] of bounded values (each end from the ends)."""
    lo = min(v[0] for v in values)
    hi = max(v[1] for v in values)
    top = f"{hi:.{nd}f}" if math.isfinite(hi) else "never"
    return f"{show(median_bounds(values), nd)} [{lo:.{nd}f}, {top}]"


def _at(points: Sequence[dict[str, Any]], t: float, key: str) -> float:
    """A row's score at time t: its last scoring at or before t (its final one after its end)."""
    return se._at(points, t, key, axis="t")


def _fmt(v: float, nd: int) -> str:
    return f"{v:.{nd}f}" if math.isfinite(v) else "-"


COMPONENTS = (
    (
        "protocol",
        "protocol + analyze()",
        "the estimator: the same trials read by `analyze()` instead of the best trial",
    ),
    (
        "protocol + analyze()",
        "bstune --fuse 1",
        "the search: the law sampler and median pruning (both read by `analyze()`, both one trial at a time)",
    ),
    ("bstune --fuse 1", "bstune", "fusion: trials of one batch size trained together (fuse {fuse})"),
    ("protocol", "bstune", "all of it: the headline ratio"),
)


def report(
    runs: Sequence[dict[str, Any]],
    spec: StudySpec,
    ref: dict[str, Any],
    budget: float,
    step: float,
    command: str,
    machine: str,
    surface: ReferenceSurface,
) -> list[str]:
    """The Markdown report; its last line is the median over seeds of the per-seed wall-time ratio."""
    unit = se.trial_examples(spec, ref["n_train"])
    by = {(r["label"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    scored = {
        (row, seed): score_run(by[(src, seed)], answer, spec, ref, surface, step)
        for row, src, answer in ROWS
        for seed in seeds
    }
    need = needs_at(scored, by, seeds, unit)
    others = {t: needs_at(scored, by, seeds, unit, t) for t in OTHER_TARGETS}
    fuse = next(r["fuse"] for r in runs if r["label"] == "bstune")
    w, s = spec.workload, spec.search
    total = sum(r["seconds"] for r in runs)
    clamped = sum(p["clamped"] for pts in scored.values() for p in pts)
    readings = sum(len(ref["per_batch"]) for pts in scored.values() for p in pts if math.isfinite(p["regret"]))
    same = sum(same_as_default(r, spec, ref["n_train"]) for r in runs)
    lines = [
        "# Time to a trustworthy answer: bstune against the standard protocol, end to end",
        "",
        f"Written by `python benchmarks/time_to_answer.py{command}` ({machine}; the {len(runs)} searches ran "
        f"{total / 60:.0f} min in all, one at a time).",
        "",
        f"- **Workload**: that of `benchmarks/search_efficiency.py` (SEARCH.md): {w.dataset} (n_train "
        f"{ref['n_train']}), {w.model} width {w.width}, {w.optimizer}, {w.epochs} epochs, {w.lr_schedule} "
        f"schedule, objective {s.objective}; batch sizes {', '.join(map(str, s.batch_sizes))}; lr "
        f"{s.lr[0]:g}..{s.lr[1]:g}, momentum {s.momentum[0]:g}..{s.momentum[1]:g}.",
        "- **protocol** (Shallue et al. 2018): scrambled Sobol (lr, momentum), an independent sequence per batch "
        "size, one trial at a time, no pruning; its answer at each batch size is the best trial so far (its lr "
        "and momentum as run).",
        f"- **bstune**: the search of `studies/digits.yaml` as shipped: sampler `{s.sampler.name}` "
        f"(n_startup_trials {s.sampler.n_startup_trials}), pruner `{s.pruner.name}` within a batch size "
        f"(n_startup_trials {s.pruner.n_startup_trials}, n_warmup_epochs {s.pruner.n_warmup_epochs}), trials "
        f"fused {fuse} at a time (the default for this device and model); its answer is `analyze()`'s lr* and "
        "m* per batch size.",
        "- **Component rows**: *protocol + analyze()*, the protocol's own runs (the same trials, the same clock) "
        "answered by `analyze()` instead of the best trial; *bstune --fuse 1*, bstune's search run one trial "
        "at a time.",
        f"- **Budget**: every search {budget:g} full trials' worth of examples ({w.epochs} epochs x "
        f"{ref['n_train']} = {unit:,} examples a full trial; {budget * unit:,.0f} in all), the same for all, "
        "examples counted as processed (a pruned trial counts the epochs it ran). A search has the answer "
        "only if it keeps it to the end of that budget. For the protocol that is "
        f"{statistics.median(len(by[('protocol', x)]['trials']) for x in seeds):g} trials (median), about "
        f"{statistics.median(len(by[('protocol', x)]['trials']) for x in seeds) / len(s.batch_sizes):.0f} per "
        "batch size; one training seed's whole reference grid has about a hundred.",
        f"- **Seeds** {', '.join(map(str, seeds))}: seed k is the sampler seed of every search; every trial "
        f"trains at the spec's training seed ({spec.workload.seed}: initial weights, data order), which the "
        "reference does not use.",
        "- **Clock and bookkeeping**: every search runs through bstune's real `run_study`, with a fresh Optuna "
        "SQLite storage and a fresh MLflow SQLite tracking store in a temporary folder on disk (as a user's "
        "`mlruns/` would be): the same bookkeeping for every search, each trial an Optuna trial and an MLflow "
        "run. Wall time counts from the call of `run_study` (opening and creating the stores included; the "
        "interpreter's start, imports and loading the data set not); a short search of each kind runs first, "
        "unmeasured, to warm them. The searches run one at a time in one process, in the order protocol, bstune, "
        "bstune --fuse 1 at even seeds and the reverse at odd ones.",
        f"- **Scoring**, offline: while a search runs only the time each trial finishes is recorded; afterwards "
        f"each row's answer is computed every {step:g} s of that clock (and at the search's end) from the trials "
        "finished by then, so analysis time never counts as search time. Examples at a time: those of the "
        "trials finished by then (a fused group's members finish together, at its end). (a) **lr error**: "
        "|log2(lr / reference lr* at the answer's momentum)|, octaves, mean over the batch sizes (the "
        "reference's valley floor, as in SEARCH.md). (b) **regret**: the reference's val_loss, averaged over "
        f"its {len(ref['seeds'])} training seeds, at the answer's (lr, m), minus the reference grid's best, mean "
        "over the batch sizes. A row **has the answer** from the first scoring time after which error <= "
        f"{ERROR_TARGET:g} octave AND regret <= {REGRET_TARGET:g} hold at every scoring to the end of its budget; "
        "a row that does not hold them at its end never got there, and what it needed is a bound (at least "
        "its whole run), shown as >=.",
        f"- **Reference**: the cached grid of `benchmarks/{se.REFERENCE.name}` ({ref['n_trials']} trials, "
        f"effective lr 2^{se.GRID_LOG2_EFF[0]:g}..2^{se.GRID_LOG2_EFF[-1]:g} in half octaves x momentum "
        f"{', '.join(f'{m:g}' for m in se.GRID_MOMENTA)}, training seeds none of the searches uses). The regret "
        "reads it between grid points: a diverged reference trial counts as the worst val_loss any completed "
        "one at its batch size reached (chance level: the cells beside a cliff are there already); within a "
        "momentum column, linear in log2 lr; between two grid momenta, each column read at the same offset "
        "from its own valley floor and interpolated linearly in log2(1 - m) (the floor runs along lr/(1 - m) "
        "at small B: read at the same lr, a point on the floor between two columns lands on both columns' "
        "walls; see the check at the end). A point outside the grid is read at its edge: "
        f"{clamped} of {readings} readings (batch size x scoring time) were.",
        f"- **analyze()** scores with {SCORING_N_BOOT} bootstrap resamples instead of its default 200 (they make "
        "its intervals, not its lr* and m*): on all of each search's trials the answers were the same at "
        f"{same} of {len(runs)} searches.",
    ]
    lines += _summary(need, seeds, spec, ref, surface)
    lines[-1] += " " + loosest_defined(others, seeds)
    lines += _headline(need, seeds)
    lines += _per_seed(need, seeds)
    lines += _components(need, seeds, fuse)
    lines += _curves(scored, by, seeds)
    lines += _other_targets(others, seeds)
    lines += _one_seed(spec, ref, surface)
    lines += _where_time_goes(by, seeds, unit)
    lines += _interpolation(surface)
    median = median_ratio(need, "protocol", "bstune", seeds)
    lines += ["", f"time ratio (protocol / bstune): {show(median) if median != (0.0, math.inf) else 'undefined'}"]
    return lines


def _other_targets(others: dict[tuple[float, float], dict], seeds: Sequence[int]) -> list[str]:
    rows = [r for r, _, _ in ROWS]
    lines = [
        "",
        "## At other targets",
        "",
        "From the same runs, for comparison (the ratio above is at error <= "
        f"{ERROR_TARGET:g} and regret <= {REGRET_TARGET:g}): each row's median wall seconds to the answer (seeds "
        "that got there), and the median over seeds of the per-seed ratio protocol / bstune.",
        "",
        "| error <= | regret <= | " + " | ".join(rows) + " | time ratio protocol / bstune | examples ratio |",
        "|---:|---:|" + "---:|" * (len(rows) + 2),
    ]
    for targets, need in others.items():
        cells = []
        for row in rows:
            secs = median_bounds([need[(row, x)][0] for x in seeds])
            cells.append(f"{show(secs, 1)} ({got_there(need, row, seeds)}/{len(seeds)})")
        tr = median_ratio(need, "protocol", "bstune", seeds)
        er = median_ratio(need, "protocol", "bstune", seeds, k=1)
        lines.append(f"| {targets[0]:g} | {targets[1]:g} | " + " | ".join(cells) + f" | {show(tr)} | {show(er)} |")
    lines += [
        "",
        'What each part buys at these targets (median over seeds of the per-seed time ratio, as in "What each '
        'part buys"; above 1, the part pays):',
        "",
        "| part | ratio | " + " | ".join(f"{e:g} / {r:g}" for e, r in OTHER_TARGETS) + " |",
        "|---|---|" + "---:|" * len(OTHER_TARGETS),
    ]
    notes = []
    for a, b, what in COMPONENTS:
        ratios = {t: median_ratio(need, a, b, seeds) for t, need in others.items()}
        lines.append(f"| {what.split(':')[0]} | {a} / {b} | " + " | ".join(show(r) for r in ratios.values()) + " |")
        losing = [f"{e:g} / {r:g}" for (e, r), tr in ratios.items() if tr[1] <= 1.0]
        if losing:
            notes.append(f"{what.split(':')[0]} does not pay at {', '.join(losing)} ({a} / {b} <= 1)")
    if notes:
        lines += ["", "Where a part does not pay at these targets: " + "; ".join(notes) + "."]
    return lines


def loosest_defined(others: dict[tuple[float, float], dict], seeds: Sequence[int]) -> str:
    """In words: the strictest of the other targets at which the headline ratio is bounded, and what it is."""
    for targets, need in others.items():
        tr = median_ratio(need, "protocol", "bstune", seeds)
        if tr == (0.0, math.inf):
            continue
        got = {row: got_there(need, row, seeds) for row in ("protocol", "bstune")}
        secs = median_bounds([need[("bstune", x)][0] for x in seeds])
        return (
            f"The strictest of the other targets below at which the ratio is bounded is error <= {targets[0]:g} "
            f"and regret <= {targets[1]:g}: bstune held the answer at {got['bstune']} of {len(seeds)} seeds "
            f"(median {show(secs, 1)} s), the protocol at {got['protocol']}; the time ratio protocol / bstune "
            f"is {show(tr)} there."
        )
    return "At none of the other targets below is the ratio bounded either."


def one_seed_limit(spec: StudySpec, ref: dict[str, Any], surface: ReferenceSurface) -> list[dict[str, Any]]:
    """Per training seed of the reference, the answers read off that seed's whole grid (about a hundred trials
    per batch size, placed on a dense grid: more than any search here runs) by the best trial and by
    ``analyze()``, scored like the searches' (against the reference, of which this seed is one of eight): how
    close a search with one training seed can get."""
    out = []
    for seed in ref["seeds"]:
        table = se.trial_table([r for r in ref["rows"] if r["seed"] == seed], spec, ref["n_train"])
        out.append({"seed": seed} | {name: score(ANSWER[name](table), ref, surface) for name in ("best", "analyze")})
    return out


def _one_seed(spec: StudySpec, ref: dict[str, Any], surface: ReferenceSurface) -> list[str]:
    limit = one_seed_limit(spec, ref, surface)
    optimum = {int(b): (r["lr"], r["momentum"]) for b, r in ref["per_batch"].items()}
    own = score(optimum, ref, surface)
    own_regrets = {b: surface.regret(b, *a)[0] for b, a in optimum.items()}
    lines = [
        "",
        "## What one training seed allows",
        "",
        "Every search here trains each point once, at one training seed, and is scored against the mean over "
        f"{len(ref['seeds'])} seeds. The answers read off one reference seed's whole grid (about a hundred "
        "trials per batch size, on a dense grid), by the best trial and by "
        "`analyze()`, scored the same way. For scale, the reference's own optimum (its lr* and m* per batch "
        f"size, error 0 by definition) reads a regret of {own['regret']:.4f} (per batch size "
        + ", ".join(f"{b}: {v:.4f}" for b, v in own_regrets.items())
        + "): its lr* is the vertex of the parabola through a column's best point and its two neighbours, which "
        "moves it off the grid's points (a quarter octave where a neighbour is on the cliff), and its "
        "momentum is the column whose vertex is lowest, not always the column of the grid's best point; the "
        "straight line between grid points, which the regret reads, lies above a convex valley.",
        "",
        "| reference seed | best trial: error | best trial: regret | analyze(): error | analyze(): regret |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in limit:
        lines.append(
            f"| {r['seed']} | {r['best']['error']:.2f} | {r['best']['regret']:.4f} | "
            f"{r['analyze']['error']:.2f} | {r['analyze']['regret']:.4f} |"
        )
    for name, what in (("best", "best trial"), ("analyze", "analyze()")):
        err = statistics.median(r[name]["error"] for r in limit)
        reg = statistics.median(r[name]["regret"] for r in limit)
        n = sum(under(r[name]) for r in limit)
        lines.append(
            f"| median ({what}: {n} of {len(limit)} under both targets) | {err:.2f} | {reg:.4f} | | |"
            if name == "best"
            else f"| median ({what}: {n} of {len(limit)} under both targets) | | | {err:.2f} | {reg:.4f} |"
        )
    return lines


def _summary(
    need: dict, seeds: Sequence[int], spec: StudySpec, ref: dict[str, Any], surface: ReferenceSurface
) -> list[str]:
    """The result in words: who got there, the ratio, and whether it is a bound."""
    n = len(seeds)
    median = median_ratio(need, "protocol", "bstune", seeds)
    got = {row: got_there(need, row, seeds) for row in ("protocol", "bstune")}
    words = [
        f"At error <= {ERROR_TARGET:g} octave and regret <= {REGRET_TARGET:g}, bstune had the answer within "
        f"its budget at {got['bstune']} of {n} seeds, the protocol at {got['protocol']} of {n}."
    ]
    if median == (0.0, math.inf):
        words.append(
            "The median time ratio is undefined: at too many seeds neither search got there within its "
            "budget (or the bounds at the others point both ways) for the median to be bounded."
        )
    elif median[0] == median[1]:
        words.append(
            f"The median over seeds of the per-seed wall-time ratio protocol / bstune is {show(median)}, "
            "measured at every seed that decides it."
        )
    else:
        words.append(
            f"The median over seeds of the per-seed wall-time ratio protocol / bstune is a bound, "
            f"{show(median)}: at some seeds a search never got there within its budget, and its time "
            "counts as at least its whole run (the per-seed table marks them)."
        )
    if median[1] < 5.0:
        words.append("The goal of a ratio of 5 is not reached here.")
    elif median[0] < 5.0:
        words.append("Whether the goal of a ratio of 5 is reached these runs do not show.")
    limit = one_seed_limit(spec, ref, surface)
    best, fitted = (sum(under(r[k]) for r in limit) for k in ("best", "analyze"))
    words.append(
        f'For scale ("What one training seed allows" below): answers read off one training seed\'s '
        f"whole dense grid of the reference meet both targets at {best} of {len(limit)} seeds by the best "
        f"trial and at {fitted} of {len(limit)} by `analyze()`"
        + (
            ": with one training seed, however many trials a search runs, its answer is under both "
            "targets only at some seeds, the regret's most of all."
            if fitted < len(limit)
            else "."
        )
    )
    return ["", "## Result", "", " ".join(words)]


def _headline(need: dict, seeds: Sequence[int]) -> list[str]:
    lines = [
        "",
        f"## Time to the answer (median over {len(seeds)} seeds [min, max])",
        "",
        "| row | wall seconds | examples (full trials) | seeds that got there | time ratio protocol / row "
        "(median of per-seed) | examples ratio protocol / row |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row, _, _ in ROWS:
        secs = [need[(row, x)][0] for x in seeds]
        exs = [need[(row, x)][1] for x in seeds]
        got = got_there(need, row, seeds)
        tr = median_ratio(need, "protocol", row, seeds)
        er = median_ratio(need, "protocol", row, seeds, k=1)
        lines.append(f"| {row} | {spread(secs)} | {spread(exs)} | {got}/{len(seeds)} | {show(tr)} | {show(er)} |")
    return lines


def _per_seed(need: dict, seeds: Sequence[int]) -> list[str]:
    rows = [r for r, _, _ in ROWS]
    lines = [
        "",
        "## Per seed",
        "",
        "Wall seconds and full trials of examples each row needed (>=: never got there within its budget, "
        "so at least its whole run); the ratios protocol / bstune.",
        "",
        "| seed | " + " | ".join(f"{r} s | {r} full trials" for r in rows) + " | time ratio | examples ratio |",
        "|---:|" + "---:|" * (2 * len(rows) + 2),
    ]
    for x in seeds:
        cells = [f"{show(need[(r, x)][0], 1)} | {show(need[(r, x)][1], 1)}" for r in rows]
        tr = ratio(need[("protocol", x)][0], need[("bstune", x)][0])
        er = ratio(need[("protocol", x)][1], need[("bstune", x)][1])
        lines.append(f"| {x} | " + " | ".join(cells) + f" | {show(tr)} | {show(er)} |")
    return lines


def _components(need: dict, seeds: Sequence[int], fuse: int) -> list[str]:
    lines = [
        "",
        "## What each part buys",
        "",
        "Median over seeds of the per-seed ratio of the time (and the examples) two rows needed: above 1, "
        "the second is sooner.",
        "",
        "| part | ratio | time ratio | examples ratio |",
        "|---|---|---:|---:|",
    ]
    notes = []
    for a, b, what in COMPONENTS:
        tr = median_ratio(need, a, b, seeds)
        er = median_ratio(need, a, b, seeds, k=1)
        what = what.format(fuse=fuse)
        lines.append(f"| {what} | {a} / {b} | {show(tr)} | {show(er)} |")
        if tr[1] <= 1.0:
            notes.append(f"{what.split(':')[0]} does not pay in wall time here ({a} / {b}: {show(tr)})")
        elif tr[0] <= 1.0:
            notes.append(
                f"whether {what.split(':')[0]} pays in wall time is not settled by these runs ({a} / {b}: {show(tr)})"
            )
    lines += [
        "",
        ("Where a part does not pay: " + "; ".join(notes) + ".")
        if notes
        else "Every part pays: each ratio is above 1.",
    ]
    return lines


def _curves(scored: dict, by: dict, seeds: Sequence[int]) -> list[str]:
    end = max(r["seconds"] for r in by.values())
    marks = [
        m for m in (5, 10, 15, 20, 30, 45, 60, 90, 120, 150, 180, 240, 300, 360, 480, 600, 900, 1200) if m < end
    ] + [math.ceil(end)]
    rows = [r for r, _, _ in ROWS]
    lines = [
        "",
        "## Scores against wall time (median over seeds)",
        "",
        "Each row's lr error (octaves) / regret at these wall times (after a search's end, its final answer; "
        "-: not every batch size answered yet).",
        "",
        "| wall s | " + " | ".join(rows) + " |",
        "|---:|" + "---|" * len(rows),
    ]
    for t in marks:
        cells = []
        for row in rows:
            err = statistics.median(_at(scored[(row, x)], t, "error") for x in seeds)
            reg = statistics.median(_at(scored[(row, x)], t, "regret") for x in seeds)
            cells.append(f"{_fmt(err, 2)} / {_fmt(reg, 4)}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines


def _where_time_goes(by: dict, seeds: Sequence[int], unit: float) -> list[str]:
    lines = [
        "",
        "## The searches (median over seeds)",
        "",
        "| search | wall s | to the first trial s | trials | completed | pruned | diverged | wall s per full "
        "trial of examples |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in SEARCHES:
        rs = [by[(label, x)] for x in seeds]

        def med(f: Callable[[dict], float], rs: list[dict] = rs) -> float:
            return statistics.median(f(r) for r in rs)

        def count(state: str, rs: list[dict] = rs) -> float:
            return statistics.median(sum(t["state"] == state for t in r["trials"]) for r in rs)

        per = med(lambda r: r["seconds"] / max(sum(t["examples_seen"] for t in r["trials"]) / unit, 1e-9))
        lines.append(
            f"| {label} | {med(lambda r: r['seconds']):.1f} | {med(lambda r: r['first_start']):.1f} | "
            f"{med(lambda r: len(r['trials'])):g} | {count('COMPLETE'):g} | {count('PRUNED'):g} | "
            f"{count('DIVERGED'):g} | {per:.2f} |"
        )
    return lines


def _interpolation(surface: ReferenceSurface) -> list[str]:
    check = interpolation_check(surface)
    aligned = statistics.median(c[2] for c in check)
    same = statistics.median(c[3] for c in check)
    return [
        "",
        "## Check of the regret's interpolation",
        "",
        "Each inner grid momentum left out and its column predicted, near the floor (within 0.05 of the batch "
        "size's best), from its two neighbours (twice the spacing the regret reads over): the median "
        f"absolute error over the {len(check)} (B, m) columns is {aligned:.4f} val_loss read floor-aligned, as "
        f"the regret is, and {same:.4f} read at the same lr in both columns. Per column (B, m: aligned, "
        "same lr): " + "; ".join(f"{b}, {m:g}: {a:.3f}, {s:.3f}" for b, m, a, s in check) + ".",
    ]


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"development: {QUICK['seeds']} seeds, budget {QUICK['budget']:g}, no report file",
    )
    parser.add_argument("--seeds", type=int, help=f"default {FULL['seeds']}")
    parser.add_argument(
        "--budget", type=float, help=f"examples per search, in full trials (default {FULL['budget']:g})"
    )
    parser.add_argument("--step", type=float, default=2.0, help="seconds between scorings of each answer")
    parser.add_argument("--out", help=f"the report (default {OUTPUT.relative_to(HERE.parent)}; --quick: none)")
    parser.add_argument("--save-runs", default="", help="a JSON file to keep the runs in (for --rescore)")
    parser.add_argument("--rescore", default="", help="write the report from runs saved by --save-runs")
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    seeds, budget = args.seeds or mode["seeds"], args.budget or mode["budget"]
    out = args.out if args.out is not None else ("" if args.quick else str(OUTPUT))
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731 - progress, not the report
    warnings.filterwarnings("ignore")
    for name in ("mlflow", "mlflow.store.db.utils", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.ERROR)

    spec = se.bench_spec(load_spec(se.DEFAULT_SPEC))
    n_train = load_dataset(spec.workload).n_train
    if not any(
        p.exists() and json.loads(p.read_text()).get("key") == se.workload_key(spec)
        for p in (se.REFERENCE, se.REFERENCE.with_name(f"{se.REFERENCE.stem}-{se.workload_key(spec)}.json"))
    ):
        sys.exit(
            f"error: no cached reference for this workload (key {se.workload_key(spec)}) in "
            f"{se.REFERENCE.name}; this benchmark does not recompute it (run search_efficiency.py)"
        )
    ref = se.load_reference(spec, n_train, jobs=1, log=log)
    surface = ReferenceSurface(ref)
    load = os.getloadavg()[0]
    if args.rescore:
        saved = json.loads(Path(args.rescore).read_text())
        runs, budget, command, machine = saved["runs"], saved["budget"], saved["command"], saved["machine"]
    else:
        unit = se.trial_examples(spec, n_train)
        log(f"{len(SEARCHES)} searches x {seeds} seeds, {budget:g} full trials each, one at a time")
        t0 = time.perf_counter()
        runs = run_all(spec, list(range(seeds)), budget * unit, log)
        import torch

        command = " --quick" * args.quick + "".join(
            f" --{k} {v:g}" for k, v in (("seeds", args.seeds), ("budget", args.budget)) if v
        )
        machine = (
            f"{platform.machine()}, {os.cpu_count()} CPUs, device {pick_device(None).type}, torch "
            f"{torch.__version__}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; load "
            f"average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
            f"{(time.perf_counter() - t0) / 60:.0f} min with the warm-up"
        )
        if args.save_runs:
            Path(args.save_runs).write_text(
                json.dumps({"runs": runs, "budget": budget, "command": command, "machine": machine})
            )
    text = "\n".join(report(runs, spec, ref, budget, args.step, command, machine, surface)) + "\n"
    if out:
        Path(out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
