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
    SCORING_N_BOOT,
    ReferenceSurface,
    candidates,
    describe_run,
    got_there,
    interpolation_check,
    median_bounds,
    median_ratio,
    needs_at,
    one_seed_limit,
    ratio,
    rows_of,
    same_as_default,
    score,
    score_run,
    seed_role,
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


def _rows(need: dict) -> list[str]:
    """The rows scored, in order, from a dict keyed by (row, seed)."""
    return list(dict.fromkeys(row for row, _ in need))


def _components_of(need: dict) -> list[tuple[str, str, str]]:
    """The parts whose two rows were both run (bstune --fuse 1 only where asked for)."""
    rows = set(_rows(need))
    return [c for c in COMPONENTS if c[0] in rows and c[1] in rows]

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
        for row, src, answer in rows_of(list(dict.fromkeys(r["label"] for r in runs)))
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
    lines += _curves(scored, by, seeds, statistics.median(c[2] for c in interpolation_check(surface)))
    lines += _other_targets(others, seeds)
    lines += _one_seed(spec, ref, surface)
    lines += _where_time_goes(by, seeds, unit)
    lines += _interpolation(surface)
    median = median_ratio(need, "protocol", "bstune", seeds)
    lines += ["", f"time ratio (protocol / bstune): {show(median) if median != (0.0, math.inf) else 'undefined'}"]
    return lines


