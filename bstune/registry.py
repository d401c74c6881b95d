"""What a spec may name, one registry per kind: data sets, models (with how many trials fuse by default) and
optimizers.

A built-in is registered as an entry point, ``package.module:FUNC``, the same form a user's own model or data
set takes in a spec, and found the same way (`bstune.entry.load`). Spec validation reads the names here;
nothing here imports torch. A new built-in model is one function in a file and one line below.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelEntry:
    """A built-in model: its builder, called with the keywords it names of (input_shape, num_classes, width)."""

    target: str  # package.module:FUNC
    fuse: dict[str, int] = field(default_factory=dict)  # trials trained together by default, by device type
    dense: bool = False  # small dense layers only: one CPU thread is faster than several (loop.device_guard)
    images: bool = False  # needs image input (C, H, W)


# Trials trained together by default, by device: as many as keep the device busy without slowing each member
# (measured in benchmarks/FUSED.md).
MODELS: dict[str, ModelEntry] = {
    "linear": ModelEntry("bstune.train.models:linear", {"cpu": 8, "cuda": 16}, dense=True),
    "mlp": ModelEntry("bstune.train.models:mlp", {"cpu": 8, "cuda": 16}, dense=True),
    "cnn": ModelEntry("bstune.train.models:cnn", {"cpu": 4, "cuda": 16}, images=True),
    "resnet": ModelEntry("bstune.train.models:resnet", {"cpu": 1, "cuda": 8}, images=True),
}

# Built-in data sets: each builder takes the workload and returns a bstune.train.Dataset.
DATASETS: dict[str, str] = {
    "digits": "bstune.train.data:digits",
    "cifar10": "bstune.train.data:cifar10",
    "synthetic": "bstune.train.data:synthetic",
}

# Optimizers: each name's torch.optim builder, the formulas that the trainer's stacked update
# (bstune.train.stacked_optim, which implements each name below) follows and is tested against.
OPTIMIZERS: dict[str, str] = {
    "sgd": "bstune.train.optimizers:sgd",
    "nesterov": "bstune.train.optimizers:nesterov",
    "adam": "bstune.train.optimizers:adam",
    "adamw": "bstune.train.optimizers:adamw",
}

# A model given as an entry point (a user's): trials of one batch size fused by torch.func, this many by default.
USER_MODEL_FUSE = {"cpu": 4, "cuda": 8}


def is_builtin_model(model: object) -> bool:
    return isinstance(model, str) and model in MODELS


def default_fuse(device_type: str, model: object) -> int:
    """How many trials of one batch size train together by default, for the device and the workload's model."""
    fuse = MODELS[model].fuse if is_builtin_model(model) else USER_MODEL_FUSE
    return fuse.get(device_type, fuse.get("cpu", 1))
