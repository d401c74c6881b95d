"""Wall time and peak memory of the whole `bstune analyze --csv` (read and analysis) on large CSVs of trials.
A script, not a test:

    python benchmarks/csv_read.py [--rows 10000 100000 1000000] [--epochs 10 | 0] [--read-only]

For each ``--rows`` it writes a CSV to a temporary folder (writing is not timed): trials of ``--epochs`` rows
each (one per epoch, a number column naming the trial), 8 batch sizes from 16 to 2048, lr log-uniform over
1e-4..10 at momentum 0.9, the final value from a lopsided valley around a saturating lr*(B) plus noise, trials
past the valley's cliff DIVERGED (one row, no curve), a few PRUNED after 3 epochs; every epoch row carries
epoch_value, optimizer_steps and examples_seen (``--epochs 0``: one row per trial, without a number column or a
curve, so 10^6 rows are 10^6 trials). It then runs ``python -m bstune.cli analyze --csv FILE
--json -`` in a child process and prints its wall seconds and peak resident memory (the child's own
``ru_maxrss``, from ``os.wait4``) and CPU seconds (user + system: what the run costs whatever else the
machine is doing), with the machine's load average before the run (the CPUs are shared).
``--read-only`` times ``bstune.trials.from_csv`` alone instead, in the same way. Targets (issue 31): 10^6 rows
read and analysed in under a minute and 2 GB. Results: benchmarks/ANALYSIS_SCALE.md.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)
MOMENTUM = 0.9
N_TRAIN = 50_000
FLOOR, INITIAL = 0.3, 2.3
_READ_ONLY = "from bstune.trials import from_csv; import sys; print(len(from_csv(sys.argv[1]).records), 'trials')"


def write_table(path: Path, rows: int, epochs: int, seed: int = 0) -> int:
    """A realistic CSV of about ``rows`` rows (see the module doc); returns the trials written."""
    rng = np.random.default_rng(seed)
    per_trial, epochs = (epochs, epochs) if epochs else (1, 10)  # 0: one row per trial, no curve
    n = max(2 * rows // per_trial, 2)  # drawn generously, then cut where the rows add up to ``rows``
    b = rng.choice(BATCH_SIZES, size=n)
    lr_star = 0.1 * 8.0 / (1.0 + 256.0 / b)  # at m = 0.9: the effective lr* saturates at 8
    x = rng.uniform(math.log2(1e-4), math.log2(10.0), size=n)
    d = x - np.log2(lr_star)
    s = 0.01 * (np.exp(1.5 * d) - 1.0 - 1.5 * d) + 0.01 * d**2
    asymptote = FLOOR + (INITIAL - FLOOR) * (1.0 - np.exp(-s))
    steps_per_epoch = np.ceil(N_TRAIN / b).astype(int)
    e = np.arange(1, epochs + 1)
    rate = np.exp(-s) * b / (b + 256.0) / 40.0
    progress = rate[:, None] * (e * steps_per_epoch[:, None])
    curve = asymptote[:, None] + (INITIAL - asymptote[:, None]) * np.exp(-progress)
    curve += 0.02 * rng.standard_normal(curve.shape)
    diverged = d > 1.5 + 0.25 * rng.standard_normal(n)
    pruned = ~diverged & (s > 0.5) & (rng.random(n) < 0.3)
    last = np.where(pruned, min(3, epochs), epochs)
    n = max(int(np.searchsorted(np.cumsum(np.where(diverged, 1, last if per_trial > 1 else 1)), rows,
                                side="right")), 1)
    if per_trial == 1:
        _write_trial_rows(path, n, b, x, diverged, pruned, curve[np.arange(len(last)), last - 1],
                          last * steps_per_epoch * b)
        return n
    with open(path, "w") as f:
        f.write("number,batch_size,lr,momentum,value,state,epoch,epoch_value,optimizer_steps,examples_seen\n")
        for i in range(n):
            head = f"{i},{b[i]},{2.0 ** x[i]:.6g},{MOMENTUM}"
            if diverged[i]:
                f.write(f"{head},,DIVERGED,,,,\n")
                continue
            k, spe, bi = int(last[i]), int(steps_per_epoch[i]), int(b[i])
            head += f",{curve[i, k - 1]:.5g},{'PRUNED' if pruned[i] else 'COMPLETE'}"
            f.writelines(f"{head},{j + 1},{curve[i, j]:.5g},{(j + 1) * spe},{(j + 1) * spe * bi}\n"
                         for j in range(k))
    return n


def _write_trial_rows(path: Path, n: int, b: np.ndarray, x: np.ndarray, diverged: np.ndarray, pruned: np.ndarray,
                      final: np.ndarray, examples: np.ndarray) -> None:
    """One row per trial, no number column and no curve (each row its own trial)."""
    with open(path, "w") as f:
        f.write("batch_size,lr,momentum,value,state,examples_seen\n")
        for i in range(n):
            head = f"{b[i]},{2.0 ** x[i]:.6g},{MOMENTUM}"
            if diverged[i]:
                f.write(f"{head},,DIVERGED,\n")
            else:
                f.write(f"{head},{final[i]:.5g},{'PRUNED' if pruned[i] else 'COMPLETE'},{examples[i]}\n")


def measure(cmd: list[str]) -> tuple[float, float, float, int, str]:
    """Wall and CPU (user + system) seconds and peak RSS (MB) of a child process, its exit code and the tail
    of its output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
    return seconds, usage.ru_utime + usage.ru_stime, peak_kib / 1024, proc.returncode, out[-1500:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--epochs", type=int, default=10,
                        help="epoch rows per completed trial (0: one row per trial, no number, no curve)")
    parser.add_argument("--read-only", action="store_true", help="time bstune.trials.from_csv alone")
    args = parser.parse_args()
    what = "from_csv" if args.read_only else "bstune analyze --csv FILE --json -"
    layout = f"{args.epochs} epoch rows per completed trial" if args.epochs else "one row per trial, no curve"
    print(f"{what}, in a child process; {layout}, {len(BATCH_SIZES)} batch sizes; {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}")
    print(f"{'rows':>10} {'trials':>8} {'MB':>6} {'load':>5} {'wall s':>7} {'CPU s':>6} {'peak RSS MB':>11} "
          f"{'exit':>4}")
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trials.csv"
            trials = write_table(path, rows, args.epochs)
            with open(path) as f:
                written = sum(1 for _ in f) - 1
            size = path.stat().st_size / 1e6
            cmd = ([sys.executable, "-c", _READ_ONLY, str(path)] if args.read_only
                   else [sys.executable, "-m", "bstune.cli", "analyze", "--csv", str(path), "--json", "-"])
            load = os.getloadavg()[0]
            seconds, cpu, mb, code, tail = measure(cmd)
        print(f"{written:>10,} {trials:>8,} {size:>6.0f} "
              f"{load:>5.1f} {seconds:>7.1f} {cpu:>6.1f} {mb:>11.0f} {code:>4d}", flush=True)
        if code:
            print(tail, file=sys.stderr)


if __name__ == "__main__":
    main()
