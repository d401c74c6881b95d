"""Search efficiency: how much compute bstune's search needs to find the optimal learning rate at every batch
size, against the standard protocol (Shallue et al. 2018). A benchmark, not a test:

    python benchmarks/search_efficiency.py [--seeds 5] [--budget 80] [--jobs 2] [--out benchmarks/SEARCH.md]
        [--compare tpe+median law+none] [--runs runs.json]

Both searches run through ``run_study`` on the same digits workload (``studies/digits.yaml``, made cheaper:
see ``bench_spec``), in temporary stores, to the same budget in examples processed:

- bstune: the search of ``studies/digits.yaml`` (its sampler, pruner and allocation over batch sizes);
- protocol: Sobol quasi-random (lr, momentum) independently per batch size, every trial to the end.

Every few trials the trials so far are analysed by ``analyze()`` and its lr* per batch size compared with a
reference's lr* at the same momentum: the valley floor of a dense grid over (effective lr, momentum) at every
batch size and eight training seeds, read off the grid (the best lr per momentum, no model), run once and cached
in ``search_efficiency_reference.json`` (another workload's or grid's, beside it under its key). ``estimator_floor``
measures what ``analyze()`` makes of well-placed trials drawn from that grid: the part of the error no search
can remove; ``oracle_search`` replays a search that places every trial on that floor, to see how early the
error can be brought under the target and kept there. ``--compare`` measures other searches beside the two
(see COMPARE); ``--runs`` keeps every run in a JSON file, so that adding a search or re-writing the report
does not re-run the others. About a minute per search and seed on 2 CPU cores, two at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bstune.analysis import analyze
from bstune.errors import BstuneError
from bstune.spec import Budget, StudySpec, load_spec
from bstune.train import Dataset, Diverged, load_dataset, train, train_config
from bstune.trials import EpochPoint, TrialRecord, TrialTable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_SPEC = ROOT / "studies" / "digits.yaml"
REFERENCE = HERE / "search_efficiency_reference.json"

BATCH_SIZES = (32, 64, 128, 256, 512)  # B = 16 alone would cost as much as the other five together
TARGET = 0.5  # octaves of mean |log2(eff lr* / reference)|: a factor of sqrt(2)
OTHER_TARGETS = (0.4, 0.5, 0.6, 0.75, 1.0)  # shown beside it: whether the ratio depends on where the bar is
# The reference grid: effective lr in half-octave steps, six momenta, eight training seeds unseen by the searches
# (the valley is flat at the bottom: eight seeds' best lrs at one momentum span about an octave).
GRID_LOG2_EFF = tuple(-4.0 + 0.5 * i for i in range(17))
GRID_MOMENTA = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98)
REFERENCE_SEEDS = (1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007)
STEP = 2.5  # full trials of compute between evaluations of the error


# ------------------------------------------------------------------------------------------ workload


def bench_spec(base: StudySpec) -> StudySpec:
    """The benchmark's workload: the default study's, at batch sizes 32..512, with the gradient diagnostics
    off (they only observe: the updates are the same)."""
    w = dataclasses.replace(base.workload, diagnostics_every=0, grad_histogram_epochs=())
    search = dataclasses.replace(base.search, batch_sizes=BATCH_SIZES)
    return base.with_overrides(workload=w, search=search)


def protocol_spec(spec: StudySpec) -> StudySpec:
    """The standard protocol on the same workload: scrambled Sobol per batch size, no pruning. Its settings
    do not follow the measured study's sampler and pruner, so its saved runs (--runs) stay valid when those
    change."""
    sampler = dataclasses.replace(spec.search.sampler, name="qmc", n_startup_trials=0)
    pruner = dataclasses.replace(spec.search.pruner, name="none", n_startup_trials=0, n_warmup_epochs=0)
    return spec.with_overrides(search=dataclasses.replace(spec.search, sampler=sampler, pruner=pruner))


def trial_examples(spec: StudySpec, n_train: int) -> int:
    """Examples one full trial processes (the unit of compute in the tables)."""
    return spec.workload.epochs * n_train


# ------------------------------------------------------------------------------------------ reference


def workload_key(spec: StudySpec, grid: bool = True) -> str:
    """What the reference depends on: the workload (less its seed), the space, the objective and the grid
    (without ``grid``: what a search's runs depend on beside its own settings)."""
    # fields added to the workload since the cached grid (a user's loss, trainer), at None (the built-in ones),
    # leave the key as it was: the same training
    w = {k: v for k, v in dataclasses.asdict(spec.workload).items()
         if k != "seed" and not (k in ("loss", "trainer") and v is None)}
    s = spec.search
    what = {"workload": w, "batch_sizes": list(s.batch_sizes), "lr": list(s.lr), "momentum": list(s.momentum),
            "objective": s.objective} | ({"grid": [GRID_LOG2_EFF, GRID_MOMENTA, REFERENCE_SEEDS]} if grid else {})
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_grid(spec: StudySpec) -> list[tuple[int, float, float, int]]:
    """(B, lr, momentum, seed) of every reference trial; points outside the searched lr range are left out."""
    lo, hi = spec.search.lr
    points = []
    for seed in REFERENCE_SEEDS:
        for b in spec.search.batch_sizes:
            for m in GRID_MOMENTA:
                if not spec.search.momentum[0] <= m <= spec.search.momentum[1]:
                    continue
                for le in GRID_LOG2_EFF:
                    lr = 2.0**le * (1.0 - m)
                    if lo <= lr <= hi:
                        points.append((b, lr, m, seed))
    return points


_DATA: Dataset | None = None


def _init_worker(spec: StudySpec) -> None:
    global _DATA
    torch.set_num_threads(1)
    _DATA = load_dataset(spec.workload)


def _run_point(args: tuple[StudySpec, tuple[int, float, float, int]]) -> dict[str, Any]:
    spec, (b, lr, m, seed) = args
    assert _DATA is not None
    try:
        history = train(train_config(spec.workload, b, lr, m, seed), _DATA, torch.device("cpu"))
        state, value = "COMPLETE", float(getattr(history[-1], spec.search.objective))
    except Diverged:
        state, value = "DIVERGED", None
    return {"batch_size": b, "lr": lr, "momentum": m, "seed": seed, "state": state, "value": value}


def compute_reference(spec: StudySpec, n_train: int, jobs: int, log: Any = print) -> dict[str, Any]:
    """Run the dense grid and summarise it: the reference optimum (effective lr*, lr*, m*) per batch size."""
    points = reference_grid(spec)
    log(f"reference: {len(points)} trials (dense grid, {len(REFERENCE_SEEDS)} training seeds); this runs once")
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(jobs, initializer=_init_worker, initargs=(spec,)) as pool:
        rows = []
        for i, row in enumerate(pool.imap(_run_point, [(spec, p) for p in points], chunksize=4)):
            rows.append(row)
            if (i + 1) % 100 == 0:
                log(f"  {i + 1}/{len(points)} trials, {time.perf_counter() - t0:.0f}s")
    return summarize_reference(spec, rows, n_train, time.perf_counter() - t0)


def summarize_reference(spec: StudySpec, rows: Sequence[dict[str, Any]], n_train: int,
                        seconds: float, seeds: Sequence[int] = REFERENCE_SEEDS) -> dict[str, Any]:
    """The reference optimum per batch size, read off the grid itself: at each grid momentum, the lr with the
    best value averaged over the training seeds, refined by the parabola through it and its two neighbours
    (``column_optimum``). Not a model fit over the whole valley: the valley is lopsided (a long slope at low
    lr, a cliff at high lr), and a quadratic across it puts the centre on the long side, an octave or more
    from the grid's own best points."""
    sign = 1.0 if spec.search.direction == "minimize" else -1.0
    per_batch = {}
    for b in spec.search.batch_sizes:
        valley, best, best_point = [], None, math.inf
        for m in GRID_MOMENTA:
            column = [r for r in rows if r["batch_size"] == b and r["momentum"] == m]
            if not column:
                continue
            lrs = sorted({r["lr"] for r in column})
            x = np.log2(lrs)
            mean = column_profile(column, lrs, seeds, sign)
            best_point = min(best_point, float(mean.min()))
            opt = column_optimum(x, mean)
            if opt is None:  # the best lr at an end of the searched range: no optimum to read
                continue
            singles = [o[0] for s in seeds
                       if (o := column_optimum(x, column_profile(column, lrs, [s], sign))) is not None]
            singles = singles or [opt[0]]  # no seed's own optimum inside the grid: no spread to show
            valley.append([m, float(2.0 ** opt[0]), float(2.0 ** min(singles)), float(2.0 ** max(singles))])
            if best is None or opt[1] < best[2]:
                best = (m, float(2.0 ** opt[0]), opt[1])
        if best is None:
            raise BstuneError(f"reference: B={b}: no momentum has its best lr inside the grid; widen the grid")
        m, lr, _ = best
        per_batch[str(b)] = {"valley": valley, "lr": lr, "momentum": m, "effective_lr": lr / (1.0 - m),
                             "best_grid_value": sign * best_point}
    return {
        "key": workload_key(spec), "n_trials": len(rows), "seeds": list(seeds),
        "grid": {"log2_effective_lr": list(GRID_LOG2_EFF), "momentum": list(GRID_MOMENTA)},
        "objective": spec.search.objective, "n_train": n_train, "seconds": round(seconds, 1),
        "per_batch": per_batch, "rows": list(rows),
    }


def column_profile(column: Sequence[dict[str, Any]], lrs: Sequence[float], seeds: Sequence[int],
                   sign: float) -> np.ndarray:
    """One grid column's (one batch size, one momentum) sign * value at each of ``lrs``, averaged over
    ``seeds``; inf where a seed diverged or did not run."""
    values = {(r["lr"], r["seed"]): sign * r["value"] if r["value"] is not None else math.inf for r in column}
    return np.array([np.mean([values.get((lr, s), math.inf) for s in seeds]) for lr in lrs])


def column_optimum(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """The minimum of a profile y (inf: diverged) on an evenly spaced grid x: the best point, moved to the
    vertex of the parabola through it and its two neighbours (by at most half a step); (x, y) there. None
    where the best point is at an end of the grid (not bracketed)."""
    i = int(np.argmin(y))
    if i == 0 or i == len(y) - 1 or not math.isfinite(y[i]):
        return None
    y0, y1, y2 = y[i - 1], y[i], y[i + 1]
    if not (math.isfinite(y0) and math.isfinite(y2)):  # a neighbour diverged: the cliff is one step away
        return float(x[i]), float(y1)
    curve = y0 - 2.0 * y1 + y2
    d = 0.5 * (y0 - y2) / curve if curve > 0 else 0.0
    return float(x[i] + d * (x[i + 1] - x[i])), float(y1 - 0.25 * (y0 - y2) * d)


def load_reference(spec: StudySpec, n_train: int, jobs: int, path: Path = REFERENCE,
                   log: Any = print) -> dict[str, Any]:
    """The cached reference when it matches the workload, else computed now and cached. The cache keeps the
    grid's trials: the summary is redone from them with the analysis as it is now. Another workload's
    reference goes beside ``path`` under its key, never over the one there (hours of training)."""
    key = workload_key(spec)
    keyed = path.with_name(f"{path.stem}-{key}{path.suffix}")
    for candidate in (path, keyed):
        if candidate.exists():
            cached = json.loads(candidate.read_text())
            if cached.get("key") == key and "rows" in cached:
                return summarize_reference(spec, cached["rows"], n_train, cached["seconds"])
    if path.exists():
        path = keyed
        log(f"reference: the cached one is for another workload or grid; computing this one into {path.name}")
    ref = compute_reference(spec, n_train, jobs, log)
    path.write_text(json.dumps(ref) + "\n")
    return ref


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


def _run_search(args: tuple[str, StudySpec, int, float, str, dict[str, Any], float]) -> dict[str, Any]:
    """One search (in a worker process): run_study to the budget, then the error after every `step` trials'
    worth of compute."""
    label, spec, seed, budget, tmp, ref, step = args
    unit = trial_examples(spec, ref["n_train"])
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from bstune.search import run_study

    w = dataclasses.replace(spec.workload, seed=seed)
    sampler = dataclasses.replace(spec.search.sampler, seed=seed)
    spec = spec.with_overrides(
        name=f"{label}-{seed}", workload=w, search=dataclasses.replace(spec.search, sampler=sampler),
        budget=Budget(examples=budget), storage=f"sqlite:///{tmp}/{label}-{seed}.db",
        tracking_uri=f"sqlite:///{tmp}/mlflow-{os.getpid()}.db")
    t0 = time.perf_counter()
    result = run_study(spec, data=load_dataset(spec.workload))
    seconds = time.perf_counter() - t0
    return {"label": label, "seed": seed, "seconds": seconds, "n_trials": len(result.table.records),
            "trials": [_trial_row(r) for r in result.table.records],
            "points": error_curve(result.table, ref, unit, step)}


def _trial_row(r: TrialRecord) -> dict[str, Any]:
    """What error_curve needs of a trial, kept in --runs so a changed analysis can re-score saved runs."""
    return {"number": r.number, "batch_size": r.batch_size, "lr": r.lr, "momentum": r.momentum,
            "value": r.value, "state": r.state, "examples_seen": r.examples_seen,
            "curve": [[p.epoch, p.value] for p in r.curve]}


def trial_table(rows: Sequence[dict[str, Any]], spec: StudySpec, n_train: int) -> TrialTable:
    """Saved trials (a search's, or the reference grid's, which keep no number, cost or curve) as the
    TrialTable that ``analyze`` reads."""
    records = [TrialRecord(number=r.get("number", i), batch_size=r["batch_size"], lr=r["lr"], momentum=r["momentum"],
                           value=r["value"], state=r["state"], examples_seen=r.get("examples_seen", 0),
                           curve=tuple(EpochPoint(epoch=e, value=v) for e, v in r.get("curve", ())))
               for i, r in enumerate(rows)]
    return TrialTable(records, direction=spec.search.direction, metric=spec.search.objective, n_train=n_train)


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


def reference_lr(ref_b: dict[str, Any], momentum: float) -> float:
    """The reference's lr* at this momentum: its valley floor (lr* per grid momentum, where bracketed),
    interpolated linearly in log2 lr against log2(1 - m), held flat beyond the end columns."""
    floor = sorted((math.log2(1.0 - m), math.log2(lr)) for m, lr, *_ in ref_b["valley"])
    us, xs = zip(*floor, strict=True)
    return float(2.0 ** np.interp(math.log2(max(1.0 - momentum, 1e-12)), us, xs))


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


# ------------------------------------------------------------------------------------------ report


def _at(points: Sequence[dict[str, Any]], compute: float, key: str, axis: str = "compute") -> float:
    """A run's value at `compute` (on `axis`): the one from its last evaluation at or before it (inf before the
    first)."""
    value = math.inf
    for p in points:
        if p[axis] > compute + 1e-9:
            break
        value = p[key]
    return value


def _fmt(v: float, nd: int = 2) -> str:
    return "-" if not math.isfinite(v) else f"{v:.{nd}f}"


def _summary(values: Sequence[float], nd: int = 2) -> str:
    vals = sorted(values)
    return f"{_fmt(statistics.median(vals), nd)} [{_fmt(vals[0], nd)}, {_fmt(vals[-1], nd)}]"


def report(runs: Sequence[dict[str, Any]], ref: dict[str, Any], spec: StudySpec, budget: float, seeds: Sequence[int],
           unit: int, command: str = "", floor_rows: Sequence[dict[str, Any]] = (),
           oracle: Sequence[tuple[float, float]] = ()) -> list[str]:
    """The Markdown report; its last line is the median compute ratio."""
    w, s = spec.workload, spec.search
    by = {(r["label"], r["seed"]): r["points"] for r in runs}
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
    extra = [x for x in COMPARE if any(r["label"] == x for r in runs)]
    labels = ["bstune", "protocol", *extra]
    for x in reversed(extra):
        lines.insert(lines.index("## Reference optimum") - 1,
                     f"- **{x}** (for comparison, not in the ratio): {COMPARE[x][1]}.")
    lines += [
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
            row = [f"{c:g}"] + [_summary([_at(by[(label, seed)], c, key) for seed in seeds], nd) for label in labels]
            lines.append("| " + " | ".join(row) + " |")
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
        row = [str(seed)] + [f"{_fmt(hits[x][0], 1)} | {_fmt(hits[x][1], 1)}" for x in labels]
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
    if floor_rows:
        read, fitted = seed_limit(ref, spec)
        lines += [
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
            lines.append(f"| {n} | {n * len(s.batch_sizes)} | {_fmt(om)} | {oshare:.0%} | {_fmt(am)} | {ashare:.0%} |")
    if oracle:
        first = [min(f, budget) for f, _ in oracle]
        held = [min(k, budget) for _, k in oracle]
        ours = _median_kept(by, "bstune", seeds, budget)
        early = statistics.median(min(compute_to_target(by[("protocol", x)])[0], budget) for x in seeds)
        lines += [
            "",
            "## A search that knows where the floor is",
            "",
            "A search that knows the reference's valley floor in advance and places every trial within "
            f"{ORACLE_BAND:g} octaves of it, at no cost, replayed from the reference grid: per training seed "
            f"of the reference, that seed's grid points in {ORACLE_ORDERS} random orders, the batch sizes in "
            f"turn, {budget:g} trials of the full length, scored like the searches every 2.5 full trials "
            f"against the reference made of the other {len(ref['seeds']) - 1} seeds ({len(oracle)} runs). It "
            f"brings the error under {TARGET:g} at the first evaluation possible or nearly (*first*, median "
            f"[min, max]: {_summary(first, 1)} full trials), but keeps it there only from "
            f"{statistics.median(held):.1f} (*kept*: {_summary(held, 1)}, counting the budget where it never "
            "does): with every trial on the floor the error goes on wandering about the target, as one "
            "training seed's optimum, and the fit to it, lie that far from the mean over seeds. Against the "
            f"protocol's median *kept* ({kept:.1f}) that is a ratio of {kept / statistics.median(held):.2f}; "
            f"on *first* (the protocol's median {early:.1f}), {early / statistics.median(first):.2f}. "
            "Not a bound on every search: this one spreads its trials over the whole floor, all momenta, "
            "and the estimate reads one momentum's line of it better (`--compare m=0.9`, which does not "
            "search momentum); but a measure of what a search over lr and momentum gets from this estimate "
            f"and target. bstune's own median *kept* above is {ours:.1f}.",
        ]
    lines += ["", f"compute ratio (protocol / bstune): {median:.2f}"]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(DEFAULT_SPEC), help="the study whose search is measured")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=80.0, help="compute per search, in full trials")
    parser.add_argument("--jobs", type=int, default=2, help="searches run at once (processes)")
    parser.add_argument("--out", default=str(HERE / "SEARCH.md"), help="where the report is written ('' for none)")
    parser.add_argument("--compare", nargs="*", default=[], choices=list(COMPARE),
                        help="other searches to measure beside the two, for comparison")
    parser.add_argument("--runs", default="", help="a JSON file: reuse the runs it holds for the same search, "
                        "workload and budget; save new ones to it")
    args = parser.parse_args()

    spec = bench_spec(load_spec(args.spec))
    n_train = load_dataset(spec.workload).n_train
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731 - progress, not the report
    ref = load_reference(spec, n_train, args.jobs, log=log)
    unit = trial_examples(spec, n_train)
    seeds = list(range(args.seeds))
    specs = search_specs(spec, args.compare)
    keys = {label: run_key(s, args.budget) for label, s in specs.items()}
    saved = json.loads(Path(args.runs).read_text()) if args.runs and Path(args.runs).exists() else []
    kept = [r for r in saved if r.get("key") not in keys.values()]  # other searches': left as they are
    runs = [r | {"label": label} for label, key in keys.items() for r in saved
            if r.get("key") == key and r["seed"] in seeds]
    for r in runs:  # re-scored with the analysis as it is now
        if "trials" in r:
            r["points"] = error_curve(trial_table(r["trials"], spec, n_train), ref, unit, STEP)
    done = {(r["label"], r["seed"]) for r in runs}
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        tasks = [(label, s, seed, args.budget * unit, tmp, ref, STEP)
                 for seed in seeds for label, s in specs.items() if (label, seed) not in done]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(_run_search, tasks):
                runs.append(r | {"key": keys[r["label"]]})
                log(f"{r['label']} seed {r['seed']}: {r['n_trials']} trials, {r['seconds']:.0f}s, final error "
                    f"{r['points'][-1]['error']:.2f}")
                if args.runs:
                    Path(args.runs).write_text(json.dumps(kept + runs))
    command = f" --seeds {args.seeds} --budget {args.budget:g}" + "".join(
        f" --compare {' '.join(args.compare)}" for _ in args.compare[:1])
    log(f"estimator floor: analyze() on trials drawn from the reference grid ({FLOOR_DRAWS} draws per row)")
    floor_rows = estimator_floor(ref, spec)
    log(f"a search that knows where the floor is: {ORACLE_ORDERS} replays per reference seed (a minute)")
    oracle = oracle_search(ref, spec, args.budget, unit)
    lines = report(runs, ref, spec, args.budget, seeds, unit, command, floor_rows, oracle)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
