"""Coverage of ``analyze()``'s 95% intervals on trial tables whose truth is known. A benchmark, not a test:

    python benchmarks/coverage.py [--replicates 200] [--jobs 2] [--quick] [--seed-base 0] [--out FILE]

The generator here is its own, apart from tests/simulate.py. Each table has 7 batch sizes 16..1024 at
momentum 0.9; at each, ``trials`` trials draw log2 lr uniformly over 6 octaves (from 3.5 octaves below the
true lr* to 2.5 above, the range moved by up to half an octave either way per batch size), and a trial ends
at

    loss = floor + (initial - floor) (1 - exp(-s(d))) + noise,   d = log2(lr / lr*(B))

floor 0.3, initial 2.3, noise 4% of the floor (sd 0.012); trials more than 2-3 octaves (4-8x) above lr*
(the edge drawn per batch size) diverge. The truths lr*(B):

- power-0.5, power-1: 0.5 (B / 1024)^alpha;
- saturating-128 (B_noise inside the measured range), saturating-4096 (above it): 1 / (1 + B_noise / B);
- surge-256: 0.5 / (0.5 (sqrt(256 / B) + sqrt(B / 256))), a peak at B = 256.

The valley shapes s(d):

- "assumed": the profile the pooled fit assumes, 0.02 ((2^(d/2) - 1) / (ln 2 / 2))^2;
- "exp-wall": 0.01 (e^(1.5 d) - 1 - 1.5 d) + 0.01 d^2 (tests/simulate.py's), steeper on the right;
- "flat": 0.006 d^4 + 0.01 max(d, 0)^3, a flat bottom and a steep right wall, which no parabola describes.

Per cell (truth x shape x trials per batch size), over the replicates: the share of the 95% intervals that
hold the truth (per-batch-size lr*, pooled over batch sizes; alpha of the power form on power truths; B_noise
of the saturating form on saturating truths and of the surge form, its peak, on surge truths), how often
the point estimate lies outside its own interval, the bias and spread of the estimates (in octaves for lr*
and B_noise), the ratio of the mean interval width to 3.92 x the estimates' spread (1: the bootstrap sees
the estimator's true spread), and which form AICc prefers. Replicate r of a cell uses seed seed_base + r.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bstune.analysis import analyze  # noqa: E402
from bstune.errors import BstuneError  # noqa: E402
from bstune.trials import State, TrialRecord, TrialTable  # noqa: E402

BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024)
MOMENTUM = 0.9
FLOOR, INITIAL, NOISE = 0.3, 2.3, 0.012
TRUTHS = {
    "power-0.5": ("power", 0.5), "power-1": ("power", 1.0),
    "saturating-128": ("saturating", 128.0), "saturating-4096": ("saturating", 4096.0),
    "surge-256": ("surge", 256.0),
}
SHAPES = ("assumed", "exp-wall", "flat")
TRIALS = (8, 16, 36)


def true_lr(truth: str, b: float) -> float:
    law, p = TRUTHS[truth]
    if law == "power":
        return 0.5 * (b / 1024.0) ** p
    if law == "saturating":
        return 1.0 / (1.0 + p / b)
    return 0.5 / (0.5 * (math.sqrt(p / b) + math.sqrt(b / p)))


def profile(shape: str, d: np.ndarray) -> np.ndarray:
    """s(d) >= 0, least (0) at d = 0: how far above the floor a run ends, d octaves of lr from lr*."""
    if shape == "assumed":
        a = 0.5 * math.log(2.0)
        return 0.02 * (np.expm1(a * d) / a) ** 2
    if shape == "exp-wall":
        return 0.01 * (np.exp(1.5 * d) - 1.0 - 1.5 * d) + 0.01 * d**2
    if shape == "flat":
        return 0.006 * d**4 + 0.01 * np.maximum(d, 0.0) ** 3
    raise ValueError(shape)


def make_table(truth: str, shape: str, trials: int, seed: int) -> TrialTable:
    # the cell in the seed too, so that cells do not share their noise
    rng = np.random.default_rng([seed, zlib.crc32(f"{truth}/{shape}/{trials}".encode())])
    records = []
    for b in BATCH_SIZES:
        star = math.log2(true_lr(truth, b))
        low = star - 3.5 + rng.uniform(-0.5, 0.5)
        x = rng.uniform(low, low + 6.0, size=trials)
        d = x - star
        loss = FLOOR + (INITIAL - FLOOR) * -np.expm1(-profile(shape, d)) + NOISE * rng.standard_normal(trials)
        edge = rng.uniform(2.0, 3.0)
        for i in range(trials):
            diverged = d[i] > edge
            records.append(TrialRecord(
                number=len(records), batch_size=b, lr=float(2.0 ** x[i]), momentum=MOMENTUM,
                value=None if diverged else float(loss[i]), state=State.DIVERGED if diverged else State.COMPLETE,
                examples_seen=5000, train_seconds=1.0))
    return TrialTable(records, metric="val_loss", n_train=50_000, study_name=f"coverage-{truth}-{shape}")


def one_replicate(job: tuple[str, str, int, int]) -> dict[str, Any]:
    """What one analysed table says against its truth."""
    truth, shape, trials, seed = job
    table = make_table(truth, shape, trials, seed)
    try:
        a = analyze(table, seed=seed)
    except BstuneError as e:
        return {"error": str(e)}
    out: dict[str, Any] = {"lr": [], "preferred": a.fits_for()[1]}
    for o in a.per_batch:
        if o.fitted and o.lr_interval is not None:
            out["lr"].append((math.log2(true_lr(truth, o.batch_size)), math.log2(o.lr),
                              math.log2(o.lr_interval[0]), math.log2(o.lr_interval[1])))
    fits, _ = a.fits_for()
    law, p = TRUTHS[truth]
    if fits and law == "power":
        f = fits["power"]
        out["alpha"] = (p, f.params["alpha"], *f.intervals["alpha"])
    elif fits and f"{law}" in fits:
        f = fits[law]
        lo, hi = f.intervals["b_noise"]
        out["b_noise"] = (math.log2(p), math.log2(f.params["b_noise"]), _log2(lo), _log2(hi))
    out["peak"] = a.peak
    return out


def _log2(v: float) -> float:
    return math.log2(v) if v > 0 else -math.inf


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Coverage, point outside, bias, spread, width ratio per quantity; the preferred forms' shares."""
    ok = [r for r in rows if "error" not in r]
    peaks = [r["peak"] for r in ok]
    out: dict[str, Any] = {"n": len(rows), "errors": len(rows) - len(ok),
                           "preferred": Counter(r["preferred"] for r in ok),
                           "peak": float(np.mean([p is not None for p in peaks])) if ok else math.nan,
                           "peak_30": float(np.mean([p is not None and abs(p / 256.0 - 1.0) <= 0.3 for p in peaks]))
                           if ok else math.nan}
    for key in ("lr", "alpha", "b_noise"):
        quads = [q for r in ok for q in (r["lr"] if key == "lr" else [r[key]] if key in r else [])]
        if not quads:
            continue
        t, p, lo, hi = (np.array(v, dtype=float) for v in zip(*quads, strict=True))
        err = p - t
        if key == "lr":  # the estimator's spread per batch size: errors less each batch size's mean error
            spread = float(np.std(err - np.mean(err)))
        else:
            spread = float(np.std(err))
        width = hi - lo
        finite = np.isfinite(width)
        out[key] = {"n": len(t), "coverage": float(np.mean((lo <= t) & (t <= hi))),
                    "outside": float(np.mean((p < lo) | (p > hi))), "bias": float(np.mean(err)),
                    "spread": spread, "unbounded": float(np.mean(~finite)),
                    "width_ratio": float(np.mean(width[finite]) / (3.92 * spread)) if finite.any() and spread > 0
                    else math.nan}
    return out


