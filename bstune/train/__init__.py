"""One training run, from data and model to per-epoch numbers and the in-trial probes.

Import from here; the modules behind it are its parts, in data-flow order:

- `data`: data sets as in-memory tensors (digits, CIFAR-10, synthetic).
- `models`: the models a workload names.
- `config`: a run's settings (`TrainConfig`, built from a workload by `train_config`) and its length (`plan`).
- `probes`: what is measured inside a run beyond its loss (noise scale, per-layer norms, gradient histograms).
- `loop`: the trainer's parts (what a run returns, the input pipeline, the lr schedule, a run's constants).
- `fused`: the trainer, `train_fused`: K runs differing only in lr, momentum and weight decay trained as one
  stacked model, handing each member's epochs to a callback; `train` is a group of one (`stacked`,
  `func_stacked`: the stacked modules; `stacked_optim`: their optimizers; `stacked_probes`: per-member probes).

Nothing here imports Optuna or MLflow: the study drives `train_fused` and records what it returns.
"""

from bstune.train.config import TrainConfig, plan, steps_per_epoch, train_config
from bstune.train.data import (
    CIFAR10_DIR,
    CIFAR10_TRAIN,
    Dataset,
    load_cifar10,
    load_dataset,
    needs_download,
    synthetic_classification,
)
from bstune.train.fused import MemberResult, train, train_fused
from bstune.train.loop import Diverged, EpochStats, OutOfMemory, augment_images, pick_device, preload_compiler
from bstune.train.models import build_model
from bstune.train.probes import HISTOGRAM_EDGES, GradientProbe, NoiseScale, layer_names

__all__ = [
    "CIFAR10_DIR",
    "CIFAR10_TRAIN",
    "HISTOGRAM_EDGES",
    "Dataset",
    "Diverged",
    "EpochStats",
    "GradientProbe",
    "MemberResult",
    "NoiseScale",
    "OutOfMemory",
    "TrainConfig",
    "augment_images",
    "build_model",
    "layer_names",
    "load_cifar10",
    "load_dataset",
    "needs_download",
    "pick_device",
    "preload_compiler",
    "plan",
    "steps_per_epoch",
    "synthetic_classification",
    "train",
    "train_fused",
    "train_config",
]
