"""SEARCH.md, written from search_efficiency.py's runs. The account is docs/search-efficiency.md."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from search_scoring import (  # benchmarks/, on the path when run as a script
    BASELINES,
    COMPARE,
    FLOOR_DRAWS,
    ORACLE_BAND,
    ORACLE_ORDERS,
    OTHER_TARGETS,
    TARGET,
    compute_to_target,
    seed_limit,
)
from searchbench import GRID_LOG2_EFF, GRID_MOMENTA, REFERENCE, fmt, summary, value_at

from bstune.spec import StudySpec


def report(runs: Sequence[dict[str, Any]], ref: dict[str, Any], spec: StudySpec, budget: float, seeds: Sequence[int],
           unit: int, command: str = "", floor_rows: Sequence[dict[str, Any]] = (),
           oracle: Sequence[tuple[float, float]] = ()) -> list[str]:
    """The Markdown report; its last line is the median compute ratio."""
    by = {(r["label"], r["seed"]): r["points"] for r in runs}
    extra = [x for x in COMPARE if any(r["label"] == x for r in runs)]
    labels = ["bstune", "protocol", *extra]
    lines = _methods(runs, ref, spec, budget, seeds, unit, command, extra)
    lines += _against_compute(by, labels, spec, budget, seeds)
    to_target, median = _to_target(by, labels, extra, spec, budget, seeds)
    lines += to_target
    if floor_rows:
        lines += _floor_section(floor_rows, ref, spec)
    if oracle:
        lines += _oracle_section(oracle, by, ref, budget, seeds)
    lines += ["", f"compute ratio (protocol / bstune): {median:.2f}"]
    return lines


def _methods(runs: Sequence[dict[str, Any]], ref: dict[str, Any], spec: StudySpec, budget: float,
             seeds: Sequence[int], unit: int, command: str, extra: Sequence[str]) -> list[str]:
    """The title, how the runs were made and scored, and the reference optimum."""
    w, s = spec.workload, spec.search
    spread = float(np.mean([math.log2(v[3] / v[2]) for r in ref["per_batch"].values() for v in r["valley"]]))
    n_seeds = len(ref["seeds"])
    lines = [
        "# Search efficiency: bstune's search against the standard protocol",
        "",
        f"Written by `python benchmarks/search_efficiency.py{command}` ({platform.machine()}, {os.cpu_count()} "
        f"CPUs, Python {platform.python_version()}; the searches ran {sum(r['seconds'] for r in runs) / 60:.0f} min "
        "in all, two at a time on a machine shared with other work).",
        "",
        f"- **Workload** (the same for both searches): {w.dataset} (n_train {ref['n_train']}), {w.model} width "
        f"{w.width}, {w.optimizer}, {w.epochs} epochs, {w.lr_schedule} schedule, objective {s.objective}; batch "
        f"sizes {', '.join(map(str, s.batch_sizes))}; lr {s.lr[0]:g}..{s.lr[1]:g} (log-uniform), momentum "
        f"{s.momentum[0]:g}..{s.momentum[1]:g} (log-uniform on 1 - m). This is `studies/digits.yaml` without "
        "B = 16 (which alone costs as much as the other five batch sizes together) and with the gradient "
        "diagnostics off (they only observe).",
        f"- **bstune**: the search of `studies/digits.yaml`: sampler `{s.sampler.name}` "
        f"(n_startup_trials {s.sampler.n_startup_trials}), pruner `{s.pruner.name}` per batch size, each trial at "
        "the least-covered batch size.",
        "- **protocol** (Shallue et al. 2018): scrambled Sobol (lr, momentum), an independent sequence per batch "
        "size, no pruning, the same allocation over batch sizes.",
        f"- **Seeds** {', '.join(map(str, seeds))}: seed k sets the training seed (initial weights, data order) "
        "and the sampler seed of both searches.",
        f"- **Compute**: examples processed, counted in full trials ({w.epochs} epochs x {ref['n_train']} = "
        f"{unit:,} examples); both searches get {budget:g} full trials' worth ({budget * unit:,.0f} examples).",
        "- **Quantity**: lr*(B) as `analyze()` gives it on the trials run so far (identically for both "
        "searches): per batch size an lr and a momentum m*. With momentum searched the valley's floor runs "
        "through (lr, m): at B = 32 along lr/(1 - m), at B = 512 (36 optimizer steps a run) along the "
        "plain lr, so trials at m = 0.5 and 0.9 on the floor score alike and no single lr* or lr/(1 - m) is "
        "*the* optimum; what must be right is the lr for the momentum the analysis recommends. Error = mean "
        "over the batch sizes of |log2(lr* / reference lr* at m*)|, in octaves, the reference's lr* at m* "
        "read off its valley floor (below); undefined (-) until `analyze()` gives every batch size an "
        "estimate, which takes 2 completed trials at each and 3 more (the batch sizes' valleys are fitted "
        f"together): {len(s.batch_sizes) * 2 + 3} full trials at the least, for any search. The error of the "
        "effective lr* lr/(1 - m) against the reference's effective lr* (at its best momentum) is shown too; "
        "it charges a search for choosing a different, equally good, momentum.",
        f"- **Reference**: a dense grid run once ({ref['n_trials']} trials: effective lr "
        f"2^{GRID_LOG2_EFF[0]:g}..2^{GRID_LOG2_EFF[-1]:g} in half octaves x momentum "
        f"{', '.join(f'{m:g}' for m in GRID_MOMENTA)}, inside the searched lr range, at training seeds "
        f"{', '.join(map(str, ref['seeds']))}, which no search uses), cached in `benchmarks/{REFERENCE.name}`. "
        f"Its optimum is read off the grid, not fitted: at each momentum, the lr with the best {s.objective} "
        f"averaged over the {n_seeds} training seeds, moved to the vertex of the parabola through it and its two "
        "neighbours (half an octave each side). The best value's gap: the best "
        f"{s.objective} a search has found at each batch size minus the best grid point's (averaged over the "
        "training seeds), averaged over the batch sizes; negative where a search beat the grid.",
        "",
        "## Reference optimum",
        "",
        "The valley floor: lr* at each momentum of the grid (where the best lr is inside the grid; between the "
        "momenta, interpolated in log2 lr against log2(1 - m)). The valley is flat at the bottom: the same "
        f"reading on one training seed's grid alone lands {spread:.1f} octaves apart from seed to seed on average "
        "(the range over the seeds). The last columns: the momentum with the best value, and its effective lr*.",
        "",
        "| B | " + " | ".join(f"lr* at m = {m:g}" for m in GRID_MOMENTA)
        + " | best m | effective lr* there | best grid value |",
        "|---:|" + "---:|" * (len(GRID_MOMENTA) + 3),
    ]
    for b, r in ref["per_batch"].items():
        at = {v[0]: f"{v[1]:.3g} ({v[2]:.3g}..{v[3]:.3g})" for v in r["valley"]}
        lines.append(f"| {b} | " + " | ".join(at.get(m, "-") for m in GRID_MOMENTA)
                     + f" | {r['momentum']:g} | {r['effective_lr']:.3g} | {r['best_grid_value']:.4f} |")
    for x in reversed(extra):
        lines.insert(lines.index("## Reference optimum") - 1,
                     f"- **{x}** (for comparison, not in the ratio): {COMPARE[x][1]}.")
    return lines


def _against_compute(by: dict[tuple[str, int], Any], labels: Sequence[str], spec: StudySpec, budget: float,
                     seeds: Sequence[int]) -> list[str]:
    """The errors and the best-value gap of every search at marks of compute."""
    s = spec.search
    lines = [
        "",
        f"## Against compute (median over {len(seeds)} seeds [min, max])",
    ]
    marks = [c for c in (5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100, 120, 140, 160, 180, 200)
             if c <= budget] + ([budget] if budget % 10 else [])
    for key, nd, title in (("error", 2, "Error of lr* at the recommended momentum (octaves):"),
                           ("eff_error", 2, "Error of the effective lr* (octaves; for comparison):"),
                           ("gap", 4, f"Best-value gap ({s.objective}):")):
        lines += ["", title, "", "| compute (full trials) | " + " | ".join(labels) + " |",
                  "|---:|" + "---|" * len(labels)]
        for c in marks:
            row = [f"{c:g}"] + [summary([value_at(by[(label, seed)], c, key) for seed in seeds], nd)
                                for label in labels]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _to_target(by: dict[tuple[str, int], Any], labels: Sequence[str], extra: Sequence[str], spec: StudySpec,
               budget: float, seeds: Sequence[int]) -> tuple[list[str], float]:
    """Compute to the target per seed, the median ratios, and the same at other targets; and the headline."""
    s = spec.search
    lines: list[str] = []
    floor = len(s.batch_sizes) * 2 + 3
    lines += [
        "",
        f"## Compute to bring the error under {TARGET:g} octave (a factor of sqrt(2))",
        "",
        "*first*: the first evaluation (every 2.5 full trials) with the error under it; *kept*: the one from "
        "which it stays under it to the end of the run. The ratio uses *kept*; a search that never gets there "
        f"counts as needing the whole budget ({budget:g}), which makes its ratio a bound. No search can get "
        f"there before {floor} full trials (2 completed trials at each batch size, {floor} in all), so a "
        f"protocol that needs P full trials caps the ratio at P / {floor}.",
        "",
        "| seed | " + " | ".join(f"{x} first | {x} kept" for x in labels) + " | ratio (protocol / bstune) |"
        + "".join(f" ratio (protocol / {x}) |" for x in extra),
        "|---:|" + "---:|" * (3 * len(labels) - 1),
    ]
    ratios: dict[str, list[float]] = {x: [] for x in ["bstune", *extra]}
    for seed in seeds:
        hits = {x: compute_to_target(by[(x, seed)]) for x in labels}
        row = [str(seed)] + [f"{fmt(hits[x][0], 1)} | {fmt(hits[x][1], 1)}" for x in labels]
        for x in ratios:
            ratio, text = _ratio(hits["protocol"][1], hits[x][1], budget)
            row.append(text)
            ratios[x].append(ratio)
        lines.append("| " + " | ".join(row) + " |")
    medians = {x: statistics.median([r for r in rs if math.isfinite(r)] or [math.nan]) for x, rs in ratios.items()}
    median = medians["bstune"]
    kept = _median_kept(by, "protocol", seeds, budget)
    eff_median = _median_ratio(by, "protocol", "bstune", seeds, budget, key="eff_error")
    lines += [
        "",
        f"The protocol's median *kept*: {kept:.1f} full trials (so here the ratio cannot exceed {kept / floor:.1f}). "
        f"Measured on the effective lr* instead, the median ratio is {eff_median:.2f}."
        + ("".join(f" The median ratio of {x}: {medians[x]:.2f}." for x in extra) if extra else ""),
    ]
    for x, base in BASELINES.items():
        if x in extra and base in extra:
            lines[-1] += (f" Against {base} instead (the protocol at the same held momentum), {x}'s median "
                          f"ratio is {_median_ratio(by, base, x, seeds, budget):.2f}: what its sampler and pruner "
                          "buy where neither search has a momentum to find.")
    lines += [
        "",
        f"At other targets (for comparison; the ratio above is at {TARGET:g}): the median *kept* of each search "
        "and the median ratio to the protocol, from the same runs.",
        "",
        "| target (octaves) | protocol kept | " + " | ".join(f"{x} kept | ratio (protocol / {x})"
                                                         for x in ratios) + " |",
        "|---:|---:|" + "---:|" * (2 * len(ratios)),
    ]
    for t in OTHER_TARGETS:
        row = [f"{t:g}", f"{_median_kept(by, 'protocol', seeds, budget, t):.1f}"]
        for x in ratios:
            row.append(f"{_median_kept(by, x, seeds, budget, t):.1f} | "
                       f"{_median_ratio(by, 'protocol', x, seeds, budget, t):.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines, median


def _floor_section(floor_rows: Sequence[dict[str, Any]], ref: dict[str, Any], spec: StudySpec) -> list[str]:
    """What the estimator allows: analyze() on trials drawn from the reference grid."""
    s = spec.search
    read, fitted = seed_limit(ref, spec)
    lines = [
        "",
        "## What the estimator allows",
        "",
        "`analyze()` on n completed trials per batch size drawn from the reference grid itself (one training "
        f"seed per draw, as a search has; {FLOOR_DRAWS} draws): *oracle*, within {ORACLE_BAND:g} octaves of "
        "the reference's valley floor at the trial's momentum, as well placed as a search could place them; "
        "*anywhere*, any grid point, as the protocol's trials fall. No training: this is the error that "
        "the estimate keeps however the trials were chosen, and the compute no search can go below. For "
        "scale, on one training seed's whole grid (about a hundred trials per batch size), in the median "
        f"over the reference's {len(read)} seeds: the grid's own optimum read off it (no model) misses the "
        f"reference by {statistics.median(read):.2f} octave; `analyze()` on it, by "
        f"{statistics.median(fitted):.2f}: the difference is what the valley model costs.",
        "",
        "| trials per batch size | full trials | oracle: median error | oracle: under 0.5 | anywhere: median "
        "error | anywhere: under 0.5 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in floor_rows:
        n = row["per_batch"]
        (om, oshare), (am, ashare) = row["oracle"], row["anywhere"]
        lines.append(f"| {n} | {n * len(s.batch_sizes)} | {fmt(om)} | {oshare:.0%} | {fmt(am)} | {ashare:.0%} |")
    return lines


def _oracle_section(oracle: Sequence[tuple[float, float]], by: dict[tuple[str, int], Any], ref: dict[str, Any],
                    budget: float, seeds: Sequence[int]) -> list[str]:
    """A search that knows where the floor is, replayed from the reference grid."""
    kept = _median_kept(by, "protocol", seeds, budget)
    first = [min(f, budget) for f, _ in oracle]
    held = [min(k, budget) for _, k in oracle]
    ours = _median_kept(by, "bstune", seeds, budget)
    early = statistics.median(min(compute_to_target(by[("protocol", x)])[0], budget) for x in seeds)
    lines = [
        "",
        "## A search that knows where the floor is",
        "",
        "A search that knows the reference's valley floor in advance and places every trial within "
        f"{ORACLE_BAND:g} octaves of it, at no cost, replayed from the reference grid: per training seed "
        f"of the reference, that seed's grid points in {ORACLE_ORDERS} random orders, the batch sizes in "
        f"turn, {budget:g} trials of the full length, scored like the searches every 2.5 full trials "
        f"against the reference made of the other {len(ref['seeds']) - 1} seeds ({len(oracle)} runs). It "
        f"brings the error under {TARGET:g} at the first evaluation possible or nearly (*first*, median "
        f"[min, max]: {summary(first, 1)} full trials), but keeps it there only from "
        f"{statistics.median(held):.1f} (*kept*: {summary(held, 1)}, counting the budget where it never "
        "does): with every trial on the floor the error goes on wandering about the target, as one "
        "training seed's optimum, and the fit to it, lie that far from the mean over seeds. Against the "
        f"protocol's median *kept* ({kept:.1f}) that is a ratio of {kept / statistics.median(held):.2f}; "
        f"on *first* (the protocol's median {early:.1f}), {early / statistics.median(first):.2f}. "
        "Not a bound on every search: this one spreads its trials over the whole floor, all momenta, "
        "and the estimate reads one momentum's line of it better (`--compare m=0.9`, which does not "
        "search momentum); but a measure of what a search over lr and momentum gets from this estimate "
        f"and target. bstune's own median *kept* above is {ours:.1f}.",
    ]
    return lines


def _median_kept(by: dict[tuple[str, int], Any], label: str, seeds: Sequence[int], budget: float,
                 target: float = TARGET) -> float:
    """The median over seeds of a search's *kept* compute, the budget where it never gets there."""
    return statistics.median(min(compute_to_target(by[(label, x)], target)[1], budget) for x in seeds)


def _median_ratio(by: dict[tuple[str, int], Any], base: str, label: str, seeds: Sequence[int], budget: float,
                  target: float = TARGET, key: str = "error") -> float:
    """The median over seeds of base's *kept* compute over label's (seeds where neither gets there left out)."""
    ratios = [_ratio(compute_to_target(by[(base, x)], target, key)[1],
                     compute_to_target(by[(label, x)], target, key)[1], budget)[0] for x in seeds]
    return statistics.median([r for r in ratios if math.isfinite(r)] or [math.nan])


def _ratio(protocol: float, search: float, budget: float) -> tuple[float, str]:
    """protocol / search compute, each capped at the budget; marked as a bound where one never got there."""
    if not math.isfinite(protocol) and not math.isfinite(search):
        return math.nan, "-"
    ratio = min(protocol, budget) / min(search, budget)
    bound = ">=" if not math.isfinite(protocol) else "<=" if not math.isfinite(search) else ""
    return ratio, f"{bound}{ratio:.2f}"
