"""Scale-out: trials per minute of the digits study with 1, 2 and 4 workers on this machine.

Not a test: prints a Markdown table. Each run is `bstune study studies/digits.yaml --workers N` (N = 1 is
the plain single-process command) on fresh temporary stores, with the trial budget cut to --trials and no
time limit. Trials per minute use the study's own clock, from the first trial's start to the last trial's
end; the fixed start-up (imports, creating the MLflow store, starting the workers) is in the wall time.
"Steady" counts only the trials started once every worker was up (the others' start-up, which competes for
the CPU, is over by then). Workers share the CPU cores, so on 2 cores expect 2x at most.

    python benchmarks/workers.py                        # 1, 2 and 4 workers, 48 trials each
    python benchmarks/workers.py --trials 12 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parent.parent


def run(n_workers: int, trials: int) -> dict[str, float]:
    """One study of `trials` trials with `n_workers` workers; its timings."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = yaml.safe_load((ROOT / "studies" / "digits.yaml").read_text())
        spec["budget"] = {"trials": trials}
        spec["storage"] = f"sqlite:///{tmp}/optuna.db"
        spec["tracking_uri"] = f"sqlite:///{tmp}/mlflow.db"
        path = Path(tmp) / "digits.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bstune.cli", "study", str(path), "--workers", str(n_workers)],
                       cwd=tmp, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        done = [t for t in optuna.load_study(study_name=spec["name"], storage=spec["storage"]).trials
                if t.datetime_complete is not None]
    end = max(t.datetime_complete for t in done)
    span = (end - min(t.datetime_start for t in done)).total_seconds()
    first = {}  # each worker's first trial start
    for t in sorted(done, key=lambda t: t.datetime_start):
        first.setdefault(t.user_attrs["bstune.worker"], t.datetime_start)
    all_up = max(first.values())
    steady = [t for t in done if t.datetime_start >= all_up]
    return {"workers": n_workers, "trials": len(done), "wall": wall, "span": span,
            "per_minute": 60 * len(done) / span, "steady": 60 * len(steady) / (end - all_up).total_seconds(),
            "n_steady": len(steady), "up": len(first), "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=48, help="trial budget of each study (default 48)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts (default 1 2 4)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows = [run(n, args.trials) for n in args.workers]
    base, base_steady = rows[0]["per_minute"], rows[0]["steady"]
    print(f"digits study, {args.trials} trials per run; {os.cpu_count()} CPU cores\n")
    print("| workers | trials/min | vs 1st row | steady trials/min (trials) | vs 1st row | study time (s) "
          "| wall time (s) | load before |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['per_minute']:.1f} | {r['per_minute'] / base:.2f}x "
              f"| {r['steady']:.1f} ({r['n_steady']}) | {r['steady'] / base_steady:.2f}x "
              f"| {r['span']:.1f} | {r['wall']:.1f} | {r['load']:.1f} |")


if __name__ == "__main__":
    main()
