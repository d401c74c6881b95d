"""search_efficiency.py's searches and how they are scored: the searches compared (COMPARE), analyze()'s error
against the reference every few full trials of compute, and what the estimator allows (trials drawn from the
reference grid, a search that knows the floor). The account is docs/search-efficiency.md."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from searchbench import (  # benchmarks/, on the path when run as a script
    REFERENCE_SEEDS,
    column_optimum,
    column_profile,
    protocol_spec,
    reference_lr,
    summarize_reference,
    trial_table,
    workload_key,
)

from bstune.analysis import analyze
from bstune.errors import BstuneError
from bstune.spec import StudySpec
from bstune.trials import TrialRecord, TrialTable

TARGET = 0.5  # octaves of mean |log2(eff lr* / reference)|: a factor of sqrt(2)
OTHER_TARGETS = (0.4, 0.5, 0.6, 0.75, 1.0)  # shown beside it: whether the ratio depends on where the bar is
STEP = 2.5  # full trials of compute between evaluations of the error

# ------------------------------------------------------------------------------------------ searches


# Other searches that --compare can measure beside the two (not in the ratio): (sampler, n_startup_trials,
# pruner, pruner n_startup_trials, n_warmup_epochs) and what they are.
COMPARE = {
    "tpe+median": (("tpe", 4, "median", 3, 3), "the search `studies/digits.yaml` had before the law sampler: "
                   "TPE per batch size (n_startup_trials 4), median pruning per batch size (n_startup_trials 3, "
                   "n_warmup_epochs 3)"),
    "law+none": (("law", 2, "none", 3, 3), "the law sampler (n_startup_trials 2) without pruning"),
    "law+p75": (("law", 2, "percentile", 3, 4), "the law sampler (n_startup_trials 2) with percentile pruning "
                "per batch size (keeps the best 75%; n_startup_trials 3, n_warmup_epochs 4)"),
    "law+median": (("law", 2, "median", 3, 4), "the law sampler (n_startup_trials 2) with median pruning per "
                   "batch size (n_startup_trials 3, n_warmup_epochs 4)"),
    # momentum not searched: scored like the others, at the one momentum it has
    "m=0.9": (("law", 2, "median", 3, 4, 0.9), "the default search with the momentum held at 0.9 instead of "
              "searched"),
    "protocol-m=0.9": (("qmc", 0, "none", 0, 0, 0.9), "the protocol with the momentum held at 0.9: Sobol lr per "
                       "batch size, no pruning"),
}
# Compared searches also measured against a baseline of their own (both must be run): what the search itself
# buys once both hold the momentum, apart from what not searching it buys.
BASELINES = {"m=0.9": "protocol-m=0.9"}


def compare_spec(spec: StudySpec, name: str) -> StudySpec:
    (sampler, n0, pruner, p0, warmup, *momentum), _ = COMPARE[name]
    search = dataclasses.replace(
        spec.search, sampler=dataclasses.replace(spec.search.sampler, name=sampler, n_startup_trials=n0),
        pruner=dataclasses.replace(spec.search.pruner, name=pruner, n_startup_trials=p0, n_warmup_epochs=warmup),
        momentum=(momentum[0], momentum[0]) if momentum else spec.search.momentum)
    return spec.with_overrides(search=search)


def run_key(spec: StudySpec, budget: float) -> str:
    """What a search's runs depend on: the workload, its search and the budget (for --runs)."""
    search = json.dumps(dataclasses.asdict(spec.search), sort_keys=True, default=str)
    return f"{workload_key(spec, grid=False)}:{budget:g}:{hashlib.sha256(search.encode()).hexdigest()[:16]}"


def search_specs(spec: StudySpec, compare: Sequence[str] = ()) -> dict[str, StudySpec]:
    return {"bstune": spec, "protocol": protocol_spec(spec)} | {name: compare_spec(spec, name) for name in compare}


