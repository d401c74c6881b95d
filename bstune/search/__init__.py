"""The Optuna side: the search space and its per-batch-size views, the law sampler, the objective that turns
a trial into a training run and records it, the study loop, workers and their claim lock, status, progress.

Everything here runs `bstune.train` and records through `bstune.trials`; Optuna's private API is used only in
`_optuna.py`, and in `_beats.py` (its heartbeat API) and `_journal.py` (its journal storage's internals).

Names are imported on first use (PEP 562): `bstune status` needs `status` and not the trainer, torch or
MLflow, which would cost it ~800 MB and seconds.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "check_batch_sizes": "checks", "check_input": "checks", "validate": "checks", "ClaimLock": "claim",
    "LawSampler": "law_sampler", "ConsoleProgress": "progress", "Progress": "progress",
    "SilentProgress": "progress", "format_summary": "progress", "BatchSizeSampler": "space",
    "Hyperparams": "space", "SearchSpace": "space", "WithinBatchSizePruner": "space", "make_pruner": "space",
    "make_sampler": "space", "StudyStatus": "status", "format_status": "status", "read_status": "status",
    "OpenStudy": "study", "StudyResult": "study", "finish_study": "study", "open_study": "study",
    "run_study": "study", "check_device": "workers", "launch": "workers", "plan_workers": "workers",
    "run_worker": "workers",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
