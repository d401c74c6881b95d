"""Dense reference grids of real training runs, made with bstune's own fused trainer, cached as gzipped CSVs.

    python benchmarks/real_grids.py [--grids digits-sgd,mnist1d-sgd,digits-adam] [--seeds 0-7] [--jobs 1]

Each grid: batch sizes x a half-octave lr grid x training seeds (x momenta), constant lr, every run trained to
the end (no pruning) by ``bstune.train.train_fused``: the K lrs (and momenta) of one batch size and seed form one
stacked model, as a bstune study's fused group would. One row per run: B, lr, momentum, seed, the final
val_loss, the per-epoch val_loss and whether it diverged. A grid already cached is skipped (delete its file to
rebuild it); progress goes to stdout, one line per (batch size, seed). docs/real-grids.md says what the grids
are and how long they took.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bstune.train import train_fused
from bstune.train.config import TrainConfig
from bstune.train.data import Dataset, load_dataset
from bstune.train.loop import Diverged

HERE = Path(__file__).parent
GRID_DIR = HERE / "real_grids"
COLUMNS = ("batch_size", "lr", "momentum", "seed", "state", "value", "epoch_values")


@dataclass(frozen=True)
class Grid:
    """One reference grid: the workload, and the points trained at every (batch size, seed)."""

    name: str
    dataset: str
    optimizer: str
    batch_sizes: tuple[int, ...]
    log2_lrs: tuple[float, ...]
    momenta: tuple[float, ...]
    epochs: int
    model: str = "mlp"
    width: int = 128

    @property
    def path(self) -> Path:
        return GRID_DIR / f"{self.name}.csv.gz"


def _half_octaves(lo: float, hi: float) -> tuple[float, ...]:
    return tuple(lo + 0.5 * i for i in range(int(round((hi - lo) / 0.5)) + 1))


GRIDS = {
    g.name: g for g in (
        Grid("digits-sgd", "digits", "sgd", (8, 16, 32, 64, 128, 256, 512), _half_octaves(-10, 3), (0.9,), 20),
        Grid("digits-momentum", "digits", "sgd", (16, 64, 256), _half_octaves(-10, 3), (0.0, 0.5, 0.9, 0.98), 20),
        Grid("mnist1d-sgd", "mnist1d", "sgd", (8, 16, 32, 64, 128, 256, 512), _half_octaves(-10, 3), (0.9,), 20),
        Grid("digits-adam", "digits", "adam", (8, 16, 32, 64, 128, 256, 512), _half_octaves(-14, -1), (0.9,), 20),
    )
}


def mnist1d_dataset() -> Dataset:
    """MNIST-1D (Greydanus & Kobak): 4,000 training and 1,000 test signals of length 40, 10 classes, generated
    offline by the ``mnist1d`` package (the optional ``bench`` extra)."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype)

    return Dataset("mnist1d", t(d["x"], torch.float32), t(d["y"], torch.int64), t(d["x_test"], torch.float32),
                   t(d["y_test"], torch.int64), num_classes=10)


def dataset(name: str) -> Dataset:
    if name == "mnist1d":
        return mnist1d_dataset()
    from bstune.spec import Workload

    return load_dataset(Workload(dataset=name))


def run_group(grid: Grid, data: Dataset, b: int, seed: int) -> list[dict[str, object]]:
    """Every (lr, momentum) of the grid at batch size b and one seed, trained as one fused group."""
    points = [(2.0**x, m) for m in grid.momenta for x in grid.log2_lrs]
    configs = [TrainConfig(batch_size=b, lr=lr, momentum=m, optimizer=grid.optimizer, epochs=grid.epochs,
                           lr_schedule="constant", seed=seed, model=grid.model, width=grid.width,
                           diagnostics_every=0, grad_histogram_epochs=()) for lr, m in points]
    rows = []
    for (lr, m), res in zip(points, train_fused(configs, data), strict=True):
        diverged = isinstance(res.error, Diverged)
        if res.error is not None and not diverged:
            raise res.error
        curve = [e.val_loss for e in res.history]
        final = curve[-1] if curve and not diverged else math.nan
        rows.append({"batch_size": b, "lr": lr, "momentum": m, "seed": seed,
                     "state": "DIVERGED" if diverged else "COMPLETE", "value": final,
                     "epoch_values": " ".join(f"{v:.5g}" for v in curve)})
    return rows


def build(grid: Grid, seeds: Sequence[int], sizes: Sequence[int]) -> None:
    """Train the grid (the largest batch sizes first: they are the cheapest) and write it. Each (batch size,
    seed) group is kept as it finishes (in a .partial file), so a stopped build resumes where it was."""
    data = dataset(grid.dataset)
    partial = grid.path.with_suffix(".partial")
    rows = read_rows(partial) if partial.exists() else []
    done = {(r["batch_size"], r["seed"]) for r in rows}
    t0 = time.perf_counter()
    for b in sorted(sizes, reverse=True):
        for seed in seeds:
            if (b, seed) in done:
                continue
            group = run_group(grid, data, b, seed)
            rows += group
            write(partial, rows)
            print(f"{grid.name}: B={b} seed={seed} done, {time.perf_counter() - t0:.0f}s", flush=True)
    write(grid.path, rows)
    partial.unlink()
    print(f"{grid.name}: {len(rows)} runs in {time.perf_counter() - t0:.0f}s -> {grid.path}", flush=True)


def write(path: Path, rows: Sequence[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    # written aside and renamed, so a build stopped mid-write keeps its last whole .partial file
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", compresslevel=9) as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def load(name: str) -> list[dict[str, object]]:
    """A cached grid's rows (value: float, nan where the run diverged)."""
    return read_rows(GRIDS[name].path)


def read_rows(path: Path) -> list[dict[str, object]]:
    with gzip.open(path, "rt") as f:
        return [{"batch_size": int(r["batch_size"]), "lr": float(r["lr"]), "momentum": float(r["momentum"]),
                 "seed": int(r["seed"]), "state": r["state"], "value": float(r["value"]),
                 "epoch_values": r["epoch_values"]} for r in csv.DictReader(f)]


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default=",".join(GRIDS))
    p.add_argument("--seeds", default="0-7")
    p.add_argument("--batch-sizes", default="", help="comma-separated subset of the grid's (default: all)")
    args = p.parse_args()
    torch.set_num_threads(1)
    for name in args.grids.split(","):
        grid = GRIDS[name]
        if grid.path.exists():
            print(f"{name}: cached at {grid.path}", flush=True)
            continue
        sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else grid.batch_sizes
        build(grid, _seeds(args.seeds), sizes)


if __name__ == "__main__":
    main()
