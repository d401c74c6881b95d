"""What a study of one training seed cannot see: the answer of an oracle that knows its own seed's whole curve.

    python benchmarks/real_oracle.py [--grids digits-sgd,mnist1d-sgd]

For every training seed s and batch size of a grid, against the reference real_coverage.py scores with (the
seed-mean of the other seeds): the value bias of reading lr* and the value off seed s's own curve exactly
(its vertex, no noise of sampling, no smoother), and whether the stretch where s's own curve stays within
1.1x / 1.2x of its minimum reaches where the reference is 1.5x its best, or holds the reference's lr*. An
estimator from one seed's trials does no better than this oracle on average; what the oracle misses is the
seeds' difference, which only runs at several seeds show (benchmarks/REAL.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_coverage import _seed_mean, _span, _vertex  # noqa: E402
from benchmarks.real_grids import load  # noqa: E402

FACTORS = (1.1, 1.2)


def grid_rows(grid: str) -> list[str]:
    """One table row per batch size of ``grid``, means over its seeds, and one for all."""
    rows = load(grid)
    xs = np.unique(np.round(np.log2([r["lr"] for r in rows]), 6))
    seeds = sorted({r["seed"] for r in rows})
    out, total = [], []
    for b in sorted({r["batch_size"] for r in rows}):
        mat = np.full((len(seeds), len(xs)), np.nan)
        for r in rows:
            if r["batch_size"] == b and r["state"] == "COMPLETE" and math.isfinite(r["value"]):
                mat[seeds.index(r["seed"]), np.searchsorted(xs, round(math.log2(r["lr"]), 6))] = r["value"]
        per_seed = []
        for i in range(len(seeds)):
            ref = _seed_mean(np.delete(mat, i, axis=0))
            own = np.where(np.isfinite(mat[i]), mat[i], np.nanmax(mat))  # a diverged run: the worst, a wall
            at = _vertex(xs, own)
            ref_lr, best = _vertex(xs, ref), float(ref.min())
            row = [float(np.interp(at, xs, own) - np.interp(at, xs, ref))]
            for f in FACTORS:
                lo, hi = _span(xs, own, f)
                inside = np.linspace(lo, hi, 25)
                row += [float(np.interp(inside, xs, ref).max() >= 1.5 * best), float(lo <= ref_lr <= hi)]
            per_seed.append(row)
        m = np.mean(per_seed, axis=0)
        total.append(m)
        out.append(f"| {grid} | {b} | {m[0]:+.4f} | " + " | ".join(f"{v:.2f}" for v in m[1:]) + " |")
    m = np.mean(total, axis=0)
    out.append(f"| {grid} | all | {m[0]:+.4f} | " + " | ".join(f"{v:.2f}" for v in m[1:]) + " |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default="digits-sgd,mnist1d-sgd")
    args = p.parse_args()
    head = "| grid | B | value bias (own vertex) | " + " | ".join(
        f"within {f}x of own best: reaches 1.5x | holds lr\\*" for f in FACTORS) + " |"
    print(head + "\n" + "|---" * (3 + 2 * len(FACTORS)) + "|")
    for grid in args.grids.split(","):
        print("\n".join(grid_rows(grid)))


if __name__ == "__main__":
    main()
