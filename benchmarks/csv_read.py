"""How long ``bstune.trials.from_csv`` (and with --analyze, the analysis after it) takes on a large CSV of
trials, and its peak memory. A script, not a test:

    python benchmarks/csv_read.py [--rows 1000000] [--epochs 10] [--no-number] [--analyze]

It writes a CSV of ``--rows`` rows to a temporary folder (trials of ``--epochs`` rows each, one per epoch, with
a number column; with ``--no-number``, one row per trial and no number column), then reads it in this process
and prints rows, seconds and the process's peak resident memory (``resource.getrusage``). Writing the file is
not timed. Targets: 10^6 rows read in under 30 s and under 2 GB; read and analysed (`bstune analyze --csv`)
in under a minute and 2 GB.
"""

from __future__ import annotations

import argparse
import csv
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from bstune.trials import from_csv


def write_table(path: Path, rows: int, epochs: int, numbered: bool) -> None:
    rng = random.Random(0)
    per_trial = epochs if numbered else 1
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow((["number"] if numbered else []) + ["batch_size", "lr", "momentum", "value", "state", "epoch",
                                                       "epoch_value", "optimizer_steps", "examples_seen"])
        for n in range(rows // per_trial):
            b = 2 ** rng.randint(4, 12)
            lr, m, final = 10 ** rng.uniform(-3, 1), rng.uniform(0, 0.98), rng.uniform(0.05, 2.0)
            head = ([n] if numbered else []) + [b, f"{lr:.6g}", f"{m:.4f}", f"{final:.5g}", "COMPLETE"]
            if not numbered:
                w.writerow(head + ["", "", "", 60_000 * epochs])
                continue
            for e in range(1, epochs + 1):
                w.writerow(head + [e, f"{final * (1 + 1 / e):.5g}", e * -(-60_000 // b), 60_000 * e])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--no-number", action="store_true")
    parser.add_argument("--analyze", action="store_true", help="also run the analysis on the table read")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trials.csv"
        write_table(path, args.rows, args.epochs, not args.no_number)
        size = path.stat().st_size
        t0 = time.perf_counter()
        table = from_csv(path)
        seconds = time.perf_counter() - t0
    analysis = ""
    if args.analyze:
        from bstune.analysis import analyze

        t0 = time.perf_counter()
        analyze(table)
        analysis = f"; analysis {time.perf_counter() - t0:.1f} s"
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if sys.platform == "darwin":
        peak_kib //= 1024
    layout = "one row per trial, no number" if args.no_number else f"{args.epochs} epoch rows per trial"
    print(f"rows {args.rows:,} ({size / 1e6:.0f} MB, {layout}) -> {len(table.records):,} trials: "
          f"{seconds:.1f} s{analysis}, peak RSS {peak_kib / 1024**2:.2f} GB")


if __name__ == "__main__":
    main()
