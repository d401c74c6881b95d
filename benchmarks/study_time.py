"""Where a study's wall time goes: start-up, training, and logging/storage, at --fuse 1 and at the default.

Runs studies/digits.yaml as shipped (its trial budget, its seed) in a fresh process per setting, with fresh stores
in a temporary folder, and splits its wall time:

- start-up: from launching the process to the first trial (imports, loading the data, opening the stores);
- training: time inside the trainer (`train_fused`), less the per-epoch callbacks it makes;
- logging/storage: the rest, split into MLflow (the trial runs' writes: `Tracker.start_trial`, `log_epoch`,
  `end_trial`) and Optuna (its storage, the samplers and the pruners, the progress output).

Used by benchmarks/fused.py, whose FUSED.md ends with the speedup; run alone it prints the table.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

DEFINITIONS = """\
- start-up: from launching the process to the first trial (imports, loading the data, opening the stores);
- training: time inside the trainer (`train_fused`), less the per-epoch callbacks it makes;
- logging/storage: the rest, split into MLflow (the trial runs' writes: `Tracker.start_trial`, `log_epoch`,
  `end_trial`) and Optuna (its storage, the samplers and the pruners, the progress output)."""
ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "studies" / "digits.yaml"

# Run in the child: times the study from the inside by wrapping the trainer and the per-epoch callback.
_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import bstune.search.objective as objective
from bstune.search import SilentProgress, run_study
from bstune.spec import load_spec
from bstune.tracking import Tracker

clock = {"training": 0.0, "callbacks": 0.0, "mlflow": 0.0, "first_trial": None}

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

class FirstTrial(SilentProgress):
    def trial_started(self, number, config):
        if clock["first_trial"] is None:
            clock["first_trial"] = time.perf_counter() - t0

result = run_study(load_spec(sys.argv[1]), progress=FirstTrial())
clock.update(total=time.perf_counter() - t0, trials=result.spent.trials)
print(json.dumps(clock))
"""


def run(fuse: int | None, folder: Path) -> dict[str, float]:
    """One study at `fuse` (None: the default) in `folder`; its wall time split, in seconds."""
    spec = yaml.safe_load(SPEC.read_text())
    spec.update(storage=f"sqlite:///{folder}/optuna.db", tracking_uri=f"sqlite:///{folder}/mlflow.db")
    spec.setdefault("budget", {}).pop("seconds", None)  # the same trials at every setting, however long they take
    if fuse is not None:
        spec["execution"] = {"fuse": fuse}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    wall = time.perf_counter() - start
    c = json.loads(out.strip().splitlines()[-1])
    launch = wall - c["total"]  # the interpreter's own start, before the child's clock
    training = c["training"] - c["callbacks"]
    startup = launch + c["first_trial"]
    return {"trials": c["trials"], "wall": wall, "startup": startup, "training": training,
            "other": wall - startup - training, "mlflow": c["mlflow"]}


def section(repeats: int = 1) -> tuple[str, float]:
    """The Markdown table (fuse 1 and default, best wall of `repeats`) and the speedup fuse 1 / default."""
    rows = {}
    for label, fuse in (("--fuse 1", 1), ("default", None)):
        best = None
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                r = run(fuse, Path(tmp))
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


if __name__ == "__main__":
    table, speedup = section()
    print(table)
    print(f"study speedup (fuse 1 / default, same trials): {speedup:.1f}")
