"""bstune from Python (a notebook, a script): a study from a spec dict, object or file, whose model, data set,
loss or trainer may be Python callables rather than files; and its analysis.

    import bstune
    spec = {"name": "mine", "workload": {"model": make_model, "dataset": make_data},
            "search": {"batch_sizes": [16, 64]}, "budget": {"trials": 12}}
    result = bstune.run_study(spec)
    analysis = bstune.analyze_study(spec)

A study with callables runs in this process (workers started by `bstune worker` need entry points in files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bstune.analysis import Analysis, analyze
from bstune.search import run_study as _run_study
from bstune.search.progress import ConsoleProgress, SilentProgress
from bstune.search.study import StudyResult
from bstune.spec import StudySpec, load_spec, parse_spec
from bstune.stores import load_table


def as_spec(spec: StudySpec | dict[str, Any] | str | Path) -> StudySpec:
    """A validated StudySpec from a spec object, a dict (as the YAML file would hold, values may be callables)
    or a spec file's path. Raises bstune.errors.BstuneError naming the first bad field."""
    if isinstance(spec, StudySpec):
        return spec
    if isinstance(spec, str | Path):
        return load_spec(spec)
    return parse_spec(spec, source="<python>")


def run_study(spec: StudySpec | dict[str, Any] | str | Path, *, device: str | None = None,
              quiet: bool = True) -> StudyResult:
    """Run (or resume) the study until its budget is spent, as `bstune study` does; `quiet=False` shows each
    trial as the command line does. The result carries the trial table and what was spent."""
    s = as_spec(spec)
    progress = SilentProgress() if quiet else ConsoleProgress(s.search.objective, budget=s.budget)
    return _run_study(s, device=device, progress=progress)


def analyze_study(spec: StudySpec | dict[str, Any] | str | Path, **options: Any) -> Analysis:
    """The study's analysis, as `bstune analyze` prints it: lr* at each batch size, the fits of lr*(B)."""
    s = as_spec(spec)
    return analyze(load_table(s.storage, s.name, source=s.source), **options)
