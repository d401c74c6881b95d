"""The report's plots, drawn from an Analysis and its TrialTable into PNG bytes.

Figures are built with matplotlib's object API (no pyplot), so nothing global changes and no window opens;
PNGs are rendered by the Agg backend. Every axis carries a label with its unit, a legend and a title;
batch sizes and learning rates span octaves, so their axes are logarithmic (base 2 for batch sizes).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

from bstune.analysis import Analysis
from bstune.trials import FAILED_STATES, State, TrialRecord, TrialTable, short_count

DPI = 100
_FORM_STYLE = {"power": "-.", "linear": "--", "sqrt": ":", "saturating": (0, (5, 1, 1, 1, 1, 1)),
               "saturating-sqrt": (0, (3, 1, 1, 1)), "surge": (0, (1, 1))}
_FAILED = "failed"  # every state of FAILED_STATES, drawn alike
_STATE_COLOURS = {State.COMPLETE: "#4c72b0", State.PRUNED: "#b0b0b0", State.DIVERGED: "#c44e52",
                  _FAILED: "#333333"}


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def batch_colours(sizes: Sequence[int]) -> dict[int, Any]:
    """One colour per batch size, ordered from small (dark) to large (light), the same in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    n = max(len(sizes) - 1, 1)
    return {b: cmap(0.9 * i / n) for i, b in enumerate(sorted(sizes))}


# ------------------------------------------------------------------------------------- optimal lr vs B


def lr_vs_batch(analysis: Analysis, table: TrialTable, extra: Sequence[tuple[int, float, float]] = ()) -> Figure:
    """lr* and effective lr* against B (log-log): per-batch optima with their intervals, the completed and
    diverged trials, the divergence edge, and every fitted form. ``extra``: (B, lr, effective lr) of
    recommendations at batch sizes that were not measured."""
    fig = Figure(figsize=(13, 6.4), layout="constrained")
    axes = fig.subplots(1, 2)
    sizes = table.batch_sizes()
    grid = np.geomspace(min(sizes) / 1.5, max(sizes) * 1.5, 200)
    done = table.completed()
    diverged = [r for r in table.records if r.state == State.DIVERGED]
    for ax, effective in zip(axes, (False, True), strict=True):
        what = "effective lr = lr / (1 - m)" if effective else "learning rate lr"
        get = (lambda r: r.effective_lr) if effective else (lambda r: r.lr)
        ax.scatter([r.batch_size for r in done], [get(r) for r in done], s=12, color="#9a9a9a", alpha=0.5,
                   label="completed trials", zorder=2)
        if diverged:
            ax.scatter([r.batch_size for r in diverged], [get(r) for r in diverged], s=30, marker="x",
                       color=_STATE_COLOURS[State.DIVERGED], label="diverged trials", zorder=2)
        edges = [(o.batch_size, o.max_stable_effective_lr if effective else o.max_stable_lr)
                 for o in analysis.per_batch]
        edges = [(b, v) for b, v in edges if v is not None]
        if edges:
            ax.plot(*zip(*edges, strict=True), marker="v", ls=":", color=_STATE_COLOURS[State.DIVERGED], ms=8,
                    label="max stable lr (edge)", zorder=3)
        fitted = [o for o in analysis.per_batch if o.fitted]
        for bracketed in (True, False):
            pts = [o for o in fitted if o.bracketed == bracketed]
            if not pts:
                continue
            ys = [o.effective_lr if effective else o.lr for o in pts]
            ivs = [o.effective_lr_interval if effective else o.lr_interval for o in pts]
            err = np.array([[y - iv[0], iv[1] - y] for y, iv in zip(ys, ivs, strict=True)]).T
            ax.errorbar([o.batch_size for o in pts], ys, yerr=np.clip(err, 0, None), fmt="o", ms=7, capsize=4,
                        color="black", mfc="black" if bracketed else "white", zorder=5,
                        label="fitted optimum, 95% interval" if bracketed
                        else "optimum not bracketed (a bound)")
        fits, preferred = analysis.fits_for(effective)
        for form, fit in fits.items():
            ys = np.array([fit.predict(b) for b in grid])
            best = form == preferred
            how = "preferred" if best else f"d{analysis.criterion} {fit.delta:.1f}"
            ax.plot(grid, ys, ls="-" if best else _FORM_STYLE[form], lw=2.4 if best else 1.3,
                    color="#dd8452" if best else "#55a868" if form in ("linear", "sqrt") else "#8172b3",
                    label=f"{_form_label(form, fit.params)}, {how}", zorder=4)
            if best:
                band = np.array([fit.predict_interval(b) for b in grid])
                ax.fill_between(grid, band[:, 0], band[:, 1], color="#dd8452", alpha=0.18, lw=0,
                                label="preferred, 95% band")
        if extra:
            ax.scatter([e[0] for e in extra], [e[2] if effective else e[1] for e in extra], marker="D", s=36,
                       facecolor="white", edgecolor="#dd8452", lw=1.5, zorder=6, label="recommended, not measured")
        if effective and analysis.b_noise is not None:
            ax.axvline(analysis.b_noise, color="#64b5cd", ls="--", lw=1.2,
                       label=f"B_noise ~ {analysis.b_noise:.0f}")
        _log2_batch_axis(ax, sizes)
        ax.set_yscale("log")
        _plain_numbers(ax.yaxis)
        ax.set_xlabel("batch size B (examples per optimizer step)")
        ax.set_ylabel(f"{what} (per step, log scale)")
        ax.set_title(f"Optimal {'effective lr' if effective else 'lr'} vs batch size")
        ax.grid(True, which="major", alpha=0.3)
        _legend_below(ax)
    fig.suptitle(_study_title(table, "how the optimal learning rate moves with the batch size"))
    return fig


