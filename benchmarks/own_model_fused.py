"""Fusing a user's model by torch.func: K trials of one batch size as one `FuncStacked` model against the same K
trials one at a time, and the hand-stacked built-in MLP for scale. Not a test: prints a Markdown table.

The user's model is tests/own_workload.py's (Linear, BatchNorm1d, ReLU, Dropout, Linear on scikit-learn's wine
data, 140 training examples), or with --mnist1d examples/mnist1d's CNN on MNIST-1D (needs `pip install
mnist1d`). One CPU thread, best of --repeats, whole runs (set-up, training, evaluation, probes).

    python benchmarks/own_model_fused.py               # wine, B = 8, 32, 128
    python benchmarks/own_model_fused.py --mnist1d     # MNIST-1D's CNN, B = 32, 128, 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bstune.spec import Workload  # noqa: E402
from bstune.train import TrainConfig, load_dataset, train, train_fused  # noqa: E402


def _best(fn, repeats: int) -> float:  # noqa: ANN001 - a thunk
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist1d", action="store_true")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mnist1d:
        entry = str(ROOT / "examples" / "mnist1d" / "mnist1d_cnn.py")
        data, model, sizes = load_dataset(Workload(dataset=f"{entry}:data")), f"{entry}:model", (32, 128, 512)
    else:
        data, model, sizes = load_dataset(Workload(dataset="tests.own_workload:data")), "tests.own_workload:model", \
            (8, 32, 128)
    print(f"{data.n_train} training examples, K = {args.k}, {args.epochs} epochs, one thread, best of {args.repeats}")
    print("| B | K lone runs (s) | K fused, torch.func (s) | speedup | built-in mlp: lone (s) | hand-stacked (s) |")
    print("|---|---|---|---|---|---|")
    for b in sizes:
        row = [b]
        for name in (model, "mlp"):
            cfgs = [TrainConfig(batch_size=b, lr=0.02 * (i + 1), momentum=0.5, epochs=args.epochs, model=name,
                                width=32) for i in range(args.k)]
            lone = _best(lambda cfgs=cfgs: [train(c, data) for c in cfgs], args.repeats)
            fused = _best(lambda cfgs=cfgs: train_fused(cfgs, data), args.repeats)
            row += [f"{lone:.2f}", f"{fused:.2f}"] + ([f"{lone / fused:.1f}x"] if name == model else [])
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
