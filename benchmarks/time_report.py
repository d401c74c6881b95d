"""TIME.md, written from time_to_answer.py's runs. The account is docs/time-to-answer.md."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from searchbench import GRID_LOG2_EFF, GRID_MOMENTA, REFERENCE, trial_examples, value_at  # benchmarks/ on the path
from time_scoring import (
    ERROR_TARGET,
    OTHER_TARGETS,
    REGRET_TARGET,
    ROWS,
    SCORING_N_BOOT,
    SEARCHES,
    ReferenceSurface,
    got_there,
    interpolation_check,
    median_bounds,
    median_ratio,
    needs_at,
    one_seed_limit,
    ratio,
    same_as_default,
    score,
    score_run,
    show,
    spread,
    under,
)

from bstune.spec import StudySpec


def _at(points: Sequence[dict[str, Any]], t: float, key: str) -> float:
    """A row's score at time t: its last scoring at or before t (its final one after its end)."""
    return value_at(points, t, key, axis="t")


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
    unit = trial_examples(spec, ref["n_train"])
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
    lines = _methods(runs, scored, spec, ref, budget, step, command, machine, fuse)
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


def _methods(runs: Sequence[dict[str, Any]], scored: dict, spec: StudySpec, ref: dict[str, Any], budget: float,
             step: float, command: str, machine: str, fuse: int) -> list[str]:
    """The title and how the searches were run and scored."""
    unit = trial_examples(spec, ref["n_train"])
    by = {(r["label"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
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
        f"- **Reference**: the cached grid of `benchmarks/{REFERENCE.name}` ({ref['n_trials']} trials, "
        f"effective lr 2^{GRID_LOG2_EFF[0]:g}..2^{GRID_LOG2_EFF[-1]:g} in half octaves x momentum "
        f"{', '.join(f'{m:g}' for m in GRID_MOMENTA)}, training seeds none of the searches uses). The regret "
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
