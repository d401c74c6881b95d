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
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from searchbench import (  # benchmarks/, on the path when run as a script
    DEFAULT_SPEC,
    REFERENCE,
    bench_spec,
    load_reference,
    protocol_spec,
    trial_examples,
    trial_row,
    workload_key,
)
from time_report import report
from time_scoring import SEARCHES, ReferenceSurface

from bstune.search import SilentProgress, run_study
from bstune.search.study import default_fuse
from bstune.spec import Budget, Execution, StudySpec, load_spec
from bstune.train import load_dataset, pick_device

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "TIME.md"
FULL = {"seeds": 5, "budget": 400.0}
QUICK = {"seeds": 2, "budget": 40.0}


# ------------------------------------------------------------------------------------------ searches


def search_specs(spec: StudySpec) -> dict[str, StudySpec]:
    """The three searches on the benchmark's workload: the protocol (one trial at a time), bstune as shipped
    (its fuse left to the device's default) and bstune one trial at a time."""
    one = Execution(fuse=1)
    return {
        "protocol": protocol_spec(spec).with_overrides(execution=one),
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
    trials = [trial_row(r) | {"finished": clock.finished.get(r.number, seconds)} for r in result.table.records]
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
    unit = trial_examples(spec, load_dataset(spec.workload).n_train)
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

    spec = bench_spec(load_spec(DEFAULT_SPEC))
    n_train = load_dataset(spec.workload).n_train
    if not any(
        p.exists() and json.loads(p.read_text()).get("key") == workload_key(spec)
        for p in (REFERENCE, REFERENCE.with_name(f"{REFERENCE.stem}-{workload_key(spec)}.json"))
    ):
        sys.exit(
            f"error: no cached reference for this workload (key {workload_key(spec)}) in "
            f"{REFERENCE.name}; this benchmark does not recompute it (run search_efficiency.py)"
        )
    ref = load_reference(spec, n_train, jobs=1, log=log)
    surface = ReferenceSurface(ref)
    load = os.getloadavg()[0]
    if args.rescore:
        saved = json.loads(Path(args.rescore).read_text())
        runs, budget, command, machine = saved["runs"], saved["budget"], saved["command"], saved["machine"]
    else:
        unit = trial_examples(spec, n_train)
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