def error_curve(table: TrialTable, ref: dict[str, Any], unit: float, step: float) -> list[dict[str, Any]]:
    """The error of analyze()'s effective lr* per batch size, and the gap of the best values, on the trials
    run so far, every `step` full trials' worth of examples (`unit`) and at the end."""
    records = sorted(table.records, key=lambda r: r.number)  # one worker: number order is completion order
    points = []
    spent = 0
    mark = step
    for i, r in enumerate(records):
        spent += r.examples_seen
        if spent / unit < mark and i < len(records) - 1:
            continue
        mark = (math.floor(spent / unit / step) + 1) * step
        points.append({"compute": spent / unit, "examples": spent} | estimate(records[: i + 1], table, ref))
    return points


def estimate(records: list[TrialRecord], table: TrialTable, ref: dict[str, Any]) -> dict[str, Any]:
    """analyze() on these trials: the mean |log2(effective lr* / reference)| over the batch sizes (inf until
    every batch size has an estimate), and the mean gap of the best value found to the reference's best."""
    sub = TrialTable(records, direction=table.direction, metric=table.metric, n_train=table.n_train)
    sign = 1.0 if table.direction == "minimize" else -1.0
    errors: dict[str, float | None] = {str(b): None for b in map(int, ref["per_batch"])}
    eff_errors = dict(errors)
    try:
        result = analyze(sub)
    except BstuneError:
        result = None
    if result is not None:
        for o in result.per_batch:
            r = ref["per_batch"].get(str(o.batch_size))
            if o.lr is not None and o.momentum is not None and r is not None:
                errors[str(o.batch_size)] = abs(math.log2(o.lr / reference_lr(r, o.momentum)))
                eff_errors[str(o.batch_size)] = abs(math.log2(o.effective_lr / r["effective_lr"]))
    gaps = []
    for b, r in ref["per_batch"].items():
        done = [x.value for x in records if x.batch_size == int(b) and x.state == "COMPLETE" and x.value is not None
                and math.isfinite(x.value)]
        gaps.append(min(sign * v for v in done) - sign * r["best_grid_value"] if done else math.inf)
    def mean(es: dict[str, float | None]) -> float:
        known = [e for e in es.values() if e is not None]
        return float(np.mean(known)) if len(known) == len(es) else math.inf

    return {"error": mean(errors), "per_batch": errors, "eff_error": mean(eff_errors), "gap": float(np.mean(gaps))}


def compute_to_target(points: Sequence[dict[str, Any]], target: float = TARGET,
                      key: str = "error") -> tuple[float, float]:
    """Compute at which the error (``key``) first goes under `target`, and from which it stays under it to
    the end of the run (inf where it does not)."""
    first = next((p["compute"] for p in points if p[key] < target), math.inf)
    stays = math.inf
    for p in reversed(points):
        if p[key] >= target:
            break
        stays = p["compute"]
    return first, stays


# ------------------------------------------------------------------------------------------ floor

FLOOR_PER_BATCH = (3, 4, 6, 8)  # trials per batch size (2 at each is too few for the joint fit)
FLOOR_DRAWS = 40
ORACLE_BAND = 1.5  # octaves either side of the reference's valley floor


def estimator_floor(ref: dict[str, Any], spec: StudySpec, draws: int = FLOOR_DRAWS,
                    seed: int = 0) -> list[dict[str, Any]]:
    """What analyze() makes of n completed trials per batch size that a search could not have placed
    better: drawn from the reference grid itself (one training seed per draw, as a search has), either
    *oracle* (within ORACLE_BAND octaves of the reference's valley floor at the trial's momentum) or
    *anywhere* on the grid (where the standard protocol's trials fall). No training: this is the estimator's
    share of the error, which no search can remove."""
    rng = np.random.default_rng(seed)
    rows = [r for r in ref["rows"] if r["state"] == "COMPLETE"]

    def on_floor(r: dict[str, Any]) -> bool:
        floor = reference_lr(ref["per_batch"][str(r["batch_size"])], r["momentum"])
        return abs(math.log2(r["lr"] / floor)) <= ORACLE_BAND

    # the grid points each draw picks from: per design, training seed and batch size
    pools = {(design, s, b): [r for r in rows if r["batch_size"] == b and r["seed"] == s
                              and (design == "anywhere" or on_floor(r))]
             for design in ("oracle", "anywhere") for s in REFERENCE_SEEDS for b in spec.search.batch_sizes}
    out = []
    for n in FLOOR_PER_BATCH:
        row: dict[str, Any] = {"per_batch": n}
        for design in ("oracle", "anywhere"):
            errors = []
            for _ in range(draws):
                s = int(rng.choice(REFERENCE_SEEDS))
                picked = []
                for b in spec.search.batch_sizes:
                    pool = pools[(design, s, b)]
                    picked += [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]
                table = trial_table(picked, spec, ref["n_train"])
                errors.append(estimate(table.records, table, ref)["error"])
            row[design] = (statistics.median(errors), sum(e < TARGET for e in errors) / draws)
        out.append(row)
    return out


