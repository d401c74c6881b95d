"""Peak memory and time of `bstune status` and `bstune analyze` on a large finished study. A script, not a test:

    python benchmarks/study_memory.py [--trials 10000] [--epochs 12]

It writes a study of ``--trials`` trials as bstune records them (params, attributes, a learning curve of
``--epochs`` points and as many intermediate values) into a SQLite storage in a temporary folder, bulk-added,
then runs each command in a child process and prints its wall time and peak resident memory (the child's
``ru_maxrss``). Targets (issue 31): both within 500 MB at 10,000 trials.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from bstune.stores import open_storage

BATCH_SIZES = [16, 32, 64, 128, 256, 512]


def _trial(rng: random.Random, n: int, epochs: int) -> optuna.trial.FrozenTrial:
    b = rng.choice(BATCH_SIZES)
    lr, m = 10 ** rng.uniform(-3, 0.5), 1 - 10 ** rng.uniform(-2, 0)
    curve = [{"epoch": e, "value": 2.0 / e + rng.uniform(0, 0.1), "optimizer_steps": e * (1500 // b),
              "examples_seen": e * 1500} for e in range(1, epochs + 1)]
    return create_trial(
        state=TrialState.COMPLETE, value=curve[-1]["value"],
        params={"batch_size": b, "lr": lr, "one_minus_momentum": 1 - m},
        distributions={"batch_size": CategoricalDistribution(BATCH_SIZES), "lr": FloatDistribution(1e-3, 3.2, log=True),
                       "one_minus_momentum": FloatDistribution(0.01, 1.0, log=True)},
        user_attrs={"bstune.state": "COMPLETE", "lr": lr, "momentum": m, "effective_lr": lr / (1 - m),
                    "batch_size": b, "curve": json.dumps(curve), "examples_seen": epochs * 1500,
                    "train_seconds": 0.5, "mlflow_run_id": f"{n:032x}", "bstune.worker": "host:1", "worker_pid": 1},
        intermediate_values={p["epoch"]: p["value"] for p in curve},
    )


def make_study(folder: Path, trials: int, epochs: int) -> Path:
    spec = {"name": "big", "workload": {"dataset": "synthetic", "n_train": 1500, "model": "mlp", "epochs": epochs},
            "search": {"batch_sizes": BATCH_SIZES}, "budget": {"trials": trials},
            "storage": f"sqlite:///{folder}/optuna.db", "tracking_uri": f"sqlite:///{folder}/mlflow.db"}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    storage = open_storage(spec["storage"], writing=True)  # a write-ahead log: no sync per trial written
    study = optuna.create_study(study_name="big", storage=storage)
    study.set_user_attr("bstune.spec", spec)
    study.set_user_attr("bstune.n_train", 1500)
    rng = random.Random(0)
    study.add_trials([_trial(rng, n, epochs) for n in range(trials)])
    return path


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds and peak RSS (MB) of a child process, and its exit code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:  # ru_maxrss is the largest child so far: run the smaller commands first
        print(f"  (peak not above an earlier child's: {before / 1024:.0f} MB)", file=sys.stderr)
    if run.returncode:
        print(run.stdout[-500:], run.stderr[-2000:], file=sys.stderr)
    return seconds, peak / 1024, run.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=12)
    a = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        spec = make_study(Path(tmp), a.trials, a.epochs)
        print(f"study of {a.trials:,} trials x {a.epochs} epochs written in {time.perf_counter() - t0:.0f} s")
        print(f"{'command':<32s} {'seconds':>8s} {'peak MB':>8s} {'exit':>5s}")
        for name, args in (("status", ["status", str(spec)]),
                           ("analyze --no-mlflow", ["analyze", str(spec), "--no-mlflow", "--json", "-"])):
            seconds, mb, code = measure([sys.executable, "-m", "bstune.cli", *args])
            print(f"{name:<32s} {seconds:8.1f} {mb:8.0f} {code:5d}")


if __name__ == "__main__":
    main()
