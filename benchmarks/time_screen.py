"""The screen of the candidates for the default search (time_to_answer.py --candidates-only at the selection
seeds): every candidate answered by analyze() and scored as in TIME.md, side by side, with no protocol. The
candidates that matter are then run at the reporting seeds against the protocol (TIME.md)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from searchbench import trial_examples  # benchmarks/, on the path when run as a script
from time_report import _curves, _fmt, _where_time_goes
from time_scoring import (
    OTHER_TARGETS,
    TARGETS,
    ReferenceSurface,
    describe_run,
    interpolation_check,
    median_bounds,
    needed,
    score_run,
    show,
)

from bstune.spec import StudySpec

ALL_TARGETS = tuple(dict.fromkeys((TARGETS, *OTHER_TARGETS)))  # the headline's first


def screen_report(runs: Sequence[dict[str, Any]], spec: StudySpec, ref: dict[str, Any], budget: float,
                  step: float, command: str, machine: str, surface: ReferenceSurface) -> list[str]:
    """The Markdown screen: per candidate, how often and how soon it had the answer, and its curve."""
    unit = trial_examples(spec, ref["n_train"])
    by = {(r["label"], r["seed"]): r for r in runs}
    labels = list(dict.fromkeys(r["label"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    scored = {(x, s): score_run(by[(x, s)], "analyze", spec, ref, surface, step) for x in labels for s in seeds}
    noise = statistics.median(c[2] for c in interpolation_check(surface))
    lines = [
        "# Screening the candidates for the default search",
        "",
        f"Written by `python benchmarks/time_to_answer.py{command}` ({machine}). The selection seeds "
        f"{', '.join(map(str, seeds))}, a budget of {budget:g} full trials each: the candidates are chosen here "
        "and reported on other seeds, against the protocol, in TIME.md. Every candidate is fused as bstune is "
        "and answered by `analyze()`; scored as in TIME.md (docs/time-to-answer.md).",
        "",
        *(f"- **{x}**: {describe_run(by[(x, seeds[0])])}." for x in labels),
        "",
        "## Time to the answer",
        "",
        "Per target (error <= octaves / regret <= val_loss): the seeds at which the candidate had the answer "
        "within its budget, and the median over seeds of the time it needed (>=: a bound, some seed never got "
        "there). Then the median over seeds of the final error / regret.",
        "",
        "| candidate | " + " | ".join(f"{e:g} / {r:g}" for e, r in ALL_TARGETS) + " | final |",
        "|---|" + "---:|" * (len(ALL_TARGETS) + 1),
    ]
    for x in labels:
        cells = []
        for targets in ALL_TARGETS:
            need = [needed(by[(x, s)], scored[(x, s)], unit, targets)[0] for s in seeds]
            got = sum(n[0] == n[1] for n in need)
            cells.append(f"{got}/{len(seeds)}, {show(median_bounds(need), 1)} s")
        err = statistics.median(scored[(x, s)][-1]["error"] for s in seeds)
        reg = statistics.median(scored[(x, s)][-1]["regret"] for s in seeds)
        lines.append(f"| {x} | " + " | ".join(cells) + f" | {_fmt(err, 2)} / {_fmt(reg, 4)} |")
    lines += _curves(scored, by, seeds, noise)
    lines += _where_time_goes(by, seeds, unit)
    lines += ["", f"(first target: error <= {TARGETS[0]:g}, regret <= {TARGETS[1]:g}; noise {noise:.4f}; "
              f"{math.fsum(r['seconds'] for r in runs) / 60:.0f} min of searches)"]
    return lines
