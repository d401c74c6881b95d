"""Where the value's error comes from, on studies drawn from a real grid as real_coverage.py draws them.

    python benchmarks/real_value.py [--grid digits-sgd] [--seeds 0-3] [--trials 16] [--replicates 10]

For every fitted optimum: value reported - the other seeds' mean at the recommended lr (the error REAL.md
scores), split into the fit against the study seed's own runs at that lr ("fit - own": the estimator's part)
and those runs against the other seeds' mean there ("own - others": the seed's luck at the lr it chose, which
its trials cannot show); and "own - others" at the reference's own lr* (no choice: zero on average over all
seeds). Means per batch size and per kind of fit (the smoother, or the pooled shape of a sparse valley).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_coverage import _seeds, draw_study, ref_value, reference  # noqa: E402
from benchmarks.real_grids import load  # noqa: E402
from bstune.analysis import analyze  # noqa: E402


def own_curves(rows: list[dict], xs: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """Each (seed, batch size)'s own val_loss over the lr grid (nan where it diverged)."""
    out: dict[tuple[int, int], np.ndarray] = defaultdict(lambda: np.full(len(xs), np.nan))
    for r in rows:
        if r["state"] == "COMPLETE" and math.isfinite(r["value"]):
            out[(r["seed"], r["batch_size"])][np.searchsorted(xs, round(math.log2(r["lr"]), 6))] = r["value"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default="digits-sgd")
    p.add_argument("--seeds", default="0-3", help="training seeds the studies are drawn at (0-3: development)")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--replicates", type=int, default=10, help="studies per seed")
    p.add_argument("--n-boot", type=int, default=30)
    args = p.parse_args()
    rows = load(args.grid)
    xs = np.unique(np.round(np.log2([r["lr"] for r in rows]), 6))
    every, sizes = sorted({r["seed"] for r in rows}), sorted({r["batch_size"] for r in rows})
    own, rng = own_curves(rows, xs), np.random.default_rng(1)
    by_b, by_fit = defaultdict(list), defaultdict(list)
    for s in _seeds(args.seeds):
        ref = reference(rows, [t for t in every if t != s], rng)
        for k in range(args.replicates):
            a = analyze(draw_study(rows, s, sizes, args.trials, rng), n_boot=args.n_boot, seed=k)
            for o in a.per_batch:
                if not o.fitted or o.value is None:
                    continue
                b, pt, curve = o.batch_size, math.log2(o.lr), own[(s, o.batch_size)]
                ok = np.isfinite(curve)
                mine, theirs = float(np.interp(pt, xs[ok], curve[ok])), ref_value(ref, b, pt)
                fixed = float(np.interp(ref.lr[b], xs[ok], curve[ok])) - ref_value(ref, b, ref.lr[b])
                row = (o.value - theirs, o.value - mine, mine - theirs, fixed)
                by_b[b].append(row)
                by_fit[o.fit].append(row)
    print(f"{args.grid}, {args.trials} trials per B, seeds {args.seeds}\n")
    print("| | optima | value - others | fit - own | own - others | own - others at the reference lr\\* |")
    print("|---|---|---|---|---|---|")
    for name, table in (("B=", by_b), ("", by_fit)):
        for key, v in table.items():
            m = np.mean(v, axis=0)
            print(f"| {name}{key} | {len(v)} | " + " | ".join(f"{x:+.4f}" for x in m) + " |")
    m = np.mean([r for v in by_b.values() for r in v], axis=0)
    print("| all | " + str(sum(map(len, by_b.values()))) + " | " + " | ".join(f"{x:+.4f}" for x in m) + " |")


if __name__ == "__main__":
    main()
