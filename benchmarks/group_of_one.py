"""A lone trial as a fused group of one vs the lone trainer it replaced: seconds per trial, CPU.

Not a test: prints a Markdown table for benchmarks/FUSED.md ("A lone trial is a group of one"). A trial is one
whole run of studies/digits.yaml's MLP (12 epochs, lr 0.05, momentum 0.9, one thread). Each process times
--trials trials after an untimed warm-up one and keeps its fastest; processes of the trainer of today (`train`, a
group of one) and of the lone trainer of commit --before (extracted by `git archive`) take turns, so that a busy
spell on the machine hits both alike. The table gives medians over processes; CPU seconds (the process's own) are
the comparison that holds on a shared machine, where wall seconds wait for other processes.

    python benchmarks/group_of_one.py                    # B = 16, 256; 5 repeats each
    python benchmarks/group_of_one.py --repeats 3 --batch-sizes 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "3cfa05b"  # the last commit with the lone trainer (train/loop.py's own epoch loop)
CHILD = """
import sys, time
from bstune.spec import load_spec
from bstune.train import load_dataset, train, train_config
w = load_spec(sys.argv[1]).workload
data = load_dataset(w)
cfg = train_config(w, int(sys.argv[2]), 0.05, 0.9)
train(cfg, data)
for _ in range(int(sys.argv[3])):
    t0, c0 = time.perf_counter(), time.process_time()
    train(cfg, data)
    print(time.perf_counter() - t0, time.process_time() - c0)
"""


def seconds(code_root: Path, batch_size: int, trials: int) -> tuple[float, float]:
    """The fastest of `trials` timed trials with the bstune package under `code_root`: wall and CPU seconds."""
    env = os.environ | {"PYTHONPATH": str(code_root)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "studies" / "digits.yaml"), str(batch_size),
                          str(trials)], env=env, capture_output=True, text=True, check=True)
    wall, cpu = zip(*(map(float, line.split()) for line in out.stdout.splitlines()), strict=True)
    return min(wall), min(cpu)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="16,256")
    p.add_argument("--repeats", type=int, default=5, help="processes per trainer and batch size")
    p.add_argument("--trials", type=int, default=3, help="timed trials per process (its fastest counts)")
    p.add_argument("--before", default=BEFORE, help="the commit whose lone trainer is compared")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "bstune"], capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        roots = {"lone trainer": Path(tmp), "group of one": ROOT}
        print(f"load average {os.getloadavg()[0]:.1f} at the start; {os.cpu_count()} cores; "
              f"lone trainer: commit {args.before}\n")
        print("| batch size | lone trainer: CPU s, wall s | group of one: CPU s, wall s | group / lone CPU s, "
              "per pair: median (range) |")
        print("|---:|---:|---:|---:|")
        for b in (int(v) for v in args.batch_sizes.split(",")):
            t: dict[str, list[tuple[float, float]]] = {k: [] for k in roots}
            for r in range(args.repeats):
                for name in list(roots)[:: 1 if r % 2 == 0 else -1]:
                    t[name].append(seconds(roots[name], b, args.trials))
            ratio = [g[1] / a[1] for g, a in zip(t["group of one"], t["lone trainer"], strict=True)]
            cells = [f"{statistics.median(c for _, c in v):.2f}, {statistics.median(w for w, _ in v):.2f}"
                     for v in t.values()]
            print(f"| {b} | {cells[0]} | {cells[1]} | {statistics.median(ratio):.2f} "
                  f"({min(ratio):.2f}-{max(ratio):.2f}) |", flush=True)
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
