"""The Optuna side: the search space and its per-batch-size views, the law sampler, the objective that turns
a trial into a training run and records it, the study loop, workers and their claim lock, status, progress.

Everything here runs `bstune.train` and records through `bstune.trials`; Optuna's private API is used only in
`_optuna.py`.
"""

from bstune.search.checks import check_batch_sizes, check_input, validate
from bstune.search.claim import ClaimLock
from bstune.search.law_sampler import LawSampler
from bstune.search.progress import ConsoleProgress, Progress, SilentProgress, format_summary
from bstune.search.space import (
    BatchSizeSampler,
    Hyperparams,
    SearchSpace,
    WithinBatchSizePruner,
    make_pruner,
    make_sampler,
)
from bstune.search.status import StudyStatus, format_status, read_status
from bstune.search.study import OpenStudy, StudyResult, finish_study, open_study, run_study
from bstune.search.workers import check_device, launch, plan_workers, run_worker

__all__ = [
    "BatchSizeSampler", "ClaimLock", "ConsoleProgress", "Hyperparams", "LawSampler", "OpenStudy", "Progress",
    "SearchSpace", "SilentProgress", "StudyResult", "StudyStatus", "WithinBatchSizePruner", "check_batch_sizes",
    "check_device", "check_input", "finish_study", "format_status", "format_summary", "launch", "make_pruner",
    "make_sampler", "open_study", "plan_workers", "read_status", "run_study", "run_worker", "validate",
]
