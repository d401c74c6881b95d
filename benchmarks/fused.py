"""Fused trials: trials per minute with K = 1, 2, 4, 8, 16 trials of one batch size trained as one stacked model.

Not a test: prints a Markdown table and writes it into benchmarks/FUSED.md under "Trainer throughput"; on the CPU
it then splits the default study's wall time at --fuse 1 and at the default (benchmarks/study_time.py), and
FUSED.md's last line is that study's speedup.
K = 1 is one trial at a time (`train`, a group of one); K > 1 is `train_fused`. A cell times whole trials
(set-up, training, evaluation every epoch, the in-trial probes), best of --repeats taken in turns across K, so
trials per minute is what a study's training gets. The members differ in lr and momentum, all in a range where
none diverges (a member that left early would flatter the number; the table says so if one does).

    python benchmarks/fused.py                  # CPU: studies/digits.yaml's MLP on digits, one thread
    python benchmarks/fused.py --device cuda    # GPU: studies/cifar.yaml's net on random CIFAR-shaped data
    python benchmarks/fused.py --workload cifar --n 64 --width 4 --epochs 1 --batch-sizes 16 --ks 1,2 --no-write
                                                # the GPU table's code path, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import study_time  # benchmarks/, on the path when run as a script
import torch
from synthetic_images import random_images

from bstune.spec import Workload, load_spec
from bstune.train import Dataset, OutOfMemory, TrainConfig, load_dataset, train, train_config, train_fused

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "benchmarks" / "FUSED.md"
SECTION = "## Trainer throughput"
LR_RANGE = {"digits": (0.01, 0.2), "cifar": (0.05, 0.4)}  # inside each study's range, and no member diverges


def members(w: Workload, name: str, b: int, k: int, epochs: int) -> list[TrainConfig]:
    """K trials of the workload at batch size b, lr log-spaced over LR_RANGE, the workload's momentum range."""
    lo, hi = LR_RANGE[name]
    out = []
    for j in range(k):
        t = j / max(k - 1, 1)
        out.append(replace(train_config(w, b, lo * (hi / lo) ** t, 0.9 - 0.4 * t), epochs=epochs))
    return out


def run_seconds(configs: list[TrainConfig], data: Dataset, device: str) -> tuple[float, int]:
    """Wall time of training the configs as one group (`train_fused`), and the members that left early."""
    t0 = time.perf_counter()
    left = sum(r.error is not None for r in train_fused(configs, data, device))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, left


