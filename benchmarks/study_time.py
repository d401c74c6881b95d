"""Where a study's wall time goes: start-up, training, and logging/storage, at --fuse 1 and at the default; and the
bookkeeping a trial costs in a long study of tiny trials (`--tiny N`).

Runs studies/digits.yaml as shipped (its trial budget, its seed) in a fresh process per setting, with fresh stores
in a temporary folder, and splits its wall time:

- start-up: from launching the process to the first trial (imports, loading the data, opening the stores);
- training: time inside the trainer (`train_fused`), less the per-epoch callbacks it makes;
- logging/storage: the rest, split into MLflow (the trial runs' writes: `Tracker.start_trial`, `log_epoch`,
  `end_trial`) and Optuna (its storage, the samplers and the pruners, the progress output).

Used by benchmarks/fused.py, whose FUSED.md ends with the speedup; run alone it prints the table.

The tiny study (`TINY`: a linear model on 128 digits examples, 2 epochs, TPE, no pruning, the embedded default
stores, fused as the default does) is nearly all bookkeeping: each trial's asks, suggestions, attributes and tell
in the Optuna storage, its MLflow child run, the sampler. `--tiny N` runs N trials of it and prints the wall time
a trial in all, and the bookkeeping a trial (wall less training) over the first and the last thousand trials
(the first and last third for fewer than 3,000), so one sees whether it grows with the study.

    python benchmarks/study_time.py                   # the default study's split, --fuse 1 and default
    python benchmarks/study_time.py --tiny 1000       # the tiny study, 1,000 trials
    python benchmarks/study_time.py --tiny 600 --check  # issue 29's check: <= 25 ms a trial, last 200 <= first
    python benchmarks/study_time.py --tiny 600 --storage journal  # the Optuna storage a journal:/// file

The tiny study's row also gives the whole run's wall time and CPU seconds (its start-up and the trial runs'
writer process included), and of them the trainer's and the writer's: the writer applies the MLflow writes, and
the trainer waits for it at a trial's end when it is a group behind, so the slower of the two sets the pace.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

DEFINITIONS = """\
- start-up: from launching the process to the first trial (imports, loading the data, opening the stores);
- training: time inside the trainer (`train_fused`), less the per-epoch callbacks it makes;
- logging/storage: the rest, split into MLflow (the trial runs' writes on the trainer's side: `Tracker`'s
  `start_trial`, `log_epoch`, `end_trial`, or the lines spooled to the writer process, waits for it included)
  and Optuna (its storage, the samplers and the pruners, the progress output)."""
ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "studies" / "digits.yaml"
TINY = {"name": "tiny", "workload": {"dataset": "digits", "model": "linear", "n_train": 128, "epochs": 2},
        "search": {"batch_sizes": {"min": 16, "max": 64}, "sampler": "tpe", "pruner": "none"}}

# Run in the child: times the study from the inside by wrapping the trainer and the per-epoch callback.
_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import bstune.search.objective as objective
from bstune.search import SilentProgress, run_study
from bstune.spec import load_spec
from bstune.tracking import Tracker

clock = {"training": 0.0, "callbacks": 0.0, "mlflow": 0.0, "first_trial": None, "marks": []}

def timed(fn, key):
    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[key] += time.perf_counter() - start
    return wrapped

objective.train_fused = timed(objective.train_fused, "training")
objective._TrialRun.on_epoch = timed(objective._TrialRun.on_epoch, "callbacks")
Tracker.start_trial = timed(Tracker.start_trial, "mlflow")
Tracker.end_trial = timed(Tracker.end_trial, "mlflow")
Tracker.log_epoch = timed(Tracker.log_epoch, "mlflow")  # called inside the callbacks: counted in both
try:  # the trial runs spooled to a writer process: the trainer's side (the lines, waiting for a run id)
    from bstune.run_spool import SpooledRuns
    for name in ("start_trial", "log_epoch", "end_trial", "run_id", "close"):
        setattr(SpooledRuns, name, timed(getattr(SpooledRuns, name), "mlflow"))
except ImportError:  # an older bstune: no spool
    pass

class FirstTrial(SilentProgress):
    def trial_started(self, number, config):
        if clock["first_trial"] is None:
            clock["first_trial"] = time.perf_counter() - t0

    def trial_finished(self, *args, **kwargs):  # when, and the training so far (a fused group's ends together)
        clock["marks"].append((time.perf_counter() - t0, clock["training"] - clock["callbacks"], time.process_time()))

result = run_study(load_spec(sys.argv[1]), progress=FirstTrial())
import resource
cpu = lambda who: sum(getattr(resource.getrusage(who), k) for k in ("ru_utime", "ru_stime"))
clock.update(total=time.perf_counter() - t0, trials=result.spent.trials, trainer_cpu=cpu(resource.RUSAGE_SELF),
             writer_cpu=cpu(resource.RUSAGE_CHILDREN))  # the writer process, waited for at the study's end
print(json.dumps(clock))
"""