def _methods(runs: Sequence[dict[str, Any]], scored: dict, spec: StudySpec, ref: dict[str, Any], budget: float,
             step: float, command: str, machine: str, fuse: int) -> list[str]:
    """The title and how the searches were run and scored (the whole account: docs/time-to-answer.md)."""
    unit = trial_examples(spec, ref["n_train"])
    by = {(r["label"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    w, s = spec.workload, spec.search
    clamped = sum(p["clamped"] for pts in scored.values() for p in pts)
    readings = sum(len(ref["per_batch"]) for pts in scored.values() for p in pts if math.isfinite(p["regret"]))
    same = sum(same_as_default(r, spec, ref["n_train"]) for r in runs)
    protocol_trials = statistics.median(len(by[("protocol", x)]["trials"]) for x in seeds)
    return [
        "# Time to a trustworthy answer: bstune against the standard protocol, end to end",
        "",
        f"Written by `python benchmarks/time_to_answer.py{command}` ({machine}; the {len(runs)} searches ran "
        f"{sum(r['seconds'] for r in runs) / 60:.0f} min in all, one at a time). How it is run and scored, at "
        "length: docs/time-to-answer.md.",
        "",
        f"- **Workload**: that of `benchmarks/search_efficiency.py` (SEARCH.md): {w.dataset} (n_train "
        f"{ref['n_train']}), {w.model} width {w.width}, {w.optimizer}, {w.epochs} epochs, {w.lr_schedule} "
        f"schedule, objective {s.objective}; batch sizes {', '.join(map(str, s.batch_sizes))}; lr "
        f"{s.lr[0]:g}..{s.lr[1]:g}, momentum {s.momentum[0]:g}..{s.momentum[1]:g}.",
        "- **protocol** (Shallue et al. 2018): scrambled Sobol (lr, momentum), an independent sequence per batch "
        "size, one trial at a time, no pruning; its answer at each batch size is the best trial so far. "
        "*protocol + analyze()*: the same runs answered by `analyze()`.",
        f"- **bstune**: the search of `studies/digits.yaml` as shipped: {describe_run(by[('bstune', seeds[0])])}"
        f"{' (chosen by the screen, TIME-SCREEN.md; it replaced law+median)' if '--shipped' in command else ''}"
        f", trials fused {fuse} at a "
        "time (the default for this device and model); its answer is `analyze()`'s lr* and m* per batch size."
        + "".join(f" *{x}*: {describe_run(by[(x, seeds[0])])}, answered the same way." for x in candidates(runs)),
        f"- **Budget**: every search {budget:g} full trials' worth of examples ({w.epochs} epochs x "
        f"{ref['n_train']} = {unit:,} a full trial), counted as processed (a pruned trial counts the epochs it "
        f"ran). A search has the answer only if it keeps it to the end of that budget. The protocol ran "
        f"{protocol_trials:g} trials (median), about {protocol_trials / len(s.batch_sizes):.0f} per batch size.",
        f"- **Seeds** {', '.join(map(str, seeds))}: {seed_role(seeds)} Seed k is the sampler seed of every "
        f"search; every trial trains at the spec's training seed ({spec.workload.seed}), which the reference "
        "does not use.",
        "- **Clock**: every search through bstune's real `run_study`, fresh Optuna and MLflow SQLite stores in a "
        "temporary folder, one search at a time in one process (the order reversed every other seed), after a "
        "short unmeasured warm-up of each; wall time from the call of `run_study`."
        + (" **Scored against CPU seconds**: the clock is the CPU time of the search's process (user + system, "
           "every thread: `resource.getrusage`) since the call of `run_study`, because the machine was shared "
           "(the load average at each search's start is in \"The searches\" below) and wall seconds measured the "
           "other jobs as much as the search; every \"wall s\" and \"time\" below reads CPU seconds."
           if "--clock cpu" in command else ""),
        f"- **Scoring**, offline, every {step:g} s of each search's clock from the trials finished by then: "
        "**lr error**, |log2(lr / reference lr* at the answer's momentum)|, octaves; **regret**, the "
        f"reference's val_loss (mean over its {len(ref['seeds'])} training seeds) at the answer's (lr, m) minus "
        "the grid's best; each a mean over the batch sizes. A row **has the answer** from the first scoring "
        f"after which error <= {ERROR_TARGET:g} octave AND regret <= {REGRET_TARGET:g} hold to the end of its "
        "budget; one that does not hold them at its end never got there (a bound, shown >=).",
        f"- **Reference**: `benchmarks/{REFERENCE.name}` ({ref['n_trials']} trials, effective lr "
        f"2^{GRID_LOG2_EFF[0]:g}..2^{GRID_LOG2_EFF[-1]:g} in half octaves x momentum "
        f"{', '.join(f'{m:g}' for m in GRID_MOMENTA)}), read between grid points along the valley floor (the "
        f"check at the end); {clamped} of {readings} readings fell outside the grid and were read at its edge.",
        f"- **analyze()** scores with {SCORING_N_BOOT} bootstrap resamples (they make its intervals, not its lr* "
        f"and m*): on all of each search's trials the answers were the same as with 200 at {same} of "
        f"{len(runs)} searches.",
    ]


def _other_targets(others: dict[tuple[float, float], dict], seeds: Sequence[int]) -> list[str]:
    rows = _rows(next(iter(others.values())))
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
    for a, b, what in _components_of(need):
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
    for row in _rows(need):
        secs = [need[(row, x)][0] for x in seeds]
        exs = [need[(row, x)][1] for x in seeds]
        got = got_there(need, row, seeds)
        tr = median_ratio(need, "protocol", row, seeds)
        er = median_ratio(need, "protocol", row, seeds, k=1)
        lines.append(f"| {row} | {spread(secs)} | {spread(exs)} | {got}/{len(seeds)} | {show(tr)} | {show(er)} |")
    return lines


def _per_seed(need: dict, seeds: Sequence[int]) -> list[str]:
    rows = _rows(need)
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
    for a, b, what in _components_of(need):
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


def _curves(scored: dict, by: dict, seeds: Sequence[int], noise: float) -> list[str]:
    end = max(r["seconds"] for r in by.values())
    marks = [
        m for m in (5, 10, 15, 20, 30, 45, 60, 75, 90, 120, 150, 180, 240, 300, 360, 480, 600, 900, 1200) if m < end
    ] + [math.ceil(end)]
    rows = _rows(scored)
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
        cells = [f"{_fmt(_median_at(scored, row, seeds, t, 'error'), 2)} / "
                 f"{_fmt(_median_at(scored, row, seeds, t, 'regret'), 4)}" for row in rows]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Does the answer get worse as the search spends? From the first time the median curve is under both "
        f"targets (error <= {ERROR_TARGET:g}, regret <= {REGRET_TARGET:g}) to the end, the most each median rose "
        "above its value then, and where it ended (regret; lr error in octaves). The scorer's noise on the "
        f"regret is {noise:.4f} (the interpolation's median error, the check at the end: a rise below it is not "
        "told from the scorer's own error); on the lr error, a quarter octave (the reference's lr* is read to "
        "within half a grid step of half an octave).",
        "",
        "| row | first under both (s) | regret then | most rise after | at the end | error then | most rise "
        "after | at the end | rises beyond the noise |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(_rise_row(scored, row, seeds, end, noise))
    return lines


def _median_at(scored: dict, row: str, seeds: Sequence[int], t: float, key: str) -> float:
    return statistics.median(_at(scored[(row, x)], t, key) for x in seeds)


def _rise_row(scored: dict, row: str, seeds: Sequence[int], end: float, noise: float) -> str:
    """One row of the rise table: the median curves on a 1 s grid from their first answer to the end."""
    times = [float(t) for t in range(1, math.ceil(end) + 1)]
    curve = [(t, _median_at(scored, row, seeds, t, "error"), _median_at(scored, row, seeds, t, "regret"))
             for t in times]
    first = next((i for i, (_, e, r) in enumerate(curve) if e <= ERROR_TARGET and r <= REGRET_TARGET), None)
    if first is None:
        return f"| {row} | never | | | | | | | - |"
    t0, e0, r0 = curve[first]
    rise_r = max(r for _, _, r in curve[first:]) - r0
    rise_e = max(e for _, e, _ in curve[first:]) - e0
    worse = [w for w, v, n in (("regret", rise_r, noise), ("lr error", rise_e, 0.25)) if v > n]
    return (f"| {row} | {t0:g} | {r0:.4f} | {rise_r:.4f} | {curve[-1][2]:.4f} | {e0:.2f} | {rise_e:.2f} | "
            f"{curve[-1][1]:.2f} | {', '.join(worse) or 'no'} |")


def _where_time_goes(by: dict, seeds: Sequence[int], unit: float) -> list[str]:
    lines = [
        "",
        "## The searches (median over seeds)",
        "",
        "| search | wall s | CPU s | load average at its start | to the first trial s | trials | completed | "
        "pruned | diverged | wall s per full trial of examples |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in dict.fromkeys(label for label, _ in by):
        rs = [by[(label, x)] for x in seeds]

        def med(f: Callable[[dict], float], rs: list[dict] = rs) -> float:
            return statistics.median(f(r) for r in rs)

        def count(state: str, rs: list[dict] = rs) -> float:
            return statistics.median(sum(t["state"] == state for t in r["trials"]) for r in rs)

        per = med(lambda r: r["seconds"] / max(sum(t["examples_seen"] for t in r["trials"]) / unit, 1e-9))
        lines.append(
            f"| {label} | {med(lambda r: r['seconds']):.1f} | {med(lambda r: r.get('cpu', math.nan)):.1f} | "
            f"{med(lambda r: r.get('load', [math.nan])[0]):.1f} | {med(lambda r: r['first_start']):.1f} | "
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
