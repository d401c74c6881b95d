"""A training run's settings from a study's workload: every setting they share is carried over."""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from bstune.spec import Workload
from bstune.train import TrainConfig, synthetic_classification, train, train_config


def _shared() -> list[str]:
    workload = {f.name for f in fields(Workload)}
    return [f.name for f in fields(TrainConfig) if f.name in workload]


def _changed(value: object) -> object:
    """A value of the same kind as `value` but different from it."""
    if value is None:
        return 123
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 3
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, tuple):
        return (*value, 7)
    raise AssertionError(f"no changed value for {value!r}: extend _changed")


def test_train_config_carries_every_workload_field_it_has() -> None:
    shared = _shared()
    assert {"model", "epochs", "lr_schedule", "seed", "diagnostics_every"} <= set(shared)
    w = replace(Workload(hold="steps"), **{name: _changed(getattr(Workload(), name)) for name in shared})
    tc = train_config(w, batch_size=64, lr=0.3, momentum=0.9)
    for name in shared:
        assert getattr(tc, name) == getattr(w, name), name
        assert getattr(tc, name) != getattr(TrainConfig(1, 1.0, 0.0), name), f"{name}: the default, not the workload's"
    assert (tc.batch_size, tc.lr, tc.momentum) == (64, 0.3, 0.9)


def test_train_config_steps_only_when_held_and_seed_replaced() -> None:
    w = Workload(hold="epochs", steps=500, seed=3)
    assert train_config(w, 32, 0.1, 0.0).steps is None
    assert train_config(replace(w, hold="steps"), 32, 0.1, 0.0).steps == 500
    assert train_config(w, 32, 0.1, 0.0).seed == 3
    assert train_config(w, 32, 0.1, 0.0, seed=11).seed == 11


def test_cpu_runs_flush_denormals_and_restore_the_default() -> None:
    tiny = torch.tensor([1e-39])  # below float32's smallest normal number
    seen = []
    cfg = TrainConfig(batch_size=64, lr=0.1, momentum=0.9, epochs=1, width=8)
    train(cfg, synthetic_classification(n=200), on_epoch=lambda s: seen.append(float(tiny * 1.0)))
    assert seen == [0.0]
    assert float(tiny * 1.0) > 0