ORACLE_ORDERS = 2  # orders in which the oracle search replays each training seed's trials


def oracle_search(ref: dict[str, Any], spec: StudySpec, budget: float, unit: int,
                  orders: int = ORACLE_ORDERS) -> list[tuple[float, float]]:
    """A search that knows where the valley floor is, replayed from the reference grid: every trial within
    ORACLE_BAND octaves of the floor (known in advance, at no cost), one training seed per run, the batch sizes in turn,
    ``budget`` trials of the full length, scored every STEP full trials as the searches are. The reference it
    is scored against leaves the run's own training seed out. Returns (first, kept) per run
    (``compute_to_target``): about the least compute in which a search can bring the error under the target,
    and keep it there."""
    out = []
    sizes = spec.search.batch_sizes
    for seed in ref["seeds"]:
        others = [r for r in ref["rows"] if r["seed"] != seed]
        held = summarize_reference(spec, others, ref["n_train"], 0.0, seeds=[s for s in ref["seeds"] if s != seed])
        pools = {b: [r for r in ref["rows"] if r["seed"] == seed and r["batch_size"] == b and r["state"] == "COMPLETE"
                     and abs(math.log2(r["lr"] / reference_lr(held["per_batch"][str(b)], r["momentum"])))
                     <= ORACLE_BAND] for b in sizes}
        for k in range(orders):
            rng = np.random.default_rng([seed, k])
            order = {b: rng.permutation(len(pool)) for b, pool in pools.items()}
            n = min(int(budget), len(sizes) * min(len(p) for p in pools.values()))
            picked = [pools[b][order[b][i // len(sizes)]] | {"number": i, "examples_seen": unit}
                      for i in range(n) for b in [sizes[i % len(sizes)]]]
            points = error_curve(trial_table(picked, spec, ref["n_train"]), held, unit, STEP)
            out.append(compute_to_target(points))
    return out


def seed_limit(ref: dict[str, Any], spec: StudySpec) -> tuple[list[float], list[float]]:
    """Per training seed of the reference, with that seed's whole grid (about a hundred trials per batch
    size): the error, as ``estimate`` measures it, of the grid's own optimum read off that seed's trials alone
    (at the reference's best momentum), and of ``analyze()``. The first is what one training seed's noise
    costs an estimate made without a model and without a shortage of trials; the second adds the model's."""
    sign = 1.0 if spec.search.direction == "minimize" else -1.0
    read, fitted = [], []
    for seed in ref["seeds"]:
        errors = []
        for b, r in ref["per_batch"].items():
            column = [x for x in ref["rows"] if x["batch_size"] == int(b) and x["momentum"] == r["momentum"]]
            lrs = sorted({x["lr"] for x in column})
            opt = column_optimum(np.log2(lrs), column_profile(column, lrs, [seed], sign))
            errors.append(abs(opt[0] - math.log2(r["lr"])) if opt is not None else math.inf)
        read.append(float(np.mean(errors)))
        table = trial_table([x for x in ref["rows"] if x["seed"] == seed], spec, ref["n_train"])
        fitted.append(estimate(table.records, table, ref)["error"])
    return read, fitted
