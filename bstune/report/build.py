"""Gathering a report: every number it shows, from a TrialTable and its Analysis, and its plots as PNGs.

Expected wall time to the target = steps to the target x B / the examples per second the trials of that
batch size achieved (the median over its trials), interpolated log-log between the measured batch sizes
and held beyond them.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bstune.analysis import Analysis, analyze, jsonable
from bstune.analysis.answer import throughput
from bstune.errors import BstuneError
from bstune.report.plots import budget_and_curves, lr_vs_batch, objective_map, png, steps_tradeoff
from bstune.report.text import law_verdict
from bstune.trials import StateCounts, TrialTable


@dataclass
class Row:
    """One line of the recommendation table."""

    batch_size: int
    source: str  # "measured", "in between" (a power of two in the measured range) or "requested"
    lr: float
    lr_interval: tuple[float, float]
    momentum: float
    effective_lr: float
    form: str
    extrapolated: bool
    above_critical: bool
    expected_value: float | None  # the objective expected at the end of the study's training budget
    steps: float | None  # optimizer steps to the target
    examples: float | None
    examples_per_second: float | None
    seconds: float | None  # wall time to the target
    linear_rule_lr: float | None  # what the fitted linear and square-root rules would use instead
    sqrt_rule_lr: float | None
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    table: TrialTable
    analysis: Analysis
    rows: list[Row]
    spent: dict[str, Any]
    law: dict[str, Any]
    plots: dict[str, bytes]  # file stem -> PNG
    created: str
    rows_error: str = ""  # why there is no recommendation table, when there is none

    @property
    def name(self) -> str:
        return self.table.study_name or "trials"

    def to_dict(self) -> dict[str, Any]:
        """Every number in the report, JSON-ready."""
        return jsonable({
            "study": self.table.study_name, "created": self.created, "metric": self.table.metric,
            "direction": self.table.direction, "n_train": self.table.n_train,
            "spec": self.table.meta.get("spec") or None,
            "mlflow_parent_run_id": self.table.meta.get("mlflow_parent_run_id"),
            "spent": self.spent, "recommendations": [r.__dict__ for r in self.rows],
            "recommendations_error": self.rows_error or None, "law": self.law,
            "analysis": self.analysis.to_dict(), "plots": [f"{stem}.png" for stem in self.plots],
        })


def build_report(table: TrialTable, *, batch_sizes: Sequence[int] = (), target: float | None = None,
                 n_boot: int = 200, seed: int = 0, analysis: Analysis | None = None) -> Report:
    """Analyse ``table`` (unless ``analysis`` is given) and gather the report; ``batch_sizes``: more batch
    sizes to recommend for, besides the measured ones and the powers of two between them."""
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise BstuneError(f"--batch-size must be a positive integer, got {b!r}")
    if analysis is None:
        analysis = analyze(table, target=target, n_boot=n_boot, seed=seed)
    rows, error = _rows(table, analysis, [int(b) for b in batch_sizes])
    extra = [(r.batch_size, r.lr, r.effective_lr) for r in rows if r.source != "measured"]
    figures = {
        "lr_vs_batch": lr_vs_batch(analysis, table, extra),
        "objective_map": objective_map(analysis, table),
        "steps_tradeoff": steps_tradeoff(analysis, table),
        "budget_and_curves": budget_and_curves(analysis, table),
    }
    return Report(table=table, analysis=analysis, rows=rows, spent=_spent(table), law=_law(analysis),
                  plots={k: png(f) for k, f in figures.items()}, rows_error=error,
                  created=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))


def report_batch_sizes(measured: Sequence[int], requested: Sequence[int] = ()) -> list[tuple[int, str]]:
    """The batch sizes of the recommendation table with their source: the measured ones, the powers of two
    across the measured range, and the requested ones."""
    out = {b: "measured" for b in measured}
    lo, hi = min(measured), max(measured)
    for k in range(math.ceil(math.log2(lo)), math.floor(math.log2(hi)) + 1):
        out.setdefault(2**k, "in between")
    for b in requested:
        out.setdefault(b, "requested")
    return sorted(out.items())


def _rows(table: TrialTable, a: Analysis, requested: list[int]) -> tuple[list[Row], str]:
    measured = [o.batch_size for o in a.per_batch]
    fitted = {o.batch_size: o.value for o in a.per_batch if o.fitted and o.value is not None}
    rate = throughput(table)
    effective = a.basis == "effective"
    fits, _ = a.fits_for(effective)
    rows = []
    for b, source in report_batch_sizes(measured, requested):
        try:
            rec = a.recommend(b)
        except BstuneError as e:
            return [], str(e)
        scale = 1.0 - rec.momentum if effective else 1.0
        steps = _steps_to_target(a, b)
        eps = _loglog(rate, b, hold=True)
        rows.append(Row(
            batch_size=b, source=source, lr=rec.lr, lr_interval=rec.lr_interval, momentum=rec.momentum,
            effective_lr=rec.effective_lr, form=rec.form, extrapolated=rec.extrapolated,
            above_critical=rec.above_critical,
            expected_value=fitted.get(b) if b in fitted else _interp(fitted, b),
            steps=steps, examples=None if steps is None else steps * b, examples_per_second=eps,
            seconds=None if steps is None or not eps else steps * b / eps,
            linear_rule_lr=fits["linear"].predict(b) * scale if "linear" in fits else None,
            sqrt_rule_lr=fits["sqrt"].predict(b) * scale if "sqrt" in fits else None,
            notes=rec.notes,
        ))
    return rows, ""


def _steps_to_target(a: Analysis, b: int) -> float | None:
    s = a.steps
    if s is None:
        return None
    if s.s_min is not None and s.b_crit is not None:
        return s.predict(b)
    # no trade-off fit: the measured fewest steps, interpolated between measured batch sizes
    return _loglog({p.batch_size: p.steps for p in s.points if p.steps is not None and not p.upper_bound}, b)


def _interp(points: dict[int, float], b: int) -> float | None:
    """Linear in log2 B between the nearest measured batch sizes; None outside them."""
    if len(points) < 2 or not min(points) <= b <= max(points):
        return None
    xs = sorted(points)
    return float(np.interp(math.log2(b), np.log2(xs), [points[x] for x in xs]))


def _loglog(points: dict[int, float], b: int, hold: bool = False) -> float | None:
    """Linear in log-log between the measured batch sizes; beyond them the nearest value if ``hold``."""
    pts = {k: v for k, v in points.items() if v and v > 0}
    if not pts:
        return None
    xs = sorted(pts)
    if not hold and not xs[0] <= b <= xs[-1]:
        return None
    return float(2.0 ** np.interp(math.log2(b), np.log2(xs), np.log2([pts[x] for x in xs])))


def _spent(table: TrialTable) -> dict[str, Any]:
    """The budget spent, in all and per batch size (trials by state); trials run again or not finished do
    not count as spent trials."""
    limits = (table.meta.get("spec") or {}).get("budget") or {}
    per_batch = {}
    for b, rs in table.by_batch_size().items():
        states = dict(StateCounts.of(r.state for r in rs).counts)
        per_batch[b] = {"trials": len(rs), "states": states, "examples": sum(r.examples_seen for r in rs),
                        "seconds": sum(r.train_seconds for r in rs)}
    return {"trials": StateCounts.of(r.state for r in table.records).spent_trials,
            "examples": sum(r.examples_seen for r in table.records),
            "seconds": sum(r.train_seconds for r in table.records),
            "limits": {k: limits.get(k) for k in ("trials", "examples", "seconds")}, "per_batch_size": per_batch}


def _law(a: Analysis) -> dict[str, Any]:
    """The preferred law and what it says about the linear and square-root rules, per basis."""
    out: dict[str, Any] = {"basis": a.basis, "criterion": a.criterion, "b_noise": a.b_noise,
                           "b_noise_interval": a.b_noise_interval}
    for key, effective in (("lr", False), ("effective_lr", True)):
        fits, preferred = a.fits_for(effective)
        out[key] = {"preferred": preferred, "verdict": law_verdict(fits, preferred, a.criterion)}
    return out
