"""Time to a trustworthy answer: bstune, whole, against the standard protocol as it is run, end to end, in
wall-clock (or CPU) seconds. A benchmark, not a test:

    python benchmarks/time_to_answer.py [--seeds 5] [--first-seed 5] [--budget 400] [--step 2]
        [--candidates sobol+dead ...] [--no-fuse-one] [--clock cpu] [--out benchmarks/TIME.md]
        [--save-runs runs.json]
    python benchmarks/time_to_answer.py --quick          # 2 seeds, 40 full trials, no file: development
    python benchmarks/time_to_answer.py --rescore a.json [b.json]   # the report again from saved runs
    python benchmarks/time_to_answer.py --candidates-only --candidates ... --seeds 3   # the screen (no protocol)

Every search runs through bstune's real ``run_study`` in fresh temporary stores, one at a time in this
process: the protocol (Sobol per batch size, one trial at a time, no pruning, its best trial), bstune as
shipped (``studies/digits.yaml``, read by ``analyze()``), bstune one trial at a time (the fusion component),
and the candidates for the default search (sampler+pruner, fused, read by ``analyze()``). Only the time each
trial finishes is recorded; the answers are scored afterwards (time_scoring.py) and written up
(time_report.py; the screen: time_screen.py). How and why, at length: docs/time-to-answer.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import resource
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
from time_scoring import ReferenceSurface, describe
from time_screen import screen_report

from bstune.search import SilentProgress, run_study
from bstune.search.study import default_fuse
from bstune.spec import Budget, Execution, StudySpec, load_spec
from bstune.train import load_dataset, pick_device

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "TIME.md"
FULL = {"seeds": 5, "budget": 400.0}
QUICK = {"seeds": 2, "budget": 40.0}


# ------------------------------------------------------------------------------------------ searches


# The candidates for the default search (--candidates), sampler + pruner, all fused as bstune is: the sampler
# (Optuna name, n_startup_trials per batch size) and the pruner (name, n_startup_trials, n_warmup_epochs).
SAMPLERS = {"sobol": ("qmc", 0), "law": ("law", 2), "tpe": ("tpe", 4)}
PRUNERS = {"median": ("median", 3, 4), "none": ("none", 0, 0), "dead": ("dead", 0, 4)}
CANDIDATES = tuple(f"{s}+{p}" for s in SAMPLERS for p in PRUNERS)


def candidate_spec(spec: StudySpec, name: str) -> StudySpec:
    """The benchmark's spec with a candidate's sampler and pruner (its fuse left to the device's default)."""
    (sampler, n0), (pruner, p0, warmup) = SAMPLERS[name.split("+")[0]], PRUNERS[name.split("+")[1]]
    s = spec.search
    search = dataclasses.replace(
        s, sampler=dataclasses.replace(s.sampler, name=sampler, n_startup_trials=n0),
        pruner=dataclasses.replace(s.pruner, name=pruner, n_startup_trials=p0, n_warmup_epochs=warmup))
    return spec.with_overrides(search=search, execution=Execution())


def search_specs(spec: StudySpec, extra: Sequence[str] = (), fuse_one: bool = True,
                 fixed: bool = True) -> dict[str, StudySpec]:
    """The searches on the benchmark's workload: the protocol (one trial at a time) and bstune as shipped (its
    fuse left to the device's default) unless not ``fixed``, bstune one trial at a time (``fuse_one``), and
    the candidates."""
    one = Execution(fuse=1)
    return (
        ({"protocol": protocol_spec(spec).with_overrides(execution=one), "bstune": spec} if fixed else {})
        | ({"bstune --fuse 1": spec.with_overrides(execution=one)} if fuse_one else {})
        | {name: candidate_spec(spec, name) for name in extra}
    )


class _Clock(SilentProgress):
    """Wall time, since the search's start, at which the first trial started and each trial finished."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = _cpu_seconds()
        self.first_start: float | None = None
        self.finished: dict[int, float] = {}
        self.finished_cpu: dict[int, float] = {}

    def trial_started(self, number: int, config: Any) -> None:
        if self.first_start is None:
            self.first_start = time.perf_counter() - self.t0

    def trial_finished(
        self, number: int, config: Any, state: str, value: float | None, seconds: float, reason: str
    ) -> None:
        self.finished[number] = time.perf_counter() - self.t0
        self.finished_cpu[number] = _cpu_seconds() - self.cpu0


def run_search(label: str, spec: StudySpec, seed: int, examples: float, folder: Path) -> dict[str, Any]:
    """One search, to `examples` processed, in fresh stores under `folder`: its trials, each with the wall
    time at which it finished, and the search's own times (seconds since ``run_study`` was called)."""
    slug = label.replace(" ", "").replace("-", "").replace("+", "_")
    sampler = dataclasses.replace(spec.search.sampler, seed=seed)  # the training seed stays the spec's
    spec = spec.with_overrides(
        name=f"{slug}-{seed}",
        search=dataclasses.replace(spec.search, sampler=sampler),
        budget=Budget(examples=examples),
        storage=f"sqlite:///{folder}/{slug}-{seed}-optuna.db",
        tracking_uri=f"sqlite:///{folder}/{slug}-{seed}-mlflow.db",
    )
    data = load_dataset(spec.workload)  # before the clock: the same for every search
    cpu0, load = _cpu_seconds(), os.getloadavg()[0]
    clock = _Clock()
    result = run_study(spec, data=data, progress=clock)
    seconds = time.perf_counter() - clock.t0
    cpu = _cpu_seconds() - cpu0
    trials = [trial_row(r) | {"finished": clock.finished.get(r.number, seconds),
                              "finished_cpu": clock.finished_cpu.get(r.number, cpu)} for r in result.table.records]
    trials.sort(key=lambda r: r["finished"])
    return {
        "label": label,
        "seed": seed,
        "seconds": seconds,
        "first_start": clock.first_start or seconds,
        "fuse": spec.execution.fuse or default_fuse(pick_device(None).type, spec.workload.model),
        "search": describe(spec.search),
        "cpu": cpu,
        "load": [load, os.getloadavg()[0]],
        "trials": trials,
    }


def _cpu_seconds() -> float:
    """CPU seconds this process has used (user and system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_all(specs: dict[str, StudySpec], seeds: Sequence[int], examples: float, unit: float,
            log: Callable[[str], None], keep: Callable[[list[dict]], None] = lambda runs: None) -> list[dict]:
    """Every search at every seed, one at a time, the order of the searches reversed every other seed (so a
    busy spell on the machine does not always fall on the same one); a short warm-up first, not measured."""
    labels = tuple(specs)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bstune-time-") as tmp:
        for label in labels:  # imports, the stores' first creation, the fused trainer's first call
            run_search(f"warmup {label}", specs[label], 0, 2 * unit, Path(tmp))
        for seed in seeds:
            order = labels if seed % 2 == 0 else tuple(reversed(labels))
            for label in order:
                r = run_search(label, specs[label], seed, examples, Path(tmp))
                runs.append(r)
                keep(runs)  # after every search: a stopped run keeps what it measured
                log(f"{label} seed {seed}: {len(r['trials'])} trials in {r['seconds']:.1f}s, {r['cpu']:.0f} cpu s, "
                    f"load {r['load'][0]:.1f}")
    return runs


# ------------------------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true",
        help=f"development: {QUICK['seeds']} seeds, budget {QUICK['budget']:g}, no report file",
    )
    parser.add_argument("--seeds", type=int, help=f"how many seeds (default {FULL['seeds']})")
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed, first-seed + 1, ...")
    parser.add_argument(
        "--budget", type=float, help=f"examples per search, in full trials (default {FULL['budget']:g})"
    )
    parser.add_argument("--candidates", nargs="*", default=[], choices=CANDIDATES,
                        help="searches run beside protocol and bstune, sampler+pruner, fused as bstune")
    parser.add_argument("--no-fuse-one", action="store_true", help="leave out the bstune --fuse 1 component")
    parser.add_argument("--candidates-only", action="store_true",
                        help="run the candidates alone (their runs joined to others' by --rescore a.json b.json)")
    parser.add_argument("--shipped", default="", help="with --rescore: the candidate that studies/digits.yaml "
                        "now ships, read as bstune (the runs of the search shipped before become law+median)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="score against wall seconds or the search process's CPU seconds (a loaded machine)")
    parser.add_argument("--step", type=float, default=2.0, help="seconds between scorings of each answer")
    parser.add_argument("--out", help=f"the report (default {OUTPUT.relative_to(HERE.parent)}; --quick: none)")
    parser.add_argument("--save-runs", default="", help="a JSON file to keep the runs in (for --rescore)")
    parser.add_argument("--rescore", nargs="*", default=[], help="write the report from runs saved by --save-runs")
    return parser


def _measure(args: argparse.Namespace, spec: StudySpec, n_train: int, log: Callable[[str], None]) -> dict:
    """Run the searches; the runs and how they were run (what --save-runs keeps)."""
    mode = QUICK if args.quick else FULL
    seeds, budget = args.seeds or mode["seeds"], args.budget or mode["budget"]
    specs = search_specs(spec, args.candidates, fuse_one=not args.no_fuse_one, fixed=not args.candidates_only)
    unit = trial_examples(spec, n_train)
    load = os.getloadavg()[0]
    log(f"{len(specs)} searches x {seeds} seeds, {budget:g} full trials each, one at a time")
    t0 = time.perf_counter()

    def keep(runs: list[dict], machine: str = "stopped before its end") -> None:
        if args.save_runs:
            saved = {"runs": runs, "budget": budget, "command": command(), "machine": machine}
            Path(args.save_runs).write_text(json.dumps(saved))

    def command() -> str:
        return " --quick" * args.quick + "".join(
            f" --{k} {v:g}" for k, v in (("seeds", args.seeds), ("first-seed", args.first_seed),
                                         ("budget", args.budget)) if v
        ) + "".join(f" --candidates {' '.join(args.candidates)}" for _ in args.candidates[:1]) + (
            " --no-fuse-one" * args.no_fuse_one + " --candidates-only" * args.candidates_only)

    runs = run_all(specs, list(range(args.first_seed, args.first_seed + seeds)), budget * unit, unit, log, keep)
    import torch

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, device {pick_device(None).type}, torch "
        f"{torch.__version__}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; load "
        f"average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
        f"{(time.perf_counter() - t0) / 60:.0f} min with the warm-up"
    )
    keep(runs, machine)
    return {"runs": runs, "budget": budget, "command": command(), "machine": machine}


def _load(paths: Sequence[str]) -> dict:
    """Runs saved by --save-runs, from one file or several (their runs together; the first's budget, which
    all must share, and every file's command and machine)."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    if len({f["budget"] for f in files}) > 1:
        sys.exit("error: --rescore: the files' budgets differ; runs compare only at the same budget")
    return {"runs": [r for f in files for r in f["runs"]], "budget": files[0]["budget"],
            "command": " + ".join(f["command"] for f in files), "machine": " + ".join(f["machine"] for f in files)}


def on_cpu_clock(run: dict[str, Any]) -> dict[str, Any]:
    """A run with its clock replaced by the CPU seconds of the search's process (where it kept them)."""
    if "cpu" not in run or any("finished_cpu" not in t for t in run["trials"]):
        sys.exit("error: --clock cpu: these runs kept no CPU seconds (saved before they were recorded)")
    trials = [t | {"finished": t["finished_cpu"]} for t in run["trials"]]
    return run | {"seconds": run["cpu"], "trials": sorted(trials, key=lambda t: t["finished"])}


def main() -> None:
    args = _parser().parse_args()
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
    saved = _load(args.rescore) if args.rescore else _measure(args, spec, n_train, log)
    runs = saved["runs"] if args.clock == "wall" else [on_cpu_clock(r) for r in saved["runs"]]
    if args.shipped:  # bstune as shipped now is that candidate; what it was, the candidate it matches
        names = {"bstune": "law+median", args.shipped: "bstune"}
        runs = [r | {"label": names.get(r["label"], r["label"])} for r in runs]
    write = report if any(r["label"] == "protocol" for r in runs) else screen_report  # the screen: no protocol
    command = saved["command"] + " --clock cpu" * (args.clock == "cpu") + f" --shipped {args.shipped}" * bool(
        args.shipped)
    lines = write(runs, spec, ref, saved["budget"], args.step, command, saved["machine"], ReferenceSurface(ref))
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
