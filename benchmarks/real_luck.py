"""The value's bias with each training seed's luck taken out, and how finely a few seeds can measure it.

    python benchmarks/real_luck.py [--grids digits-sgd,mnist1d-sgd,digits-m0,digits-m0.5] [--trials 16,24]
                                   [--replicates 60] [--seeds 4-7]

A study's value error (value reported - the other seeds' mean at the recommended lr, as real_coverage.py
scores it) carries its seed's luck: a seed whose runs near the optimum sit above or below the others' mean
moves every study drawn at it. Over 4 reporting seeds that luck does not average out: its spread over seeds
sets a floor on how finely the value's bias is measured. Each seed's luck at a batch size is measured where the
study does not choose: its own run at the reference's lr\\* (linear in log2 lr) minus the other seeds' mean
there, zero on average over exchangeable seeds. Subtracting it from each optimum's error (a control variate)
keeps the expectation and removes the seed's level; what is left is the estimator's own bias, including the
winner's curse of choosing lr where the seed ran low. Standard errors are over seeds (studies of one seed
share its luck). The studies are real_coverage.py's (and real_heldout.py's: digits-m0 and digits-m0.5 are the
one-momentum columns of digits-momentum), drawn alike: the "value bias" column repeats REAL.md's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_coverage import _seeds, ref_value, reference, run_cell  # noqa: E402
from benchmarks.real_grids import load  # noqa: E402
from benchmarks.real_value import own_curves  # noqa: E402

GRIDS = {"digits-sgd": ("digits-sgd", None), "mnist1d-sgd": ("mnist1d-sgd", None),
         "digits-m0": ("digits-momentum", 0.0), "digits-m0.5": ("digits-momentum", 0.5)}


def luck(rows: list[dict]) -> dict[tuple[int, int], float]:
    """Each (seed, batch size)'s own run at the reference lr* less the other seeds' mean there."""
    xs = np.unique(np.round(np.log2([r["lr"] for r in rows]), 6))
    seeds, own = sorted({r["seed"] for r in rows}), own_curves(rows, xs)
    out = {}
    for s in seeds:
        ref = reference(rows, [q for q in seeds if q != s], np.random.default_rng(1000 + s))
        for b, x in ref.lr.items():
            curve = own[(s, b)]
            ok = np.isfinite(curve)
            out[(s, b)] = float(np.interp(x, xs[ok], curve[ok])) - ref_value(ref, b, x) if ok.any() else math.nan
    return out


def by_seed(values: np.ndarray, seeds: np.ndarray) -> tuple[float, float]:
    """The mean of ``values`` and its standard error over seeds (each seed's mean one observation)."""
    ok = np.isfinite(values)
    means = [values[ok & (seeds == s)].mean() for s in np.unique(seeds[ok])]
    se = float(np.std(means, ddof=1) / math.sqrt(len(means))) if len(means) > 1 else math.nan
    return float(values[ok].mean()), se


def spread_line(name: str, lk: dict[tuple[int, int], float], report: list[int]) -> str:
    seeds = sorted({s for s, _ in lk})
    level = np.array([np.nanmean([v for (s, _), v in lk.items() if s == q]) for q in seeds])
    rep = np.array([level[seeds.index(s)] for s in report])
    return (f"| {name} | {np.nanstd(level, ddof=1):.4f} | {np.nanstd(level, ddof=1) / math.sqrt(len(report)):.4f} "
            f"| {np.nanmean(rep):+.4f} | {np.nanstd(list(lk.values()), ddof=1):.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default=",".join(GRIDS))
    p.add_argument("--trials", default="16,24")
    p.add_argument("--replicates", type=int, default=60)
    p.add_argument("--seeds", default="4-7", help="training seeds the studies are drawn at")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--spread-only", action="store_true", help="print the seeds' luck and stop (no studies)")
    args = p.parse_args()
    spread = ["| grid | sd of a seed's luck (mean over B) | SE of a mean over the reporting seeds | their mean "
              "| sd of one (seed, B) |", "|---|---|---|---|---|"]
    rows_out = ["| grid | n per B | optima | value bias | its SE over seeds | the same optima's luck "
                "| value bias, luck taken out | its SE over seeds |", "|---|---|---|---|---|---|---|---|"]
    for name in args.grids.split(","):
        source, m = GRIDS[name]
        rows = [r for r in load(source) if m is None or r["momentum"] == m]
        lk = luck(rows)
        spread.append(spread_line(name, lk, _seeds(args.seeds)))
        if args.spread_only:
            continue
        every, sizes = sorted({r["seed"] for r in rows}), sorted({r["batch_size"] for r in rows})
        for n in map(int, args.trials.split(",")):
            t0 = time.time()
            t = run_cell(rows, name, _seeds(args.seeds), sizes, n, args.replicates, every, args.n_boot)
            err, at = np.array(t.value_err), np.array(t.value_at)
            own = np.array([lk[(int(s), int(b))] for s, b in at])
            raw, adj = by_seed(err, at[:, 0]), by_seed(err - own, at[:, 0])
            rows_out.append(f"| {name} | {n} | {len(err)} | {raw[0]:+.4f} | {raw[1]:.4f} | {np.nanmean(own):+.4f} "
                            f"| {adj[0]:+.4f} | {adj[1]:.4f} |")
            print(rows_out[-1], f"{time.time() - t0:.0f}s", flush=True)
    print("\n".join(spread), "", *([] if args.spread_only else rows_out), sep="\n")


if __name__ == "__main__":
    main()