STORAGES = {"journal": "journal:///{}/optuna.journal", "sqlite": "sqlite:///{}/optuna.db"}


def _child(spec: dict, folder: Path, storage: str = "sqlite") -> tuple[dict, float]:
    """Run the study `spec` in a fresh process with fresh stores in `folder` (the Optuna storage of kind
    `storage`, MLflow's SQLite either way): its clock, and the wall time from launching it."""
    spec.update(storage=STORAGES[storage].format(folder), tracking_uri=f"sqlite:///{folder}/mlflow.db")
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1]), time.perf_counter() - start


def run(fuse: int | None, folder: Path, storage: str = "sqlite") -> dict[str, float]:
    """One study at `fuse` (None: the default) in `folder`; its wall time split, in seconds."""
    spec = yaml.safe_load(SPEC.read_text())
    spec.setdefault("budget", {}).pop("seconds", None)  # the same trials at every setting, however long they take
    if fuse is not None:
        spec["execution"] = {"fuse": fuse}
    c, wall = _child(spec, folder, storage)
    launch = wall - c["total"]  # the interpreter's own start, before the child's clock
    training = c["training"] - c["callbacks"]
    startup = launch + c["first_trial"]
    return {"trials": c["trials"], "wall": wall, "startup": startup, "training": training,
            "other": wall - startup - training, "mlflow": c["mlflow"]}


