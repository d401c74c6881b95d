"""The one-momentum columns of the digits-momentum grid as grids of their own: real valleys the analysis at one
momentum was never developed on (it was on digits-sgd at momentum 0.9), scored as real_coverage.py scores.

    python benchmarks/real_heldout.py [--momenta 0,0.5] [--trials 16,24] [--replicates 60] [--seeds 4-7]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_coverage import _seeds, row, run_cell  # noqa: E402
from benchmarks.real_grids import load  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--momenta", default="0,0.5")
    p.add_argument("--trials", default="16,24")
    p.add_argument("--replicates", type=int, default=60)
    p.add_argument("--seeds", default="4-7", help="training seeds the studies are drawn at")
    p.add_argument("--n-boot", type=int, default=200)
    args = p.parse_args()
    grid = load("digits-momentum")
    every = sorted({r["seed"] for r in grid})
    for m in (float(v) for v in args.momenta.split(",")):
        rows = [r for r in grid if r["momentum"] == m]
        sizes = sorted({r["batch_size"] for r in rows})
        for n in (int(v) for v in args.trials.split(",")):
            t0 = time.time()
            t = run_cell(rows, f"digits-m{m:g}", _seeds(args.seeds), sizes, n, args.replicates, every, args.n_boot)
            print(row(f"digits-momentum at m={m:g}", ",".join(map(str, sizes)), n, t, args.replicates),
                  f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
