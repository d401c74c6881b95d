"""A study's report: what was run and spent, what to use at each batch size, the fitted law, and plots.

``build_report(table)`` analyses a TrialTable and gathers every number of the report; ``write_report``
writes it as one self-contained HTML file (plots embedded as data URIs), as Markdown with the PNG plots
beside it, or as JSON (``make_report`` does both); ``publish`` logs it under ``report/`` in the study's
MLflow parent run and points the run's description at it.

Expected wall time to the target = steps to the target x B / the examples per second the trials of that
batch size achieved (the median over its trials), interpolated log-log between the measured batch sizes
and held beyond them.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bstune import plots
from bstune.analysis import LEVEL, Analysis, LawFit, analyze, jsonable
from bstune.errors import BstuneError
from bstune.trials import RETRIED_STATES, TrialTable

FORMATS = ("html", "md", "json")
_UNCOUNTED = (*RETRIED_STATES, "RUNNING", "WAITING")  # re-run or unfinished: not a spent trial
_PLOTS = (  # file stem, title, caption
    ("lr_vs_batch", "Optimal learning rate vs batch size",
     "Fitted optimum per batch size (95% bootstrap interval), every fitted form of lr*(B) with the preferred "
     "one's band, the linear and square-root rules, and the largest lr that did not diverge."),
    ("objective_map", "Objective over (batch size, lr)",
     "Every trial; colour is the final objective, pruned and diverged trials are marked. Right: the valley "
     "of the objective against the effective lr at each batch size."),
    ("steps_tradeoff", "Steps and examples to the target",
     "Fewest optimizer steps (left) and examples (right) any trial needed to reach the target, with the "
     "fitted trade-off S = S_min (1 + B_crit/B)."),
    ("budget_and_curves", "Budget and learning curves",
     "Training time spent per batch size by how the trials ended, and the learning curve of the best "
     "trial at each batch size."),
)


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


# ------------------------------------------------------------------------------------------------ build


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
        "lr_vs_batch": plots.lr_vs_batch(analysis, table, extra),
        "objective_map": plots.objective_map(analysis, table),
        "steps_tradeoff": plots.steps_tradeoff(analysis, table),
        "budget_and_curves": plots.budget_and_curves(analysis, table),
    }
    return Report(table=table, analysis=analysis, rows=rows, spent=_spent(table), law=_law(analysis),
                  plots={k: plots.png(f) for k, f in figures.items()}, rows_error=error,
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
    rate = _throughput(table)
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


def _throughput(table: TrialTable) -> dict[int, float]:
    """Examples per second per batch size: the median over its trials (one slow trial, e.g. on a shared
    machine, would drag a sum down)."""
    out = {}
    for b, rs in table.by_batch_size().items():
        rates = [r.examples_seen / r.train_seconds for r in rs if r.train_seconds > 0 and r.examples_seen > 0]
        if rates:
            out[b] = float(np.median(rates))
    return out


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
    counted = [r for r in table.records if r.state not in _UNCOUNTED]
    limits = (table.meta.get("spec") or {}).get("budget") or {}
    per_batch = {}
    for b, rs in table.by_batch_size().items():
        states: dict[str, int] = {}
        for r in rs:
            states[r.state] = states.get(r.state, 0) + 1
        per_batch[b] = {"trials": len(rs), "states": states, "examples": sum(r.examples_seen for r in rs),
                        "seconds": sum(r.train_seconds for r in rs)}
    return {"trials": len(counted), "examples": sum(r.examples_seen for r in table.records),
            "seconds": sum(r.train_seconds for r in table.records),
            "limits": {k: limits.get(k) for k in ("trials", "examples", "seconds")}, "per_batch_size": per_batch}


def _law(a: Analysis) -> dict[str, Any]:
    """The preferred law and what it says about the linear and square-root rules, per basis."""
    out: dict[str, Any] = {"basis": a.basis, "criterion": a.criterion, "b_noise": a.b_noise,
                           "b_noise_interval": a.b_noise_interval}
    for key, effective in (("lr", False), ("effective_lr", True)):
        fits, preferred = a.fits_for(effective)
        out[key] = {"preferred": preferred, "verdict": _verdict(fits, preferred, a.criterion)}
    return out


def _verdict(fits: dict[str, LawFit], preferred: str | None, criterion: str) -> str:
    if not fits or preferred is None:
        return "no fit: fewer than 2 batch sizes have a bracketed optimum"
    power = fits["power"]
    lo, hi = power.intervals["alpha"]
    parts = [f"The {preferred} form fits best. The power law's exponent is alpha = {power.alpha:.2f} "
             f"({LEVEL:.0%} interval {lo:.2f} to {hi:.2f})."]
    for name, form, alpha, inside in (("Linear", "linear", 1.0, power.contains_linear),
                                      ("Square-root", "sqrt", 0.5, power.contains_sqrt)):
        verdict = "inside the interval (consistent)" if inside else "outside the interval (ruled out)"
        parts.append(f"{name} rule (alpha = {alpha:g}): {verdict}, d{criterion} {fits[form].delta:.1f}.")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------ write


def make_report(table: TrialTable, out_dir: str | Path, fmt: str = "html", *, batch_sizes: Sequence[int] = (),
                target: float | None = None) -> tuple[Report, list[Path]]:
    """Build the report of ``table`` and write it (see ``write_report``); bad arguments fail before any work."""
    _check_output(out_dir, fmt)
    report = build_report(table, batch_sizes=batch_sizes, target=target)
    return report, write_report(report, out_dir, fmt)


def write_report(report: Report, out_dir: str | Path, fmt: str = "html") -> list[Path]:
    """Write the report into ``out_dir`` as ``report.<fmt>`` (Markdown and JSON: with the PNG plots beside it).
    Returns the files written, the report first."""
    _check_output(out_dir, fmt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"report.{fmt}"
    files = [path]
    if fmt == "html":
        path.write_text(to_html(report))
        return files
    # Markdown and JSON name their plots as PNG files beside them.
    for stem, data in report.plots.items():
        (out / f"{stem}.png").write_bytes(data)
        files.append(out / f"{stem}.png")
    path.write_text(to_markdown(report) if fmt == "md" else json.dumps(report.to_dict(), indent=2) + "\n")
    return files


def _check_output(out_dir: str | Path, fmt: str) -> None:
    if fmt not in FORMATS:
        raise BstuneError(f"unknown report format {fmt!r}; use one of {', '.join(FORMATS)}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise BstuneError(f"--out {out_dir}: is a file; give a folder for the report")


def to_markdown(report: Report) -> str:
    """The report as Markdown; images are the PNG files written beside it."""
    lines = [f"# bstune report: {report.name}", "", _intro(report), ""]
    for title, header, body in _sections(report):
        lines += [f"## {title}", ""]
        lines += [header, ""] if header else []
        if body:
            lines += _md_table(*body) + [""]
    lines += ["## Plots", ""]
    for stem, title, caption in _PLOTS:
        if stem in report.plots:
            lines += [f"### {title}", "", f"![{title}]({stem}.png)", "", caption, ""]
    lines += _md_warnings(report)
    lines += ["## Study spec", "", "```yaml", _spec_yaml(report).rstrip(), "```", ""]
    return "\n".join(lines)


def to_html(report: Report) -> str:
    """The report as one self-contained HTML page: plots embedded as base64 data URIs."""
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>bstune report: {e(report.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>bstune report: {e(report.name)}</h1>", f"<p>{e(_intro(report))}</p>"]
    for title, header, body in _sections(report):
        parts.append(f"<h2>{e(title)}</h2>")
        if header:
            parts.append(f"<p>{e(header)}</p>")
        if body:
            heads, rows = body
            parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in heads) + "</tr></thead><tbody>"
                         + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
                         + "</tbody></table>")
    parts.append("<h2>Plots</h2>")
    for stem, title, caption in _PLOTS:
        if stem in report.plots:
            data = base64.b64encode(report.plots[stem]).decode("ascii")
            parts.append(f"<figure id='{stem}'><img alt='{e(title)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption><b>{e(title)}.</b> {e(caption)}</figcaption></figure>")
    if report.analysis.warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{e(w)}</li>" for w in report.analysis.warnings)
                     + "</ul>")
    parts.append(f"<h2>Study spec</h2><pre>{e(_spec_yaml(report))}</pre></body></html>")
    return "\n".join(parts) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1320px;margin:1.5em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.9em}"
        "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f2f2f2}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}"
        "figure{margin:1em 0 2em}figcaption{font-size:.9em;color:#444}pre{background:#f6f6f6;padding:.8em}")


def _intro(report: Report) -> str:
    a, t = report.analysis, report.table
    goal = "lower" if t.direction == "minimize" else "higher"
    return (f"{len(t.records)} trials over batch sizes {', '.join(map(str, t.batch_sizes()))}; objective "
            f"{t.metric} ({goal} is better). Intervals are {LEVEL:.0%} bootstrap intervals from {a.n_boot} "
            f"resamples of the trials. Generated {report.created}.")


def _sections(report: Report) -> list[tuple[str, str, tuple[list[str], list[list[str]]] | None]]:
    """(title, a sentence, (column heads, rows) or None) for every tabular section."""
    a, s = report.analysis, report.spent
    out: list[tuple[str, str, Any]] = []
    lim = s["limits"]
    spent = [["trials", _g(s["trials"]), _g(lim.get("trials"))],
             ["examples", f"{s['examples']:,}", _g(lim.get("examples"))],
             ["training seconds", f"{s['seconds']:.1f}", _g(lim.get("seconds"))]]
    per = [[str(b), str(v["trials"]), ", ".join(f"{k.lower()} {n}" for k, n in sorted(v["states"].items())),
            f"{v['examples']:,}", f"{v['seconds']:.1f}"] for b, v in s["per_batch_size"].items()]
    out.append(("Budget spent", "", (["", "spent", "limit"], spent)))
    out.append(("Trials per batch size", "",
                (["B", "trials", "ended", "examples", "training s"], per)))

    if report.rows:
        target = "" if a.steps is None else (f"; steps, examples and wall time are to reach {a.metric} "
                                             f"{'<=' if a.direction == 'minimize' else '>='} {a.steps.target:.4g}")
        what = "effective lr lr/(1 - m)" if a.basis == "effective" else "lr"
        head = (f"From the {report.rows[0].form} fit of the {what}, at the measured batch sizes too (it pools "
                "every batch size's trials; each one's own fitted optimum is under Optimum per batch size); "
                f"expected {a.metric} at the end of the study's "
                f"training budget (the fitted optimum, interpolated between measured batch sizes){target}. "
                "Wall time uses the examples per second the trials reached at each batch size.")
        rows = [[str(r.batch_size), r.source + (", extrapolated" if r.extrapolated else ""), _g(r.lr),
                 f"{_g(r.lr_interval[0])} to {_g(r.lr_interval[1])}", f"{r.momentum:.3f}", _g(r.effective_lr),
                 _g(r.expected_value), _g(r.steps, ".0f"), _g(r.examples, ",.0f"), _g(r.examples_per_second, ",.0f"),
                 _seconds(r.seconds), "above critical B" if r.above_critical else ""]
                for r in report.rows]
        out.append(("Recommendations", head, (
            ["B", "source", "lr", f"lr {LEVEL:.0%} interval", "momentum", "effective lr", f"expected {a.metric}",
             "steps to target", "examples to target", "examples/s", "wall time to target", "note"], rows)))
    else:
        out.append(("Recommendations", f"No recommendation: {report.rows_error}", None))

    law = report.law
    for key, fits, title in (("lr", a.fits, "lr*(B)"), ("effective_lr", a.effective_fits,
                                                         "effective lr*(B) = lr/(1 - m)")):
        used = (key == "effective_lr") == (a.basis == "effective")
        head = law[key]["verdict"] + (" These fits give the recommendations." if used and fits else "")
        body = None
        if fits:
            body = (["form", "parameters", "rms (octaves)", a.criterion, f"d{a.criterion}", "weight"],
                    [[f.form + (" (preferred)" if f.form == law[key]["preferred"] else ""), _params(f),
                      f"{f.rms_log2:.3f}", _g(f.aicc), f"{f.delta:.1f}", f"{f.weight:.2f}"] for f in fits.values()])
        out.append((f"Fitted law: {title}", head, body))
    if a.b_noise is not None:
        out.append(("Critical batch size", f"B_noise ~ {a.b_noise:.0f} ({_iv(a.b_noise_interval, '.0f')}), from the "
                    "saturating fit; above it, larger batches buy few fewer steps.", None))
    if report.rows:
        out.append(("Preferred law vs the linear and square-root rules",
                    "lr each fitted form gives at the recommended momentum; octaves = log2(rule / preferred).",
                    (["B", "preferred lr", "linear rule lr", "octaves", "sqrt rule lr", "octaves"],
                     [[str(r.batch_size), _g(r.lr), _g(r.linear_rule_lr), _oct(r.linear_rule_lr, r.lr),
                       _g(r.sqrt_rule_lr), _oct(r.sqrt_rule_lr, r.lr)] for r in report.rows])))
    opt = [[str(o.batch_size), str(o.n_complete), str(o.n_pruned), str(o.n_diverged), _g(o.lr), _iv(o.lr_interval),
            _g(o.momentum), _g(o.effective_lr), _g(o.value), _g(o.max_stable_lr), o.status]
           for o in a.per_batch]
    out.append(("Optimum per batch size", "The fitted optimum of each batch size's valley (not the best trial).",
                (["B", "completed", "pruned", "diverged", "lr*", "lr* interval", "m*", "effective lr*",
                  f"fitted {a.metric} at optimum", "max stable lr", "status"], opt)))
    s = a.steps
    if s is not None:
        body = (["B", "steps", "examples", "fit", "trials reaching it"],
                [[str(p.batch_size), _g(p.steps, ".0f") + (" (upper bound)" if p.upper_bound else ""),
                  _g(p.examples, ",.0f"), _g(s.predict(p.batch_size), ".0f"), f"{p.n_reached}/{p.n_curves}"]
                 for p in s.points])
        crit = (f"S_min = {s.s_min:.0f}, E_min = {s.e_min:,.0f}, B_crit = {s.b_crit:.0f} "
                f"({_iv(s.b_crit_interval, '.0f')})" if s.b_crit is not None and s.s_min is not None and s.e_min
                else "no B_crit (outside the measured batch sizes)")
        out.append(("Steps to target", f"Target {a.metric} {s.target:.4g} ({s.target_rule}); {crit}.", body))
    return out


def _md_table(heads: list[str], rows: list[list[str]]) -> list[str]:
    def cell(c: str) -> str:
        return c.replace("|", "\\|")

    return (["| " + " | ".join(cell(h) for h in heads) + " |", "|" + "---|" * len(heads)]
            + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def _md_warnings(report: Report) -> list[str]:
    if not report.analysis.warnings:
        return []
    return ["## Warnings", ""] + [f"- {w}" for w in report.analysis.warnings] + [""]


def _spec_yaml(report: Report) -> str:
    spec = report.table.meta.get("spec")
    return yaml.safe_dump(spec, sort_keys=False) if spec else "(no spec: the table was not read from a study)\n"


def _params(f: LawFit) -> str:
    p, iv = f.params, f.intervals
    if f.form == "saturating":
        return (f"lr_max = {_g(p['lr_max'])} ({_iv(iv['lr_max'])}), "
                f"B_noise = {p['b_noise']:.0f} ({_iv(iv['b_noise'], '.0f')})")
    text = f"a = {_g(p['a'])} ({_iv(iv['a'])})"
    if f.form == "power":
        text += f", alpha = {p['alpha']:.3f} ({_iv(iv['alpha'], '.3f')})"
    return text


def _g(v: Any, fmt: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def _iv(iv: Sequence[float] | None, fmt: str = ".3g") -> str:
    if iv is None:
        return "-"
    return " to ".join(format(v, fmt) if math.isfinite(v) else "inf" for v in iv)


def _oct(rule: float | None, lr: float) -> str:
    return "-" if rule is None else f"{math.log2(rule / lr):+.2f}"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


# ----------------------------------------------------------------------------------------------- MLflow


def publish(report: Report, files: Sequence[Path], tracking_uri: str) -> str:
    """Log the report and its plots under ``report/`` in the study's MLflow parent run and set the run's
    description to say where it is. Returns the run id."""
    from bstune.tracking import Tracker

    run_id = report.table.meta.get("mlflow_parent_run_id")
    if not run_id:
        raise BstuneError("the study has no MLflow parent run (user attr mlflow_parent_run_id); "
                          "pass --no-mlflow to write the report only")
    tracker = Tracker(tracking_uri)
    tracker.check()
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for f in files:
            (stage / f.name).write_bytes(f.read_bytes())
        for stem, data in report.plots.items():
            if not (stage / f"{stem}.png").exists():
                (stage / f"{stem}.png").write_bytes(data)
        tracker.attach_report(run_id, stage, _note(report, files[0]))
    return run_id


def _note(report: Report, main: Path) -> str:
    """The parent run's description (Markdown, shown on the run's page in the MLflow UI)."""
    lines = [f"**bstune study `{report.name}`.** Report: artifact `report/{main.name}` of this run "
             f"(with its plots under `report/`); written to `{main.resolve()}` on {report.created}.", ""]
    if report.rows:
        lines.append(f"Recommendations ({report.rows[0].form} fit):")
        lines += [f"- B={r.batch_size}: lr={_g(r.lr)}, momentum={r.momentum:.3f}" for r in report.rows
                  if r.source == "measured"]
    elif report.rows_error:
        lines.append(f"No recommendation: {report.rows_error}")
    return "\n".join(lines)