def section(repeats: int = 1, storage: str = "sqlite") -> tuple[str, float]:
    """The Markdown table (fuse 1 and default, best wall of `repeats`) and the speedup fuse 1 / default."""
    rows = {}
    for label, fuse in (("--fuse 1", 1), ("default", None)):
        best = None
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                r = run(fuse, Path(tmp), storage)
            best = r if best is None or r["wall"] < best["wall"] else best
        rows[label] = best
    lines = ["| setting | trials | wall s | start-up s | training s | logging/storage s (MLflow + Optuna) | "
             "per trial ms | outside training, after start-up |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        share = r["other"] / max(r["wall"] - r["startup"], 1e-9)
        lines.append(f"| {label} | {r['trials']} | {r['wall']:.1f} | {r['startup']:.1f} | {r['training']:.1f} | "
                     f"{r['other']:.1f} ({r['mlflow']:.1f} + {r['other'] - r['mlflow']:.1f}) | "
                     f"{1000 * r['other'] / max(r['trials'], 1):.0f} | {share:.0%} |")
    one, fused = rows["--fuse 1"], rows["default"]
    bound = one["training"] / max(fused["training"], 1e-9)
    lines += ["", f"Training alone: {one['training']:.1f} s at --fuse 1, {fused['training']:.1f} s at the default, "
              f"{bound:.1f}x: the most the study speedup could be with no start-up and no bookkeeping. The "
              f"bookkeeping per trial ({1000 * fused['other'] / max(fused['trials'], 1):.0f} ms) does not shrink "
              "with fusion."]
    return "\n".join(lines), one["wall"] / fused["wall"]


def tiny(trials: int, folder: Path, storage: str = "sqlite") -> dict[str, float]:
    """The tiny study of `trials` trials in `folder`: ms a trial in all (from the first trial's start to the last
    one's end), and the bookkeeping a trial (wall less training) over its first and its last window of trials."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    c, wall = _child(TINY | {"budget": {"trials": trials}}, folder, storage)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the study's process and its writer (waited for)
    marks = c["marks"]
    window = min(1000, len(marks) // 3)

    def bookkeeping(i: int, j: int) -> float:  # ms a trial from the end of trial i to the end of trial j
        (t0, train0, _), (t1, train1, _) = marks[i], marks[j]
        return 1000 * ((t1 - t0) - (train1 - train0)) / (j - i)

    span = marks[-1][0] - c["first_trial"]
    # the trainer's CPU time a trial (training included): what its critical path costs on an idle core, where a
    # shared machine's load stretches the wall times
    cpu = 1000 * (marks[-1][2] - marks[0][2]) / max(len(marks) - 1, 1)
    all_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"trials": c["trials"], "per_trial": 1000 * span / c["trials"], "cpu": cpu,
            "all_cpu": all_cpu, "all_wall": wall, "trainer_cpu": c.get("trainer_cpu", 0.0),
            "writer_cpu": c.get("writer_cpu", 0.0),
            "load": os.getloadavg()[0],
            "training": 1000 * marks[-1][1] / c["trials"], "mlflow": 1000 * c["mlflow"] / c["trials"],
            "window": window, "first": bookkeeping(0, window), "last": bookkeeping(len(marks) - 1 - window,
                                                                                    len(marks) - 1)}


def finished_runs(folder: Path) -> tuple[int, int]:
    """(trial runs FINISHED, trial runs) in the tiny study's MLflow store, read once the study has returned."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("bstune").experiment_id],
                              "tags.`bstune.kind` = 'trial'", max_results=50000)
    return sum(r.info.status == "FINISHED" for r in runs), len(runs)


def tiny_row(r: dict[str, float]) -> str:
    """One Markdown row of a tiny study's numbers."""
    return (f"| {r['trials']:,} | {r['per_trial']:.0f} | {r['cpu']:.0f} | {r['training']:.1f} | {r['mlflow']:.1f} | "
            f"{r['first']:.0f} | {r['last']:.0f} ({r['window']:,} trials a window) | "
            f"{r['all_wall']:.1f} s; CPU {r['all_cpu']:.1f} s: trainer {r['trainer_cpu']:.1f}, writer "
            f"{r['writer_cpu']:.1f} | {r['load']:.1f} |")


TINY_HEADER = ("| trials | ms a trial, all | trainer CPU ms a trial | of it training | MLflow on the critical path | "
               "bookkeeping a trial, first window | last window | the whole run (start-up, writer included) | "
               "load at the end |\n"
               "|---:|---:|---:|---:|---:|---:|---|---|---:|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", type=int, help="run the tiny study with this many trials instead")
    ap.add_argument("--check", action="store_true", help="with --tiny: exit 1 unless issue 29's check holds")
    ap.add_argument("--storage", choices=sorted(STORAGES), default="sqlite",
                    help="the Optuna storage: sqlite (the embedded default) or journal (a journal:/// file)")
    args = ap.parse_args()
    if args.tiny is None:
        table, speedup = section(storage=args.storage)
        print(table)
        print(f"study speedup (fuse 1 / default, same trials): {speedup:.1f}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        r = tiny(args.tiny, Path(tmp), args.storage)
        finished, runs = finished_runs(Path(tmp))
    print(TINY_HEADER)
    print(tiny_row(r))
    print(f"trial runs in MLflow: {runs} for {r['trials']} trials, {finished} FINISHED")
    if args.check and not (r["per_trial"] <= 25 and r["last"] <= r["first"] and finished == runs == r["trials"]):
        sys.exit(f"issue 29's check fails: {r['per_trial']:.0f} ms a trial (<= 25), last window "
                 f"{r['last']:.0f} ms vs first {r['first']:.0f} ms, {finished} of {r['trials']} trials a "
                 "finished MLflow run")


if __name__ == "__main__":
    main()
