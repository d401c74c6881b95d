"""What the in-trial diagnostics cost: gradient noise scale, per-layer gradient norms and gradient histograms,
against the same trial with `diagnostics_every: 0`.

Not a test: prints a Markdown table. All modes of a configuration are run in each of `--rounds` rounds,
interleaved, so that load from other processes hits them alike; the overhead is the median over rounds of
each round's ratio to its own run without diagnostics. On a CPU the time is the process's CPU time, which
other processes on a shared machine inflate less than wall time (use --threads 1 there: a waiting second
thread also burns CPU time); on a GPU, wall time. Workloads: the digits MLP at three batch sizes, and the
CIFAR net (`model: resnet`) on random data of CIFAR-10's shape: a small subset on a CPU, all 50,000 on a GPU.

    python benchmarks/diagnostics_overhead.py                 # current device
    python benchmarks/diagnostics_overhead.py --threads 1     # CPU: one intra-op thread (less noise)
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from dataclasses import replace

import torch
from synthetic_images import random_images  # benchmarks/, on the path when run as a script

from bstune.spec import Workload
from bstune.train import Dataset, TrainConfig, load_dataset, pick_device, plan, train

MODES = {  # label -> overrides of TrainConfig
    "off": {"diagnostics_every": 0},
    "no histograms": {"grad_histogram_epochs": ()},
    "defaults": {},
}


def time_modes(cfg: TrainConfig, data: Dataset, device: torch.device, rounds: int,
               min_seconds: float = 1.0) -> dict[str, tuple[float, float]]:
    """Per mode: the median time of a whole trial (training and evaluation) and the median, over rounds, of its
    ratio to the "off" run of the same round. Short trials are timed several back to back, so that each
    timing spans at least `min_seconds`."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def run(changes: dict, times: int) -> float:
        t0 = clock()
        for _ in range(times):
            train(replace(cfg, **changes), data, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (clock() - t0) / times

    inner = max(1, math.ceil(min_seconds / run(MODES["off"], 1)))  # also the warm-up
    times: dict[str, list[float]] = {label: [] for label in MODES}
    labels = list(MODES)
    for r in range(rounds):
        for label in labels[r % 3:] + labels[:r % 3]:  # a different order each round: no mode always goes first
            times[label].append(run(MODES[label], inner))
    off = times["off"]
    return {label: (statistics.median(ts), statistics.median(t / o for t, o in zip(ts, off, strict=True)))
            for label, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=9, help="rounds of all modes, interleaved")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on a CPU")
    ap.add_argument("--n", type=int, default=None, help="CIFAR-shaped examples (default: 512 CPU, 50000 GPU)")
    ap.add_argument("--width", type=int, default=None, help="resnet width (default: 16 CPU, 64 GPU)")
    args = ap.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)

    digits = load_dataset(Workload(dataset="digits"))
    n = args.n or (50_000 if gpu else 512)
    width = args.width or (64 if gpu else 16)
    cifar = random_images(n=n, n_val=max(n // 5, 256))
    defaults = TrainConfig(batch_size=1, lr=0.1, momentum=0.9)
    rows = [(f"digits mlp, 12 epochs, B={b}", TrainConfig(batch_size=b, lr=0.1, momentum=0.9, epochs=12), digits)
            for b in (16, 128, 512)]
    epochs = 2 if gpu else 4
    rows += [(f"resnet w={width}, {n} CIFAR-shaped, {epochs} epochs, B={b}",
              TrainConfig(batch_size=b, lr=0.05, momentum=0.9, epochs=epochs, model="resnet", width=width), cifar)
             for b in ((128, 512) if gpu else (128,))]

    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or 'CPU'}"
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'wall' if gpu else 'CPU'} time, median of {args.rounds} rounds; defaults: "
          f"diagnostics_every={defaults.diagnostics_every}, "
          f"grad_histogram_epochs={list(defaults.grad_histogram_epochs)}")
    print()
    print("| trial | noise-scale steps | off (s) | noise scale + grad norms (s) | + histograms = defaults (s) "
          "| overhead, defaults |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, cfg, data in rows:
        t = time_modes(cfg, data, device, args.rounds)
        steps = plan(cfg, data.n_train)[1]
        measured = math.ceil(steps / defaults.diagnostics_every)
        print(f"| {label} | {measured}/{steps} | {t['off'][0]:.3f} | {t['no histograms'][0]:.3f} "
              f"({t['no histograms'][1] - 1:+.1%}) | {t['defaults'][0]:.3f} | {t['defaults'][1] - 1:+.1%} |",
              flush=True)


if __name__ == "__main__":
    main()
