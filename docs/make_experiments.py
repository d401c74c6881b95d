"""Runs the classic-experiment presets in studies/ on digits and makes docs/experiments.md's numbers and plots.

    python docs/make_experiments.py                          # run (or resume) every preset, then report
    python docs/make_experiments.py --store /tmp/x --no-run  # report on studies already run into /tmp/x

The studies go to throwaway SQLite stores under --store (never into the repository); the Markdown tables are
printed, the figures written to docs/experiments-*.png. The presets run with OMP_NUM_THREADS=1 unless it is set.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from bstune.analysis import analyze  # noqa: E402
from bstune.stores import load_table  # noqa: E402
from bstune.tracking import load_grad_histograms  # noqa: E402
from bstune.trials import TrialTable  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PRESETS = ("linear-scaling-sgd", "adam-vs-sgd", "equal-steps", "accumulation-real", "accumulation-k4",
           "weight-distance")


class Store:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.storage = f"sqlite:///{folder}/optuna.db"
        self.tracking = f"sqlite:///{folder}/mlflow.db"
        self.client = MlflowClient(self.tracking)

    def run(self, name: str) -> float:
        # These nets are tiny: on a small shared CPU a second intra-op thread mostly waits for the first
        # (4-10x slower steps under load), so the presets run with one unless told otherwise.
        env = {"OMP_NUM_THREADS": "1", **os.environ}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bstune.cli", "study", str(ROOT / "studies" / f"{name}.yaml"),
                        "--storage", self.storage, "--tracking-uri", self.tracking], check=True, cwd=ROOT, env=env)
        return time.perf_counter() - t0

    def table(self, name: str) -> TrialTable:
        return load_table(self.storage, name)

    def runs(self, name: str) -> dict[int, object]:
        """The trials' MLflow runs by trial number."""
        exp = self.client.get_experiment_by_name("bstune")
        runs = self.client.search_runs(
            [exp.experiment_id], max_results=5000,
            filter_string=f"tags.`bstune.study` = '{name}' and tags.`bstune.kind` = 'trial'")
        return {int(r.data.tags["bstune.trial"]): r for r in runs}


