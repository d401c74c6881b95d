"""The shared parts of the search benchmarks (search_efficiency.py, time_to_answer.py, valley_shape.py): the
benchmark's workload, its cached reference grid and how it is read, saved trials as a TrialTable, formatting.
What the benchmarks measure and how is told in docs/search-efficiency.md and docs/time-to-answer.md."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bstune.errors import BstuneError
from bstune.spec import StudySpec
from bstune.train import Dataset, Diverged, load_dataset, train, train_config
from bstune.trials import EpochPoint, TrialRecord, TrialTable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_SPEC = ROOT / "studies" / "digits.yaml"
REFERENCE = HERE / "search_efficiency_reference.json"

BATCH_SIZES = (32, 64, 128, 256, 512)  # B = 16 alone would cost as much as the other five together
# The reference grid: effective lr in half-octave steps, six momenta, eight training seeds unseen by the searches
# (the valley is flat at the bottom: eight seeds' best lrs at one momentum span about an octave).
GRID_LOG2_EFF = tuple(-4.0 + 0.5 * i for i in range(17))
GRID_MOMENTA = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98)
REFERENCE_SEEDS = (1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007)


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


def reference_lr(ref_b: dict[str, Any], momentum: float) -> float:
    """The reference's lr* at this momentum: its valley floor (lr* per grid momentum, where bracketed),
    interpolated linearly in log2 lr against log2(1 - m), held flat beyond the end columns."""
    floor = sorted((math.log2(1.0 - m), math.log2(lr)) for m, lr, *_ in ref_b["valley"])
    us, xs = zip(*floor, strict=True)
    return float(2.0 ** np.interp(math.log2(max(1.0 - momentum, 1e-12)), us, xs))


def trial_row(r: TrialRecord) -> dict[str, Any]:
    """What the scoring needs of a trial, kept in --runs so a changed analysis can re-score saved runs."""
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


def value_at(points: Sequence[dict[str, Any]], compute: float, key: str, axis: str = "compute") -> float:
    """A run's value at `compute` (on `axis`): the one from its last evaluation at or before it (inf before the
    first)."""
    value = math.inf
    for p in points:
        if p[axis] > compute + 1e-9:
            break
        value = p[key]
    return value


def fmt(v: float, nd: int = 2) -> str:
    """v to nd decimals; - where it is not finite."""
    return "-" if not math.isfinite(v) else f"{v:.{nd}f}"


def summary(values: Sequence[float], nd: int = 2) -> str:
    """The median [min, max] of values."""
    vals = sorted(values)
    return f"{fmt(statistics.median(vals), nd)} [{fmt(vals[0], nd)}, {fmt(vals[-1], nd)}]"
