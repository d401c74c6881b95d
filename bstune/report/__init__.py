"""A study's report: what was run and spent, what to use at each batch size, the fitted law, and plots.

``build_report(table)`` analyses a TrialTable and gathers every number of the report (``build``), with its
plots (``plots``); ``write_report`` writes it as one self-contained HTML file, as Markdown with the PNG plots
beside it, or as JSON (``render``; ``make_report`` does both); ``publish`` logs it under ``report/`` in the
study's MLflow parent run. ``text`` is the one place the analysis is put into words: the terminal table of
``bstune analyze`` (``format_analysis``), which batch size to use (``answer_lines``), a recommendation
(``format_recommendation``), and the report's
sections about the analysis.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bstune.report.build import Report, Row, build_report, report_batch_sizes
    from bstune.report.render import FORMATS, make_report, publish, to_html, to_markdown, write_report
    from bstune.report.text import answer_lines, format_analysis, format_recommendation

# Loaded on first use: the plots bring matplotlib (a second of start-up), which a study's closing answer
# (answer_lines) does not need.
_HOME = {"Report": "build", "Row": "build", "build_report": "build", "report_batch_sizes": "build",
         "FORMATS": "render", "make_report": "render", "publish": "render", "to_html": "render",
         "to_markdown": "render", "write_report": "render",
         "answer_lines": "text", "format_analysis": "text", "format_recommendation": "text"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'bstune.report' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bstune.report.{_HOME[name]}"), name)


__all__ = [
    "FORMATS",
    "Report",
    "Row",
    "answer_lines",
    "build_report",
    "format_analysis",
    "format_recommendation",
    "make_report",
    "publish",
    "report_batch_sizes",
    "to_html",
    "to_markdown",
    "write_report",
]
