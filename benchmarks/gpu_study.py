"""A short study in CIFAR-10's own format on the GPU, fused and compiled: the whole path a CIFAR study takes.

Writes random images as a CIFAR-10 archive (the real format: pickled batches under cifar-10-batches-py), runs
`bstune study` on them with studies/cifar.yaml's net, compile reduce-overhead and the default fusion, and prints
one Markdown row: trials, wall time, training time and examples per second. Run by benchmarks/gpu.sh.

    python benchmarks/gpu_study.py [--device cuda] [--n 50000] [--trials 16] [--epochs 2]
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_archive(root: Path, n: int, seed: int = 0) -> None:
    """n training images in five batches and n/5 test images, as torchvision's CIFAR10 reads them."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    sizes = {f"data_batch_{i}": n // 5 for i in range(1, 6)} | {"test_batch": max(n // 5, 1)}
    for name, size in sizes.items():
        batch = {"batch_label": name, "labels": [int(x) for x in rng.integers(0, 10, size)],
                 "data": rng.integers(0, 256, size=(size, 3072), dtype=np.uint8),
                 "filenames": [f"{i}.png" for i in range(size)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n // 5,
                     "num_vis": 3072}, f, protocol=2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--width", type=int, default=None, help="default: studies/cifar.yaml's")
    p.add_argument("--compile", default="reduce-overhead")
    args = p.parse_args()
    spec = yaml.safe_load((ROOT / "studies" / "cifar.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_archive(folder / "data", args.n)
        w = spec["workload"]
        w.update(data_dir=str(folder / "data"), download=False, epochs=args.epochs, compile=args.compile,
                 warmup_epochs=min(w.get("warmup_epochs", 0), args.epochs / 4))
        w.pop("n_train", None)
        if args.width:
            w["width"] = args.width
        spec["search"]["batch_sizes"] = [128, 256]
        spec["budget"] = {"trials": args.trials}
        spec["search"]["pruner"] = {"name": "median", "n_warmup_epochs": 1}  # hyperband's rungs need more epochs
        spec.update(name="gpu-study", storage=f"sqlite:///{folder}/optuna.db",
                    tracking_uri=f"sqlite:///{folder}/mlflow.db")
        spec.pop("execution", None)  # the default fusion for the device and model
        path = folder / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "bstune.cli", "study", str(path), "--device", args.device],
                             capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if run.returncode:
            print(run.stdout[-3000:] + run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        import optuna

        trials = optuna.load_study(study_name="gpu-study", storage=spec["storage"]).trials
        examples = sum(t.user_attrs.get("examples_seen", 0) for t in trials)
        training = sum(t.user_attrs.get("train_seconds", 0.0) for t in trials)
    print("| trials | batch sizes | epochs | compile | wall s | training s (summed shares) | examples/s of wall |")
    print("|---:|---|---:|---|---:|---:|---:|")
    print(f"| {len(trials)} | 128, 256 | {args.epochs} | {args.compile} | {wall:.0f} | {training:.0f} | "
          f"{examples / wall:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
