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
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from search_report import report  # benchmarks/, on the path when run as a script
from search_scoring import (
    COMPARE,
    FLOOR_DRAWS,
    ORACLE_ORDERS,
    STEP,
    error_curve,
    estimator_floor,
    oracle_search,
    run_key,
    search_specs,
)
from searchbench import DEFAULT_SPEC, HERE, bench_spec, load_reference, trial_examples, trial_row, trial_table

from bstune.spec import Budget, StudySpec, load_spec
from bstune.train import load_dataset


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
            "trials": [trial_row(r) for r in result.table.records],
            "points": error_curve(result.table, ref, unit, step)}



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