def cells(quick: bool) -> list[tuple[str, str, int]]:
    """Every truth on the assumed shape; three truths on the other shapes (the quick set: fewer)."""
    out = [(t, "assumed", n) for t in TRUTHS for n in TRIALS]
    out += [(t, s, n) for s in SHAPES[1:] for t in ("power-0.5", "saturating-128", "surge-256") for n in TRIALS]
    if quick:
        out = [c for c in out if c[2] in (8, 16) and c[1] != "flat"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer cells, for development")
    parser.add_argument("--only", default="", help="comma-separated truths to run")
    parser.add_argument("--out", default="", help="write the Markdown here (default: print it)")
    args = parser.parse_args()
    todo = cells(args.quick)
    if args.only:
        todo = [c for c in todo if c[0] in args.only.split(",")]
    jobs = [(t, s, n, args.seed_base + r) for t, s, n in todo for r in range(args.replicates)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(one_replicate, jobs, chunksize=4)
    per_cell: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for job, row in zip(jobs, rows, strict=True):
        per_cell.setdefault(job[:3], []).append(row)
    text = markdown({c: summarise(v) for c, v in per_cell.items()}, args, time.perf_counter() - t0)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def markdown(results: dict[tuple[str, str, int], dict[str, Any]], args: argparse.Namespace,
             seconds: float) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    seeds = f"seeds {args.seed_base}..{args.seed_base + args.replicates - 1}"
    lines = [f"Replicates per cell: {args.replicates} ({seeds}); {args.jobs} worker processes; "
             f"{seconds / 60:.1f} min on {machine}.", ""]
    for key, title in (("lr", "per-batch-size lr* (log2)"), ("alpha", "alpha (power truths)"),
                       ("b_noise", "B_noise (log2; the surge form's peak on surge truths)")):
        lines += [f"### {title}", "",
                  "| truth | shape | trials/B | n | coverage | point outside | bias | spread | width/true "
                  "| unbounded |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (truth, shape, n), res in results.items():
            if key not in res:
                continue
            r = res[key]
            lines.append(f"| {truth} | {shape} | {n} | {r['n']} | {_pct(r['coverage'])} | {_pct(r['outside'])} | "
                         f"{r['bias']:+.3f} | {r['spread']:.3f} | {_pct(r['width_ratio'])} | {_pct(r['unbounded'])} |")
        lines.append("")
    lines += ["### Preferred form (AICc) and the peak reported", "",
              "| truth | shape | trials/B | errors | preferred forms | peak reported | peak within 30% of 256 |",
              "|---|---|---:|---:|---|---:|---:|"]
    for (truth, shape, n), res in results.items():
        total = sum(res["preferred"].values()) or 1
        forms = ", ".join(f"{k} {v / total:.2f}" for k, v in res["preferred"].most_common())
        within = _pct(res["peak_30"]) if truth.startswith("surge") else "-"
        lines.append(f"| {truth} | {shape} | {n} | {res['errors']} | {forms} | {_pct(res['peak'])} | {within} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
