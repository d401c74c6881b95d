"""Valley shape: where `analyze()` puts lr* against the best lr of a dense grid, with the valley profile it fits
(a parabola in (lr/lr*)^(1/2)) and with a parabola in log lr. A benchmark, not a test:

    python benchmarks/valley_shape.py [studies/adam-vs-sgd.yaml] [--seeds 4] [--momentum 0.9] [--jobs 2]

Runs the study's workload at every batch size of its search over lrs half an octave apart (its lr range),
at one momentum, for a few training seeds (2000, 2001, ...: none a study uses), about 500 trials for the
default. The reference per batch size is the grid's own best lr (the seed-averaged value, refined by the
parabola through the best point and its neighbours); then each seed's grid alone is analysed as a study
would be, and the table gives the mean |log2(lr* / reference)| over the batch sizes and the fitted exponent
of lr* ~ B^alpha. About 1.5 minutes on 2 CPU cores for the default.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp

import numpy as np

# the sibling benchmark's grid runner and readers (the script runs from benchmarks/, which is on the path)
from searchbench import _init_worker, _run_point, column_optimum, column_profile, trial_table  # noqa: I001

import bstune.analysis.pooled as pooled  # the valley profile's power, swapped below
from bstune.analysis import analyze
from bstune.spec import load_spec
from bstune.train import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="studies/adam-vs-sgd.yaml")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--momentum", type=float, default=None, help="default: the study's, else 0.9")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    spec = load_spec(args.spec)
    s = spec.search
    m = args.momentum if args.momentum is not None else s.momentum[0] if s.momentum[0] == s.momentum[1] else 0.9
    lo, hi = math.log2(s.lr[0]), math.log2(s.lr[1])
    lrs = [2.0 ** (lo + 0.5 * i) for i in range(int((hi - lo) / 0.5) + 1)]
    seeds = [2000 + i for i in range(args.seeds)]
    points = [(b, lr, m, seed) for seed in seeds for b in s.batch_sizes for lr in lrs]
    print(f"{spec.name}: {len(points)} trials ({len(s.batch_sizes)} batch sizes x {len(lrs)} lrs x {len(seeds)} "
          f"seeds, momentum {m:g})", flush=True)
    with mp.get_context("spawn").Pool(args.jobs, initializer=_init_worker, initargs=(spec,)) as pool:
        rows = pool.map(_run_point, [(spec, p) for p in points], chunksize=4)
    sign = 1.0 if s.direction == "minimize" else -1.0
    n_train = load_dataset(spec.workload).n_train
    reference = {}
    for b in s.batch_sizes:
        column = [r for r in rows if r["batch_size"] == b]
        opt = column_optimum(np.log2(lrs), column_profile(column, lrs, seeds, sign))
        reference[b] = None if opt is None else opt[0]
    print("grid's best lr (log2), seed-averaged: "
          + ", ".join(f"B={b}: {'-' if x is None else f'{x:.2f}'}" for b, x in reference.items()))
    print("\n| valley profile | seed | mean error (octaves) | alpha |\n|---|---:|---:|---:|")
    for name, power in (("parabola in (lr/lr*)^(1/2)", pooled._WALL_POWER), ("parabola in log lr", 1e-6)):
        saved, pooled._WALL_POWER = pooled._WALL_POWER, power
        try:
            for seed in seeds:
                a = analyze(trial_table([r for r in rows if r["seed"] == seed], spec, n_train))
                errors = [abs(math.log2(o.lr) - reference[o.batch_size]) for o in a.per_batch
                          if o.lr is not None and reference[o.batch_size] is not None]
                alpha = a.fits["power"].alpha if "power" in a.fits else None
                print(f"| {name} | {seed} | {np.mean(errors):.2f} | {'-' if alpha is None else f'{alpha:.2f}'} |")
        finally:
            pooled._WALL_POWER = saved


if __name__ == "__main__":
    main()
