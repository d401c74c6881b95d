"""Writing a report: one self-contained HTML file (plots embedded as data URIs), Markdown with the PNG plots
beside it, or JSON; and publishing it under ``report/`` in the study's MLflow parent run."""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from bstune.analysis import LEVEL
from bstune.errors import BstuneError, write_output
from bstune.report.build import Report, build_report
from bstune.report.text import (
    Section,
    answer_lines,
    answer_section,
    cell,
    critical_section,
    duration,
    law_sections,
    octaves,
    optimum_section,
    steps_section,
)
from bstune.trials import TrialTable

FORMATS = ("html", "md", "json")
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
    path = out / f"report.{fmt}"
    files = [path]
    if fmt == "html":
        write_output(path, to_html(report))
        return files
    # Markdown and JSON name their plots as PNG files beside them.
    for stem, data in report.plots.items():
        write_output(out / f"{stem}.png", data)
        files.append(out / f"{stem}.png")
    write_output(path, to_markdown(report) if fmt == "md" else json.dumps(report.to_dict(), indent=2) + "\n")
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


def _sections(report: Report) -> list[Section]:
    """Every tabular section, in the report's order."""
    a = report.analysis
    return [*answer_section(a), *_budget_sections(report), _recommendation_section(report),
            *law_sections(a, report.law),
            *critical_section(a), *_rules_section(report), optimum_section(a), *steps_section(a)]


def _budget_sections(report: Report) -> list[Section]:
    s = report.spent
    lim = s["limits"]
    spent = [["trials", cell(s["trials"]), cell(lim.get("trials"))],
             ["examples", f"{s['examples']:,}", cell(lim.get("examples"))],
             ["training seconds", f"{s['seconds']:.1f}", cell(lim.get("seconds"))]]
    per = [[str(b), str(v["trials"]), ", ".join(f"{k.lower()} {n}" for k, n in sorted(v["states"].items())),
            f"{v['examples']:,}", f"{v['seconds']:.1f}"] for b, v in s["per_batch_size"].items()]
    return [("Budget spent", "", (["", "spent", "limit"], spent)),
            ("Trials per batch size", "", (["B", "trials", "ended", "examples", "training s"], per))]


def _recommendation_section(report: Report) -> Section:
    a = report.analysis
    if not report.rows:
        return ("Recommendations", f"No recommendation: {report.rows_error}", None)
    target = "" if a.steps is None else (f"; steps, examples and wall time are to reach {a.metric} "
                                         f"{'<=' if a.direction == 'minimize' else '>='} {a.steps.target:.4g}")
    what = "effective lr lr/(1 - m)" if a.basis == "effective" else "lr"
    form = a.fits_for()[1]
    law = f"elsewhere from the {form} fit of the {what}" if form else "no fit of lr*(B) for the others"
    head = (f"At a measured batch size its own fitted optimum (where bracketed), {law}; "
            f"expected {a.metric} at the end of the study's "
            f"training budget (the fitted optimum, interpolated between measured batch sizes){target}. "
            "Wall time uses the examples per second the trials reached at each batch size.")
    rows = [[str(r.batch_size), r.source + (", extrapolated" if r.extrapolated else ""), cell(r.lr),
             f"{cell(r.lr_interval[0])} to {cell(r.lr_interval[1])}", f"{r.momentum:.3f}", cell(r.effective_lr),
             cell(r.expected_value), cell(r.steps, ".0f"), cell(r.examples, ",.0f"),
             cell(r.examples_per_second, ",.0f"), duration(r.seconds), "above critical B" if r.above_critical else ""]
            for r in report.rows]
    return ("Recommendations", head, (
        ["B", "source", "lr", f"lr {LEVEL:.0%} interval", "momentum", "effective lr", f"expected {a.metric}",
         "steps to target", "examples to target", "examples/s", "wall time to target", "note"], rows))


def _rules_section(report: Report) -> list[Section]:
    if not report.rows:
        return []
    return [("Preferred law vs the linear and square-root rules",
             "lr each fitted form gives at the recommended momentum; octaves = log2(rule / preferred).",
             (["B", "preferred lr", "linear rule lr", "octaves", "sqrt rule lr", "octaves"],
              [[str(r.batch_size), cell(r.lr), cell(r.linear_rule_lr), octaves(r.linear_rule_lr, r.lr),
                cell(r.sqrt_rule_lr), octaves(r.sqrt_rule_lr, r.lr)] for r in report.rows]))]


def _md_table(heads: list[str], rows: list[list[str]]) -> list[str]:
    def escape(c: str) -> str:
        return c.replace("|", "\\|")

    return (["| " + " | ".join(escape(h) for h in heads) + " |", "|" + "---|" * len(heads)]
            + ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows])


def _md_warnings(report: Report) -> list[str]:
    if not report.analysis.warnings:
        return []
    return ["## Warnings", ""] + [f"- {w}" for w in report.analysis.warnings] + [""]


def _spec_yaml(report: Report) -> str:
    spec = report.table.meta.get("spec")
    return yaml.safe_dump(spec, sort_keys=False) if spec else "(no spec: the table was not read from a study)\n"


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
        tracker.attach_report(run_id, stage, _run_description(report, files[0]))
    return run_id


def _run_description(report: Report, main: Path) -> str:
    """The parent run's description (Markdown, shown on the run's page in the MLflow UI)."""
    lines = [f"**bstune study `{report.name}`.** Report: artifact `report/{main.name}` of this run "
             f"(with its plots under `report/`); written to `{main.resolve()}` on {report.created}.", ""]
    lines += [f"- {line}" for line in answer_lines(report.analysis, trend=False)] + [""]
    if report.rows:
        lines.append("Recommendations:")
        lines += [f"- B={r.batch_size}: lr={cell(r.lr)}, momentum={r.momentum:.3f}" for r in report.rows
                  if r.source == "measured"]
    elif report.rows_error:
        lines.append(f"No recommendation: {report.rows_error}")
    return "\n".join(lines)
