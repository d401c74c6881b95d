"""How long ``analyze()`` takes on synthetic trial tables (bootstrap on). A script, not a test:

    python benchmarks/analysis_speed.py [--repeats 3] [--n-boot 200]

Tables come from ``tests/simulate.py`` (saturating law, B_noise 256, batch sizes 16..8192, 20-epoch learning
curves on; momentum searched, so the pooled fit runs, or fixed at 0.9, so each batch size is smoothed on its
own), so every part of the analysis runs, the steps-to-target fit included. Peak RSS is the process's so far
(``ru_maxrss``: it never goes down), the tables included.
The time reported is the best of ``--repeats`` calls; generating the table is not counted.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.simulate

from bstune.analysis import analyze  # noqa: E402
from tests.simulate import simulate_trials  # noqa: E402

SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CASES = [  # (trials, batch sizes, momentum: None = searched)
    (1_000, SIZES, None),
    (10_000, SIZES, None),
    (10_000, SIZES, 0.9),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"analyze() speed: n_boot={args.n_boot}, curves of {args.epochs} epochs, best of {args.repeats}; "
          f"{machine}")
    print(f"{'trials':>8} {'batch sizes':>11} {'momentum':>8} {'curve points':>12} {'simulate s':>10} "
          f"{'analyze s':>10} {'per 1k trials s':>15} {'peak RSS MB':>11}")
    for n_trials, sizes, momentum in CASES:
        t0 = time.perf_counter()
        table = simulate_trials("saturating", batch_sizes=sizes, trials_per_batch=n_trials // len(sizes),
                                curves=True, epochs=args.epochs, seed=0, momentum=momentum)
        t_sim = time.perf_counter() - t0
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = analyze(table, n_boot=args.n_boot, seed=0)
            best = min(best, time.perf_counter() - t0)
        points = sum(len(r.curve) for r in table.records)
        assert result.b_noise is not None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's so far: table included
        print(f"{len(table.records):>8} {len(sizes):>11} {'searched' if momentum is None else momentum:>8} "
              f"{points:>12} {t_sim:>10.2f} {best:>10.2f} {best / len(table.records) * 1000:>15.3f} {peak:>11.0f}")


if __name__ == "__main__":
    main()