def throughput_table(w: Workload, name: str, data: Dataset, device: str, sizes: list[int], ks: list[int],
                     epochs: int, repeats: int) -> str:
    """Markdown: trials per minute per batch size and K, and each K's speedup over one trial at a time. The
    repeats of a row go round every K in turn, so that a busy spell on the machine hits them alike."""
    head = "| batch size | " + " | ".join(f"K = {k}" for k in ks) + " |"
    lines = [head, "|---:|" + "---:|" * len(ks)]
    print("\n".join(lines), flush=True)
    for b in sizes:
        best: dict[int, float] = {}
        left: dict[int, int] = {}
        for _ in range(repeats):
            for k in ks:
                if best.get(k) == -1.0:
                    continue
                try:
                    seconds, left[k] = run_seconds(members(w, name, b, k, epochs), data, device)
                except OutOfMemory:
                    best[k] = -1.0
                    continue
                best[k] = min(best.get(k, float("inf")), seconds)
        cells, base = [], None
        for k in ks:
            if best[k] < 0:
                cells.append("out of memory")
                continue
            per_minute = 60.0 * k / best[k]
            base = base or (per_minute if k == 1 else None)
            speedup = f" ({per_minute / base:.1f}x)" if base else ""
            note = f", {left[k]} left early" if left.get(k) else ""
            cells.append(f"{per_minute:,.0f}{speedup}{note}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def write_section(path: Path, subheading: str, body: str) -> None:
    """Put `body` under `subheading` in the file's "Trainer throughput" section, replacing what was there and
    leaving every other part of the file as it is."""
    text = path.read_text() if path.exists() else "# Fused trials\n"
    if SECTION not in text:
        title, _, rest = text.partition("\n")
        text = f"{title}\n\n{SECTION}\n\n{rest.lstrip()}".rstrip() + "\n"
    start = text.index(SECTION) + len(SECTION)
    nxt = re.search(r"^## ", text[start:], flags=re.M)
    end = start + nxt.start() if nxt else len(text)
    section = text[start:end]
    block = f"{subheading}\n\n{body.strip()}\n\n"
    m = re.search(rf"^{re.escape(subheading)}\n.*?(?=^### |\Z)", section, flags=re.M | re.S)
    section = section[:m.start()] + block + section[m.end():] if m else section.rstrip() + "\n\n" + block
    path.write_text(text[:start] + "\n\n" + section.strip() + "\n\n" + text[end:].lstrip())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workload", choices=["digits", "cifar"], help="default: digits on cpu, cifar on cuda")
    p.add_argument("--batch-sizes", help="default: 16,32,128,512 (digits), 64,128,256,512 (cifar)")
    p.add_argument("--ks", default="1,2,4,8,16", help="members per fused group; 1 is one trial at a time")
    p.add_argument("--epochs", type=int, help="default: the workload's (digits), 2 (cifar)")
    p.add_argument("--n", type=int, default=10_000, help="cifar: random training images (validation: n/5)")
    p.add_argument("--width", type=int, help="cifar: net width (default: studies/cifar.yaml's)")
    p.add_argument("--repeats", type=int, help="best of this many runs per cell (default: 3 on cpu, 1 on cuda)")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not update {OUTPUT.name}")
    p.add_argument("--no-study", action="store_true", help="skip the default study's wall-time split (CPU only)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA device here; run it where one is, or use --device cpu",
              file=sys.stderr)
        return 2
    name = args.workload or ("cifar" if args.device == "cuda" else "digits")
    w = load_spec(ROOT / "studies" / f"{name}.yaml").workload
    if name == "digits":
        data, epochs = load_dataset(w), args.epochs or w.epochs
        what = f"studies/digits.yaml's {w.model} (width {w.width}, {w.optimizer}) on digits, {epochs} epochs"
    else:
        w = replace(w, width=args.width or w.width)
        data, epochs = random_images(n=args.n, n_val=max(1, args.n // 5)), args.epochs or 2
        what = (f"studies/cifar.yaml's {w.model} (width {w.width}, {w.optimizer}) on random {args.n} x 3 x 32 x 32 "
                f"images, {epochs} epochs")
    sizes = [int(b) for b in (args.batch_sizes or ("16,32,128,512" if name == "digits" else "64,128,256,512"))
             .split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    repeats = args.repeats or (3 if args.device == "cpu" else 1)
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
        train(members(w, name, sizes[0], 1, 1)[0], data, "cuda")  # CUDA context and kernels: not any cell's
    else:
        threads = "one thread" if w.model in ("linear", "mlp") else f"{torch.get_num_threads()} threads"
        device_name = (f"CPU ({platform.processor() or platform.machine()}, {threads}; {os.cpu_count()} cores, "
                       f"load average {os.getloadavg()[0]:.1f} at the start)")
    print(f"{what}; {device_name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}\n")
    print("trials per minute (speedup over K = 1, one trial at a time):\n")
    table = throughput_table(w, name, data, args.device, sizes, ks, epochs, repeats)
    if not args.no_write:
        sub = "### GPU: CIFAR net" if args.device == "cuda" else f"### CPU: {name} {w.model}"
        body = (f"{what}; {device_name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
                f"best of {repeats}. Trials per minute (speedup over K = 1, one trial at a time):\n\n"
                f"{table}\n\n`python benchmarks/fused.py{' --device cuda' if args.device == 'cuda' else ''}`")
        write_section(OUTPUT, sub, body)
        print(f"\nwritten to {OUTPUT.relative_to(ROOT)}")
    if args.device == "cpu" and not args.no_study:
        study_split(args.no_write)
    return 0


STUDY_SECTION = "## The default study: where its wall time goes"


def study_split(print_only: bool) -> None:
    """studies/digits.yaml at --fuse 1 and at the default, the same trials; the speedup is FUSED.md's last line."""
    table, speedup = study_time.section()
    last = f"study speedup (fuse 1 / default, same trials): {speedup:.1f}"
    print(f"\n{table}\n\n{last}")
    if print_only:
        return
    text = OUTPUT.read_text()
    text = text[:text.index(STUDY_SECTION)].rstrip() if STUDY_SECTION in text else text.rstrip()
    body = (f"studies/digits.yaml as shipped (its trial budget, without its seconds limit, so both settings run the "
            f"same trials), fresh stores, one process each, on the machine above (load average "
            f"{os.getloadavg()[0]:.1f} at the end):\n\n{study_time.DEFINITIONS}\n\n"
            f"{table}\n\n`python benchmarks/fused.py` (or `python benchmarks/study_time.py` for this table alone)")
    OUTPUT.write_text(f"{text}\n\n{STUDY_SECTION}\n\n{body}\n\n{last}\n")


if __name__ == "__main__":
    sys.exit(main())