def _form_label(form: str, params: dict[str, float]) -> str:
    if form == "surge":
        return f"surge, peak at B={params['b_noise']:.0f}"
    if form in ("saturating", "saturating-sqrt"):
        return f"{form}, B_noise={params['b_noise']:.0f}"
    if form == "power":
        return f"power B^alpha, alpha={params['alpha']:.2f}"
    return {"linear": "linear rule (lr ~ B)", "sqrt": "sqrt rule (lr ~ sqrt B)"}[form]


# ---------------------------------------------------------------------------------- objective landscape


def objective_map(analysis: Analysis, table: TrialTable) -> Figure:
    """Left: every trial in the (B, lr) plane, coloured by the objective, pruned and diverged trials marked.
    Right: the objective against the effective lr per batch size (the valleys)."""
    fig = Figure(figsize=(13, 6.0), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    sizes = table.batch_sizes()
    colours = batch_colours(sizes)
    metric = table.metric
    done = [r for r in table.records if r.state == State.COMPLETE and _finite(r.value)]
    values = np.array([r.value for r in done], dtype=float)
    minimize = table.direction == "minimize"
    lo_v, hi_v = _colour_range(values, minimize)
    norm = Normalize(lo_v, hi_v)
    cmap = "viridis_r" if minimize else "viridis"  # better trials are the brighter ones
    groups: dict[str, list[TrialRecord]] = {State.PRUNED: [], State.DIVERGED: [], _FAILED: []}
    for r in table.records:
        key = _FAILED if r.state in FAILED_STATES else r.state
        if key in groups:
            groups[key].append(r)

    def x(r: TrialRecord) -> float:  # spread the trials of one batch size a little, the same way every time
        return r.batch_size * 2.0 ** (0.28 * (((r.number * 0.618034) % 1.0) - 0.5))

    sc = ax.scatter([x(r) for r in done], [r.lr for r in done], c=values, cmap=cmap, norm=norm, s=46,
                    edgecolor="black", lw=0.4, label="completed (colour: final value)", zorder=3)
    fig.colorbar(sc, ax=ax, label=f"final {metric} (clipped at the {'90th' if minimize else '10th'} percentile)")
    ax.scatter([x(r) for r in groups[State.PRUNED]], [r.lr for r in groups[State.PRUNED]], marker="^", s=36,
               facecolor="white", edgecolor="#707070", label="pruned", zorder=3)
    ax.scatter([x(r) for r in groups[State.DIVERGED]], [r.lr for r in groups[State.DIVERGED]], marker="X", s=60,
               color=_STATE_COLOURS[State.DIVERGED], label="diverged", zorder=3)
    if groups[_FAILED]:
        ax.scatter([x(r) for r in groups[_FAILED]], [r.lr for r in groups[_FAILED]], marker="+", s=60,
                   color="black", label="failed / OOM", zorder=3)
    fitted = [o for o in analysis.per_batch if o.fitted]
    if fitted:
        ax.plot([o.batch_size for o in fitted], [o.lr for o in fitted], marker="*", ms=14, color="#dd8452",
                mec="black", ls="-", lw=1, label="fitted lr* per batch size", zorder=4)
    _log2_batch_axis(ax, sizes)
    ax.set_yscale("log")
    _plain_numbers(ax.yaxis)
    ax.set_xlabel("batch size B (examples per optimizer step; trials spread sideways)")
    ax.set_ylabel("learning rate lr (per step, log scale)")
    ax.set_title(f"Final {metric} over (batch size, lr)")
    _legend_below(ax)
    ax.grid(True, alpha=0.3)

    # the valleys; pruned trials at their last value, diverged ones along the worst edge
    shown = [r.value for r in table.records if r.state in (State.COMPLETE, State.PRUNED) and _finite(r.value)]
    worst = _valley_worst(np.array(shown, dtype=float), minimize)
    for b, group in table.by_batch_size().items():
        rs = sorted((r for r in group if r.state == State.COMPLETE and _finite(r.value)), key=lambda r: r.effective_lr)
        ax2.plot([r.effective_lr for r in rs], [r.value for r in rs], marker="o", ms=5, lw=1, color=colours[b],
                 label=f"B={b}")
        pr = [r for r in group if r.state == State.PRUNED and _finite(r.value)]
        ax2.scatter([r.effective_lr for r in pr], [min(r.value, worst) if minimize else r.value for r in pr],
                    marker="^", s=30, facecolor="white", edgecolor=colours[b], zorder=3)
        dv = [r for r in group if r.state == State.DIVERGED]
        ax2.scatter([r.effective_lr for r in dv], [worst] * len(dv), marker="X", s=50, color=colours[b],
                    edgecolor=_STATE_COLOURS[State.DIVERGED], zorder=3)
    ax2.set_xscale("log")
    _plain_numbers(ax2.xaxis)
    if minimize and len(shown) and min(shown) > 0:
        ax2.set_yscale("log")
        ax2.set_ylim(min(shown) / 1.15, worst * 1.15)
        _plain_numbers(ax2.yaxis)
    ax2.set_xlabel("effective lr = lr / (1 - m) (per step, log scale)")
    ax2.set_ylabel(f"final {metric}" + (" (log scale)" if ax2.get_yscale() == "log" else ""))
    ax2.set_title(f"Final {metric} vs effective lr, per batch size")
    handles, labels = ax2.get_legend_handles_labels()
    handles += [Line2D([], [], marker="^", ls="", mfc="white", mec="#707070", label="pruned (last value)"),
                Line2D([], [], marker="X", ls="", color="#9a9a9a", mec=_STATE_COLOURS[State.DIVERGED],
                       label=f"diverged (drawn at the {'top' if minimize else 'bottom'})")]
    _legend_below(ax2, handles=handles, ncol=4)
    ax2.grid(True, which="major", alpha=0.3)
    fig.suptitle(_study_title(table, "the objective landscape"))
    return fig


def _colour_range(values: np.ndarray, minimize: bool) -> tuple[float, float]:
    if not len(values):
        return 0.0, 1.0
    lo, hi = (float(values.min()), float(np.quantile(values, 0.9))) if minimize \
        else (float(np.quantile(values, 0.1)), float(values.max()))
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def _valley_worst(values: np.ndarray, minimize: bool) -> float:
    """The worst value the right panel shows (diverged trials sit there): a loss that blew up would squash the
    valleys flat, so a minimised objective is cut off above the 90th percentile (and 4x the best)."""
    if not len(values):
        return 1.0
    if not minimize:
        return float(values.min())
    best = float(values.min())
    return float(min(values.max(), max(np.quantile(values, 0.9), 4.0 * best)))


# ------------------------------------------------------------------------------------- steps to target


def steps_tradeoff(analysis: Analysis, table: TrialTable) -> Figure:
    """Fewest optimizer steps and examples to the target per batch size, with S(B) = S_min (1 + B_crit / B)."""
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    ax_s, ax_e = fig.subplots(1, 2)
    sizes = table.batch_sizes()
    s = analysis.steps
    for ax, examples in ((ax_s, False), (ax_e, True)):
        unit = "examples (B x steps)" if examples else "optimizer steps"
        if s is None:
            ax.text(0.5, 0.5, "no steps-to-target fit\n(see the report's warnings)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=12, color="#555555")
            ax.plot([], [], label="no data")
        else:
            for upper in (False, True):
                pts = [p for p in s.points if p.steps is not None and p.upper_bound == upper]
                ys = [p.examples if examples else p.steps for p in pts]
                ax.scatter([p.batch_size for p in pts], ys, s=60 if not upper else 70,
                           marker="o" if not upper else "v", color="black" if not upper else "white",
                           edgecolor="black", zorder=4,
                           label="fewest to target over the trials" if not upper
                           else "reached by the first epoch (upper bound, not fitted)")
            missed = [p.batch_size for p in s.points if p.steps is None]
            if missed:
                ax.plot([], [], ls="", label=f"target not reached at B={', '.join(map(str, missed))}")
            if s.s_min is not None and s.b_crit is not None:
                grid = np.geomspace(min(sizes) / 1.5, max(sizes) * 1.5, 200)
                fit = np.array([s.predict(b) for b in grid])
                ax.plot(grid, fit * grid if examples else fit, color="#dd8452", lw=2.2,
                        label="fit S = S_min (1 + B_crit/B)" if not examples else "fit E = E_min (1 + B/B_crit)")
                level = s.e_min if examples else s.s_min
                ax.axhline(level, color="#8172b3", ls="--", lw=1,
                           label=f"{'E_min' if examples else 'S_min'} = {level:,.0f}")
                ax.axvline(s.b_crit, color="#64b5cd", ls="--", lw=1.2, label=f"B_crit = E_min/S_min ~ {s.b_crit:.0f}")
            ax.set_yscale("log")
            _plain_numbers(ax.yaxis)
        _log2_batch_axis(ax, sizes)
        ax.set_xlabel("batch size B (examples per optimizer step)")
        ax.set_ylabel(f"{unit} to the target (log scale)")
        ax.set_title(f"{'Examples' if examples else 'Steps'} to reach the target vs batch size")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    target = "" if s is None else f": {table.metric} {'<=' if table.direction == 'minimize' else '>='} {s.target:.4g}"
    fig.suptitle(_study_title(table, f"the steps / examples trade-off{target}"))
    return fig


# ------------------------------------------------------------------------------- budget and curves


def budget_and_curves(analysis: Analysis, table: TrialTable) -> Figure:
    """Left: training examples spent per batch size, by how the trials ended. Right: the learning curve of
    the best completed trial at each batch size, against optimizer steps."""
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    groups = table.by_batch_size()
    sizes = list(groups)
    xs = np.arange(len(sizes))
    # examples are what a budget counts; a table without them (some CSVs) shows seconds, else trial counts
    if any(r.examples_seen for r in table.records):
        amount, unit = (lambda r: r.examples_seen), "training examples processed (summed over trials)"
    elif any(r.train_seconds for r in table.records):
        amount, unit = (lambda r: r.train_seconds), "training time (s, summed over trials)"
    else:
        amount, unit = (lambda r: 1), "trials"
    bottom = np.zeros(len(sizes))
    for state, colour in _STATE_COLOURS.items():
        spent = np.array([sum(amount(r) for r in rs if (r.state in FAILED_STATES if state == _FAILED
                                                        else r.state == state)) for rs in groups.values()],
                         dtype=float)
        if spent.any():
            ax.bar(xs, spent, bottom=bottom, color=colour, edgecolor="white", label=state.lower())
            bottom += spent
    for x, rs, h in zip(xs, groups.values(), bottom, strict=True):
        secs = sum(r.train_seconds for r in rs)
        ax.annotate(f"{len(rs)} trials" + (f"\n{secs:.0f} s" if secs else ""), (x, h), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(xs, [str(b) for b in sizes])
    ax.set_ylim(0, max(bottom.max(), 1e-9) * 1.25)
    _plain_numbers(ax.yaxis)
    ax.set_xlabel("batch size B (examples per optimizer step)")
    ax.set_ylabel(unit)
    ax.set_title("Budget spent per batch size")
    ax.legend(title="trials that ended", fontsize=8, loc="upper left", framealpha=0.85)
    ax.grid(True, axis="y", alpha=0.3)

    colours = batch_colours(sizes)
    values: list[float] = []
    for b, rs in groups.items():
        best = table.best([r for r in rs if r.curve and _finite(r.value)])
        if best is None:
            continue
        pts = [p for p in best.curve if _finite(p.value)]
        steps = [p.steps(b, table.n_train) or p.epoch for p in pts]  # the epoch when nothing says more
        ax2.plot(steps, [p.value for p in pts], marker="o", ms=3.5, color=colours[b],
                 label=f"B={b}: lr={best.lr:.3g}, m={best.momentum:.2f}")
        values += [p.value for p in pts]
    if not values:
        ax2.text(0.5, 0.5, "no learning curves in the table", ha="center", va="center", transform=ax2.transAxes,
                 fontsize=12, color="#555555")
        ax2.plot([], [], label="no curves")
    if analysis.steps is not None:
        ax2.axhline(analysis.steps.target, color="#c44e52", ls="--", lw=1,
                    label=f"target {analysis.steps.target:.4g}")
    ax2.set_xscale("log")
    _plain_numbers(ax2.xaxis)
    if table.direction == "minimize" and values and min(values) > 0:
        ax2.set_yscale("log")
        _plain_numbers(ax2.yaxis)
    ax2.set_xlabel("optimizer steps (log scale)")
    ax2.set_ylabel(f"{table.metric} after each epoch" + (" (log scale)" if ax2.get_yscale() == "log" else ""))
    ax2.set_title("Learning curve of the best trial per batch size")
    ax2.grid(True, which="both", alpha=0.25)
    ax2.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.suptitle(_study_title(table, "where the budget went"))
    return fig


# ------------------------------------------------------------------------------------------- helpers


def _legend_below(ax: Any, ncol: int = 2, **kw: Any) -> None:
    """A legend under the axes: the plots are dense, and a legend inside would hide trials."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=ncol, fontsize=8, frameon=False, **kw)


def _plain_numbers(axis: Any) -> None:
    """1,500 and 0.02 rather than 1.5x10^3 and 2x10^-2, on major and minor ticks alike."""
    def label(v: float, _: Any) -> str:
        return short_count(v) if v >= 1000 else f"{v:g}"

    def minor(v: float, _: Any) -> str:  # minor ticks only where the axis spans about a decade or less
        lo, hi = axis.get_view_interval()
        return label(v, _) if lo > 0 and hi / lo < 25 else ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(minor))


def _log2_batch_axis(ax: Any, sizes: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    lo, hi = math.floor(math.log2(min(sizes))), math.ceil(math.log2(max(sizes)))
    ticks = [2.0**k for k in range(lo, hi + 1)]
    ax.set_xticks(ticks, [str(int(t)) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _study_title(table: TrialTable, what: str) -> str:
    name = f"study '{table.study_name}'" if table.study_name else "trial table"
    return f"{name}: {what}"
