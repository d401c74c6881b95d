"""time_to_answer.py's scoring: the reference's surface between grid points, a search's answer (the best trial's
or analyze()'s) scored by lr error and regret every few seconds of its clock, the time it had the answer, and
bounds on ratios where a search never got there. The account is docs/time-to-answer.md."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from searchbench import GRID_MOMENTA, reference_lr, trial_table  # benchmarks/, on the path when run as a script

from bstune.analysis import analyze
from bstune.errors import BstuneError
from bstune.spec import Search, StudySpec
from bstune.trials import TrialTable

ERROR_TARGET = 0.5  # octaves, mean over the batch sizes
# val_loss, mean over the batch sizes: twice the scorer's own floor (the reference optimum reads 0.0042, the
# interpolation errs by 0.0078) and about one run's seed noise near the optimum (0.01); 0.01 sits on the floor
REGRET_TARGET = 0.02
TARGETS = (ERROR_TARGET, REGRET_TARGET)
# Shown beside the targets, from the same runs (not in the ratio): whether the ratio depends on where the bar is.
OTHER_TARGETS = ((0.5, 0.01), (0.5, 0.02), (0.75, 0.02), (0.5, 0.03), (1.0, 0.05))
# The searches always run; time_to_answer.py adds candidates and the one-trial-at-a-time component.
SEARCHES = ("protocol", "bstune", "bstune --fuse 1")
FIXED_ROWS = (("protocol", "protocol", "best"), ("bstune", "bstune", "analyze"),
              ("protocol + analyze()", "protocol", "analyze"))


def rows_of(labels: Sequence[str]) -> tuple[tuple[str, str, str], ...]:
    """The rows scored from the searches run (by their labels): (row, search whose trials it reads, how it
    answers). The protocol's trials make two rows (best trial, analyze()); every other search's, one."""
    return FIXED_ROWS + tuple((x, x, "analyze") for x in labels if x not in ("protocol", "bstune"))


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
            for m in GRID_MOMENTA:
                column = [x for x in rows if x["momentum"] == m]
                if not column:
                    continue
                lrs = sorted({x["lr"] for x in column})
                values = {(x["lr"], x["seed"]): sign * x["value"] if x["value"] is not None else worst for x in column}
                y = np.array([np.mean([values.get((lr, s), worst) for s in ref["seeds"]]) for lr in lrs])
                cols.append((m, np.log2(lrs), y, math.log2(reference_lr(r, m))))
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
        offset = math.log2(lr) - math.log2(reference_lr(self.ref["per_batch"][str(b)], m))
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
    table = trial_table(run["trials"], spec, n_train)
    return analyze_answers(table) == analyze_answers(table, n_boot=200)


def score(answers: Answers, ref: dict[str, Any], surface: ReferenceSurface) -> dict[str, Any]:
    """Mean lr error (octaves) and mean regret over the reference's batch sizes; inf while one has no answer."""
    errors, regrets, clamped = [], [], 0
    for b_key, r in ref["per_batch"].items():
        a = answers.get(int(b_key))
        if a is None:
            return {"error": math.inf, "regret": math.inf, "clamped": 0}
        lr, m = a
        errors.append(abs(math.log2(lr / reference_lr(r, m))))
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
            table = trial_table(trials[:n], spec, ref["n_train"])
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
    labels = list(dict.fromkeys(label for label, _ in by))
    return {(row, x): needed(by[(src, x)], scored[(row, x)], unit, targets)
            for row, src, _ in rows_of(labels) for x in seeds}


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



def one_seed_limit(spec: StudySpec, ref: dict[str, Any], surface: ReferenceSurface) -> list[dict[str, Any]]:
    """Per training seed of the reference, the answers read off that seed's whole grid (about a hundred trials
    per batch size, placed on a dense grid: more than any search here runs) by the best trial and by
    ``analyze()``, scored like the searches' (against the reference, of which this seed is one of eight): how
    close a search with one training seed can get."""
    out = []
    for seed in ref["seeds"]:
        table = trial_table([r for r in ref["rows"] if r["seed"] == seed], spec, ref["n_train"])
        out.append({"seed": seed} | {name: score(ANSWER[name](table), ref, surface) for name in ("best", "analyze")})
    return out


# The seeds the candidates were screened on (benchmarks/TIME-SCREEN.md); TIME.md reports on others.
SELECTION_SEEDS = (0, 1, 2)
FIXED_SEARCHES = ("protocol", "bstune", "bstune --fuse 1")


def describe(s: Search) -> str:
    """A search's sampler and pruner in words."""
    sampler = (f"sampler `{s.sampler.name}`" + (" (Sobol, its own sequence per batch size)" if s.sampler.name == "qmc"
               else f" (n_startup_trials {s.sampler.n_startup_trials})"))
    p = s.pruner
    pruner = {"none": "no pruning",
              "dead": f"pruner `dead` (only trials at chance level or not finite after {p.n_warmup_epochs} epochs)",
              }.get(p.name, f"pruner `{p.name}` within a batch size (n_startup_trials {p.n_startup_trials}, "
                            f"n_warmup_epochs {p.n_warmup_epochs})")
    return f"{sampler}, {pruner}"


def describe_run(run: dict[str, Any]) -> str:
    return run.get("search", run["label"])


def candidates(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The searches run beside the fixed ones, in the order run."""
    return [x for x in dict.fromkeys(r["label"] for r in runs) if x not in FIXED_SEARCHES]


def seed_role(seeds: Sequence[int]) -> str:
    if set(seeds) & set(SELECTION_SEEDS):
        return (f"the selection seeds ({', '.join(map(str, SELECTION_SEEDS))}): the candidates are screened on "
                "them; what is reported (TIME.md) is measured at other seeds.")
    return (f"the reporting seeds, kept apart from the selection seeds ({', '.join(map(str, SELECTION_SEEDS))}) "
            "on which the candidates were screened (benchmarks/TIME-SCREEN.md): nothing was chosen on these.")