def log_b_axis(ax: plt.Axes, sizes: list[int]) -> None:
    """A log batch-size axis labelled at the measured sizes only."""
    ax.set_xscale("log")
    ax.set_xticks(sizes, labels=[str(b) for b in sizes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def best_per_batch(table: TrialTable) -> dict[int, object]:
    return {b: table.best(rs) for b, rs in table.by_batch_size().items()}


def lr_section(store: Store, names: dict[str, str]) -> dict[str, object]:
    """lr*(B) for SGD at equal epochs, SGD at equal steps and Adam: table and figure."""
    analyses = {}
    print("### lr*(B)\n")
    print("| study | B | trials | best trial lr | val loss | fitted lr* (95%) | bracketed |")
    print("|---|---:|---:|---:|---:|---:|:-:|")
    for name in names:
        table = store.table(name)
        a = analyze(table, n_boot=200, seed=0)
        analyses[name] = a
        for o in a.per_batch:
            iv = f"{o.lr:.3g} ({o.lr_interval[0]:.3g}-{o.lr_interval[1]:.3g})" if o.lr and o.lr_interval else "-"
            print(f"| {name} | {o.batch_size} | {o.n_complete} | {o.best_lr:.3g} | {o.best_value:.3f} | {iv} | "
                  f"{'yes' if o.bracketed else 'no'} |")
    print()
    print("| study | preferred form | power-law alpha (95%) | B_noise (95%) | B_crit from steps to target (95%) |")
    print("|---|---|---:|---:|---:|")
    for name, a in analyses.items():
        power = a.fits.get("power")
        alpha = (f"{power.alpha:.2f} ({power.intervals['alpha'][0]:.2f}-{power.intervals['alpha'][1]:.2f})"
                 if power and power.alpha is not None else "-")
        bn = (f"{a.b_noise:.0f} ({a.b_noise_interval[0]:.0f}-{a.b_noise_interval[1]:.0f})"
              if a.b_noise and a.b_noise_interval else "-")
        st = a.steps
        bc = (f"{st.b_crit:.0f} ({st.b_crit_interval[0]:.0f}-{st.b_crit_interval[1]:.0f}), target {st.target:.3f}"
              if st and st.b_crit and st.b_crit_interval else "-")
        print(f"| {name} | {a.preferred} | {alpha} | {bn} | {bc} |")
    print()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    centres = {}
    for (name, label), color in zip(names.items(), ("C0", "C1", "C2"), strict=False):
        a = analyses[name]
        pts = [o for o in a.per_batch if o.lr and o.lr_interval]
        b = np.array([o.batch_size for o in pts]) * (1.04 if color == "C1" else 1.0)
        lr = np.array([o.lr for o in pts])
        err = np.array([[o.lr - o.lr_interval[0], o.lr_interval[1] - o.lr] for o in pts]).T
        axes[0].errorbar(b, lr, yerr=err, fmt="-", color=color, capsize=3, label=label)
        closed = np.array([o.bracketed for o in pts])
        axes[0].plot(b[closed], lr[closed], "o", color=color)
        axes[0].plot(b[~closed], lr[~closed], "o", mfc="white", color=color)  # open: only a bound
        centres[name] = (np.exp(np.log(b).mean()), np.exp(np.log(lr).mean()))
    ref = np.array([16, 512])
    (bc, lc), (ba, la) = centres["linear-scaling-sgd"], centres["adam-vs-sgd"]
    axes[0].plot(ref, lc * ref / bc, "k--", lw=0.8, label="slope 1 (linear)")
    axes[0].plot(ref, la * np.sqrt(ref / ba), "k:", lw=0.8, label="slope 1/2 (sqrt)")
    axes[0].set(yscale="log", xlabel="batch size B", ylabel="fitted lr* (95% interval; open: not bracketed)",
                title="Where the best lr sits, per batch size")
    log_b_axis(axes[0], [16, 32, 64, 128, 256, 512])
    axes[0].legend(fontsize=8)
    table = store.table("linear-scaling-sgd")
    for b, rs in table.by_batch_size().items():
        done = sorted((r for r in rs if r.state == "COMPLETE"), key=lambda r: r.lr)
        axes[1].plot([r.lr for r in done], [r.value for r in done], "o-", ms=3, label=f"B={b}")
        div = [r.lr for r in rs if r.state == "DIVERGED"]
        axes[1].plot(div, [2.5] * len(div), "x", color=axes[1].lines[-1].get_color())
    axes[1].set(xscale="log", yscale="log", ylim=(0.03, 3), xlabel="lr (SGD, momentum 0.9)",
                ylabel="val loss after 10 epochs", title="SGD valleys, equal epochs (x: diverged)")
    axes[1].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(DOCS / "experiments-lr-vs-batch.png", dpi=110)
    plt.close(fig)
    return analyses


def steps_section(store: Store) -> None:
    """Equal epochs against equal steps: best value and what it cost, per batch size."""
    epochs, steps = best_per_batch(store.table("linear-scaling-sgd")), best_per_batch(store.table("equal-steps"))
    runs_e, runs_s = store.runs("linear-scaling-sgd"), store.runs("equal-steps")
    print("### Equal epochs against equal steps\n")
    print("| B | equal epochs: steps | examples | best val loss | val acc | equal steps: steps | examples | "
          "best val loss | val acc |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in sorted(epochs):
        re, rs = runs_e[epochs[b].number].data.metrics, runs_s[steps[b].number].data.metrics
        print(f"| {b} | {re['optimizer_steps']:.0f} | {re['examples_seen']:.0f} | {epochs[b].value:.3f} | "
              f"{re['val_accuracy']:.3f} | {rs['optimizer_steps']:.0f} | {rs['examples_seen']:.0f} | "
              f"{steps[b].value:.3f} | {rs['val_accuracy']:.3f} |")
    print()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    bs = sorted(epochs)
    ax.plot(bs, [epochs[b].value for b in bs], "o-", label="equal epochs (10)")
    ax.plot(bs, [steps[b].value for b in bs], "s-", label="equal steps (300)")
    ax.set(yscale="log", xlabel="batch size B", ylabel="best val loss (lr tuned per B)",
           title="Equal epochs against equal steps")
    log_b_axis(ax, bs)
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "experiments-epochs-vs-steps.png", dpi=110)
    plt.close(fig)


def accumulation_section(store: Store) -> None:
    """Accumulated micro-batches against the real large batch: the same (B, lr) trials, paired."""
    real, acc = store.table("accumulation-real"), store.table("accumulation-k4")
    runs_r, runs_a = store.runs("accumulation-real"), store.runs("accumulation-k4")
    pairs = []
    for r in real.records:
        twin = next((x for x in acc.records if x.batch_size == r.batch_size and math.isclose(x.lr, r.lr)), None)
        if twin is not None and r.value is not None and twin.value is not None:
            pairs.append((r, twin))
    print("### Accumulation against a real large batch (CNN with batch norm)\n")
    print("| B | lr | real batch: val loss | val acc | 4 micro-batches: val loss | val acc | seconds real / acc |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r, a in sorted(pairs, key=lambda p: (p[0].batch_size, p[0].lr)):
        mr, ma = runs_r[r.number].data.metrics, runs_a[a.number].data.metrics
        print(f"| {r.batch_size} | {r.lr:.3g} | {r.value:.3f} | {mr['val_accuracy']:.3f} | {a.value:.3f} | "
              f"{ma['val_accuracy']:.3f} | {r.train_seconds:.1f} / {a.train_seconds:.1f} |")
    print()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for b, marker in ((64, "o"), (256, "s")):
        ps = [p for p in pairs if p[0].batch_size == b]
        ax.plot([p[0].value for p in ps], [p[1].value for p in ps], marker, label=f"B={b} (micro-batches of {b // 4})")
    lim = [min(min(p[0].value, p[1].value) for p in pairs) * 0.8, max(max(p[0].value, p[1].value) for p in pairs) * 1.2]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlim=lim, ylim=lim, xlabel="val loss, real batch of B",
           ylabel="val loss, B as 4 accumulated micro-batches", title="Same (B, lr), CNN with batch norm")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "experiments-accumulation.png", dpi=110)
    plt.close(fig)


def distance_section(store: Store) -> None:
    """Weight distance against batch size and lr, and per layer."""
    table = store.table("weight-distance")
    runs = store.runs("weight-distance")
    done = [r for r in table.records if r.state == "COMPLETE"]
    print("### Weight distance against batch size\n")
    print("| B | steps | trials | distance: median (min-max) | at the best trial | best lr | layer 1 / 3 / 5 "
          "(best trial) | generalization gap (best) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    best = best_per_batch(table)
    for b, rs in table.by_batch_size().items():
        d = [runs[r.number].data.metrics["weight_distance"] for r in rs if r.state == "COMPLETE"]
        m = runs[best[b].number].data.metrics
        layers = " / ".join(f"{m[f'weight_distance.{k}']:.1f}" for k in ("1", "3", "5"))
        print(f"| {b} | {m['optimizer_steps']:.0f} | {len(d)} | {statistics.median(d):.1f} ({min(d):.1f}-{max(d):.1f}) "
              f"| {m['weight_distance']:.1f} | {best[b].lr:.3g} | {layers} | {m['generalization_gap']:+.3f} |")
    print()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sc = axes[0].scatter([r.batch_size for r in done], [runs[r.number].data.metrics["weight_distance"] for r in done],
                         c=np.log10([r.lr for r in done]), cmap="viridis")
    fig.colorbar(sc, ax=axes[0], label="log10 lr")
    axes[0].set(yscale="log", xlabel="batch size B", ylabel="L2 distance from initial weights",
                title="Final weight distance (10 epochs, SGD m=0.9)")
    log_b_axis(axes[0], sorted({r.batch_size for r in done}))
    steps_x = [runs[r.number].data.metrics["optimizer_steps"] * r.lr / (1 - r.momentum) for r in done]
    dist = [runs[r.number].data.metrics["weight_distance"] for r in done]
    sc = axes[1].scatter(steps_x, dist, c=np.log2([r.batch_size for r in done]), cmap="plasma")
    fig.colorbar(sc, ax=axes[1], label="log2 B")
    slope, _ = np.polyfit(np.log(steps_x), np.log(dist), 1)
    print(f"log-log slope of distance against S lr / (1 - m), all {len(done)} completed trials: {slope:.2f}\n")
    axes[1].set(xscale="log", yscale="log", xlabel="optimizer steps x effective lr  (S lr / (1 - m))",
                ylabel="L2 distance", title="Distance against S x effective lr (colour: log2 B)")
    fig.tight_layout()
    fig.savefig(DOCS / "experiments-weight-distance.png", dpi=110)
    plt.close(fig)


def gradient_section(store: Store, analysis: object) -> None:
    """Gradient histograms per batch size, per-layer gradient norms and the measured noise scale."""
    name = "linear-scaling-sgd"
    table = store.table(name)
    best = best_per_batch(table)
    runs = store.runs(name)
    print("### Gradient statistics (linear-scaling-sgd, best trial per batch size)\n")
    print("| B | grad_noise_scale (last epoch) | median over trials | grad_norm epoch 1 / last | "
          "layer 1 / 3 / 5 grad norm (last) | generalization gap |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in sorted(best):
        run = runs[best[b].number]
        m = run.data.metrics
        first = store.client.get_metric_history(run.info.run_id, "grad_norm")[0].value
        gns = [r.grad_noise_scale for r in table.records if r.batch_size == b and r.grad_noise_scale]
        layers = " / ".join(f"{m[f'grad_norm.{k}']:.3f}" for k in ("1", "3", "5"))
        print(f"| {b} | {m.get('grad_noise_scale', float('nan')):.0f} | "
              f"{statistics.median(gns) if gns else float('nan'):.0f} | {first:.3f} / {m['grad_norm']:.3f} | "
              f"{layers} | {m['generalization_gap']:+.3f} |")
    print(f"\nFitted B_noise (analysis): {analysis.b_noise}\n")

    hists = load_grad_histograms(store.tracking, name)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, epoch in zip(axes[:2], (1, 10), strict=True):
        for b, hs in hists.items():
            h = next((h for h in hs if h.trial == best[b].number and h.epoch == epoch), None)
            if h is None:
                continue
            edges = np.array(h.edges)
            centre = len(h.counts) // 2  # the bin (-1e-10, 1e-10], exact zeros included
            d = h.density()
            # Fold the signs: the fraction of values per magnitude bin, the negative bins mirrored.
            mags = d[centre + 1:] + d[centre - 1::-1]
            ax.step(edges[centre + 1:-1], mags, where="post", label=f"B={b} (|g| < 1e-10: {d[centre]:.0%})")
        ax.set(xscale="log", xlim=(1e-8, 1), xlabel="|gradient value| (shared log bins, signs folded)",
               ylabel="fraction of values", title=f"Raw gradient values, epoch {epoch} (best trial per B)")
        ax.legend(fontsize=8)
    for b in sorted(best):
        run = runs[best[b].number]
        hist = store.client.get_metric_history(run.info.run_id, "grad_noise_scale")
        axes[2].plot([h.step for h in hist], [h.value for h in hist], "o-", ms=3, label=f"B={b}")
    if analysis.b_noise:
        axes[2].axhline(analysis.b_noise, color="k", ls="--", lw=0.8, label="fitted B_noise")
    axes[2].set(yscale="log", xlabel="epoch", ylabel="measured B_simple", title="Gradient noise scale (best trials)")
    axes[2].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(DOCS / "experiments-gradients.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="/tmp/bstune-experiments", help="folder for the throwaway stores")
    ap.add_argument("--no-run", action="store_true", help="only report on studies already run")
    ap.add_argument("--only", nargs="*", default=list(PRESETS), help="presets to run (default: all)")
    args = ap.parse_args()
    store = Store(Path(args.store))
    if not args.no_run:
        seconds = {name: store.run(name) for name in args.only}
        print("| preset | wall seconds |\n|---|---:|")
        for name, s in seconds.items():
            print(f"| studies/{name}.yaml | {s:.0f} |")
        print(f"| total | {sum(seconds.values()):.0f} |\n")
    analyses = lr_section(store, {"linear-scaling-sgd": "SGD, equal epochs", "equal-steps": "SGD, equal steps",
                                  "adam-vs-sgd": "Adam, equal epochs"})
    steps_section(store)
    accumulation_section(store)
    distance_section(store)
    gradient_section(store, analyses["linear-scaling-sgd"])


if __name__ == "__main__":
    main()
