"""Training speed: bstune's trainer against a plain DataLoader loop, trials per device, fixed costs.

Not a test: prints Markdown tables. On a GPU it uses random data of CIFAR-10's shape (50,000 x 3 x 32 x 32)
and the default CIFAR net; on a CPU the same image path at a size a CPU finishes (see --n and --width).

    python benchmarks/train_speed.py                      # current device, defaults for it
    python benchmarks/train_speed.py --device cuda --n 50000 --width 64
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from synthetic_images import random_images  # benchmarks/, on the path when run as a script

from bstune.train import Dataset, TrainConfig, build_model, pick_device, train


def bstune_speed(ds: Dataset, b: int, device: torch.device, width: int, epochs: int, compile: str) -> float:
    """Examples per second of bstune's trainer, from its last epoch (the first pays warm-up costs)."""
    cfg = TrainConfig(batch_size=b, lr=0.05, momentum=0.9, epochs=epochs, model="resnet", width=width,
                      compile=compile, lr_schedule="constant", diagnostics_every=0)
    history = train(cfg, ds, device)
    return history[-1].examples_per_second


def naive_speed(ds: Dataset, b: int, device: torch.device, width: int, max_steps: int) -> float:
    """The textbook loop: a DataLoader over CPU tensors, transforms per batch on the host, a copy to the device
    every step, fp32, and `loss.item()` every step (the host waits for the device each time)."""
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision.transforms import v2

    aug = v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()])
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(ds.std).view(1, 3, 1, 1) * 255
    loader = DataLoader(TensorDataset(ds.train_x, ds.train_y), batch_size=b, shuffle=True, drop_last=True,
                        num_workers=0)
    torch.manual_seed(0)
    model = build_model("resnet", ds.input_shape, ds.num_classes, width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    n = 0
    t0 = None
    for step, (x, y) in enumerate(loader):
        if step == 2:  # skip warm-up steps
            t0, n = time.perf_counter(), 0
        if step >= max_steps + 2:
            break
        x = aug(x)
        x = ((x.float() - mean) / std).to(device)
        y = y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
        n += len(x)
    return n / (time.perf_counter() - t0) if t0 else float("nan")


def _worker(args: tuple) -> None:
    ds, b, device, width, epochs, k, barrier, out = args
    if device == "cpu":  # k processes share the cores: more threads than cores would thrash
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // k))
    barrier.wait()
    out.put(bstune_speed(ds, b, torch.device(device), width, epochs, "off"))


def aggregate_speed(ds: Dataset, b: int, device: torch.device, width: int, epochs: int, k: int) -> float:
    """Summed examples/s of k trials training at once on one device (separate processes)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=((ds, b, str(device), width, epochs, k, barrier, out),))
             for _ in range(k)]
    for p in procs:
        p.start()
    speeds = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(speeds)


def fixed_costs(ds: Dataset, device: torch.device, width: int, compile: str) -> dict[str, float]:
    """Seconds spent before the first step (model build, moving data, compile) against one epoch's training."""
    t0 = time.perf_counter()
    on_device = ds.to(device)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_model("resnet", ds.input_shape, ds.num_classes, width).to(device)
    t_model = time.perf_counter() - t0
    cfg = TrainConfig(batch_size=512, lr=0.05, momentum=0.9, epochs=2, model="resnet", width=width,
                      compile=compile, lr_schedule="constant", diagnostics_every=0)
    t0 = time.perf_counter()
    history = train(cfg, on_device, device)
    total = time.perf_counter() - t0
    epoch = history[-1].train_seconds - history[0].train_seconds
    first_epoch_extra = history[0].train_seconds - epoch  # compile and warm-up land in epoch 1
    return {"data to device": t_data, "model build": t_model, "warm-up/compile": max(first_epoch_extra, 0.0),
            "one epoch": epoch, "whole 2-epoch run": total}


def study_overhead(trials: int) -> tuple[float, float]:
    """Wall time of a small digits study and the part of it spent training."""
    from bstune.search import run_study
    from bstune.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(os.path.join(os.path.dirname(__file__), "..", "studies", "digits.yaml"))
        spec = spec.with_overrides(name="bench", storage=f"sqlite:///{tmp}/o.db",
                                   tracking_uri=f"sqlite:///{tmp}/m.db",
                                   budget=replace(spec.budget, trials=trials, seconds=None, examples=None))
        t0 = time.perf_counter()
        result = run_study(spec)
        wall = time.perf_counter() - t0
        return wall, sum(r.train_seconds for r in result.table.records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=None, help="training examples (default: 50,000 on CUDA, 4,096 on CPU)")
    p.add_argument("--width", type=int, default=None, help="net width (default: 64 on CUDA, 16 on CPU)")
    p.add_argument("--batch-sizes", default="32,64,128,256,512,1024,2048,4096")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"],
                   help="also time bstune's trainer under this torch.compile mode")
    p.add_argument("--study-trials", type=int, default=12)
    args = p.parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (50_000 if cuda else 4_096)
    width = args.width or (64 if cuda else 16)
    ds = random_images(n=n, n_val=min(10_000, n // 5))
    compiled = args.compile != "off"
    if cuda:
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"# bstune training speed\n\ndevice: {name}; torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; data {n} x 3 x 32 x 32 uint8; resnet width {width}\n")

    extra = f" compiled ({args.compile}) ex/s |" if compiled else ""
    print("| batch size | bstune ex/s | naive DataLoader ex/s | ratio |" + extra)
    print("|---:|---:|---:|---:|" + ("---:|" if compiled else ""))
    sizes = [int(b) for b in args.batch_sizes.split(",") if int(b) <= n]
    for b in sizes:
        fast = bstune_speed(ds, b, device, width, args.epochs, "off")
        naive = naive_speed(ds, b, device, width, max_steps=max(4, min(40, n // b - 3)))
        row = f"| {b} | {fast:,.0f} | {naive:,.0f} | {fast / naive:.2f}x |"
        if compiled:
            row += f" {bstune_speed(ds, b, device, width, args.epochs, args.compile):,.0f} |"
        print(row, flush=True)

    print("\n| trials per device K | batch size | aggregate ex/s | vs K=1 |\n|---:|---:|---:|---:|")
    for b in [s for s in (32, 128) if s <= n]:
        base = None
        for k in (1, 2, 4):
            agg = aggregate_speed(ds, b, device, width, args.epochs, k)
            base = base or agg
            print(f"| {k} | {b} | {agg:,.0f} | {agg / base:.2f}x |", flush=True)

    print("\n| per-trial fixed cost | seconds |\n|---|---:|")
    for k, v in fixed_costs(ds, device, width, args.compile).items():
        print(f"| {k} | {v:.2f} |")

    wall, training = study_overhead(args.study_trials)
    outside = wall - training
    print(f"\nsmall digits study ({args.study_trials} trials): wall {wall:.1f}s, training {training:.1f}s, "
          f"outside training {outside:.1f}s = {100 * outside / wall:.0f}% of wall time "
          f"(process start-up and imports not included)")


if __name__ == "__main__":
    sys.exit(main())
