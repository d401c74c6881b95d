"""Inside a trial: the gradient noise scale against its exact value, gradient accumulation against a real large
batch, the equal-steps control, and per-layer norms and histograms landing in MLflow. All on real parts."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from bstune.search import run_study
from bstune.spec import SpecError, Workload, load_spec, parse_spec
from bstune.tracking import load_grad_histograms
from bstune.train import (
    HISTOGRAM_EDGES,
    GradientProbe,
    NoiseScale,
    TrainConfig,
    build_model,
    layer_names,
    load_dataset,
    train,
)
from tests.conftest import small_spec, write_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# --------------------------------------------------------------------------------------------------
# The noise-scale estimator against the exact B_simple


def _regression(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    """Known data and a linear model at fixed weights away from the optimum (so |G| is not tiny)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(w + 0.07 * torch.randn(d, generator=g, dtype=torch.float64))
        model.bias.fill_(0.05)
    return x, y, model


def _exact_b_simple(x: torch.Tensor, y: torch.Tensor, model: nn.Linear) -> float:
    """Per-example loss 0.5 (w.x + b - y)^2 has gradient r_i [x_i, 1]: Sigma and G in closed form."""
    with torch.no_grad():
        r = (x @ model.weight[0] + model.bias - y)[:, None]
        per_example = torch.cat([r * x, r], dim=1)
        mean = per_example.mean(0)
        trace = (per_example - mean).pow(2).sum(1).mean()
    return float(trace / mean.pow(2).sum())


def _estimate(x: torch.Tensor, y: torch.Tensor, model: nn.Linear, batch: int, steps: int,
              population: int | None) -> float:
    """Feed the estimator `steps` measured steps at fixed weights, batches drawn without replacement, each step's
    backward split in two halves through one graph exactly as the trainer does it."""
    noise = NoiseScale(window=None, population=population)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=g)[:batch]
        losses = 0.5 * (model(x[idx])[:, 0] - y[idx]).pow(2)
        probe = GradientProbe(params, batch)
        probe.backward(losses, parts=2)
        probe.finish(noise)
        model.zero_grad(set_to_none=True)
    value = noise.value()
    assert value is not None
    return value


@pytest.mark.parametrize("n,batch", [(8192, 256), (600, 256)])
def test_noise_scale_matches_the_exact_value(n: int, batch: int) -> None:
    x, y, model = _regression(n, d=16)
    exact = _exact_b_simple(x, y, model)
    assert 20 < exact < n / 3, "a problem where the estimate is neither trivial nor hopeless"
    estimate = _estimate(x, y, model, batch, steps=600, population=n)
    assert estimate == pytest.approx(exact, rel=0.10)
    if batch / n > 0.2:
        # On a small data set, batches drawn without replacement are less noisy than tr(Sigma)/B: without the
        # finite-population term, |G|^2 comes out tr(Sigma)/N too small and the ratio far too large.
        naive = _estimate(x, y, model, batch, steps=600, population=None)
        assert naive > 1.15 * exact


def test_probe_leaves_the_gradient_of_the_whole_batch() -> None:
    x, y, model = _regression(256, d=8)
    losses = 0.5 * (model(x)[:, 0] - y).pow(2)
    expected = torch.autograd.grad(losses.mean(), list(model.parameters()), retain_graph=True)
    GradientProbe(list(model.parameters()), 256).backward(losses, parts=2)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e)


# --------------------------------------------------------------------------------------------------
# Accumulation, and diagnostics that only observe


def _digits():
    return load_dataset(Workload(dataset="digits"))


def _trajectory(history) -> list[float]:
    """Numbers that depend on the weights after every epoch: losses, accuracy, per-layer distances."""
    out = []
    for s in history:
        out += [s.train_loss, s.val_loss, s.val_accuracy, *s.layer_distance.values()]
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_accumulation_gives_the_update_of_one_large_batch(optimizer: str) -> None:
    data = _digits()
    lr = 0.1 if optimizer == "sgd" else 0.003
    base = TrainConfig(batch_size=128, lr=lr, momentum=0.9, optimizer=optimizer, epochs=2, model="mlp", width=64,
                       diagnostics_every=0)
    one = train(base, data)
    for k in (4, 8):  # B = 128 as 4 micro-batches of 32, or 8 of 16
        accumulated = train(replace(base, accumulation_steps=k), data)
        assert [s.optimizer_steps for s in accumulated] == [s.optimizer_steps for s in one] == [12, 24]
        np.testing.assert_allclose(_trajectory(accumulated), _trajectory(one), rtol=1e-5, atol=1e-7)
    # A single update, compared at the tightest tolerance.
    first = train(replace(base, steps=1), data)
    first_k = train(replace(base, steps=1, accumulation_steps=4), data)
    np.testing.assert_allclose(_trajectory(first_k), _trajectory(first), rtol=1e-6, atol=1e-9)


def test_with_batch_norm_accumulation_is_not_a_large_batch_but_diagnostics_change_nothing() -> None:
    data = _digits()
    base = TrainConfig(batch_size=128, lr=0.05, momentum=0.9, steps=8, model="cnn", width=32, diagnostics_every=0)
    plain = _trajectory(train(base, data))
    # Batch norm normalises each micro-batch on its own: accumulation changes the update.
    accumulated = _trajectory(train(replace(base, accumulation_steps=4), data))
    assert not np.allclose(accumulated, plain, rtol=1e-3)
    # Measuring every step (two half-batch backward passes through one forward) leaves the updates as they were.
    measured = train(replace(base, diagnostics_every=1), data)
    np.testing.assert_allclose(_trajectory(measured), plain, rtol=1e-4, atol=1e-6)
    assert measured[-1].grad_noise_scale is not None and measured[-1].grad_noise_scale > 0


def test_layer_names_stay_few() -> None:
    resnet = [n for n, _ in build_model("resnet", (3, 32, 32), 10, 16).named_parameters()]
    layers = layer_names(resnet)
    assert len(set(layers)) <= 32 and "stage1.res.0.0" in layers and "head" in layers
    coarse = layer_names(resnet, max_layers=6)
    assert set(coarse) == {"stem", "stage1", "stage2", "stage3", "head"}


# --------------------------------------------------------------------------------------------------
# Whole studies: equal steps, and what lands in MLflow


def _trial_runs(spec) -> list:
    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("bstune.kind") == "trial"]


@pytest.mark.slow
def test_equal_steps_control_end_to_end(tmp_path: Path) -> None:
    steps = 50
    spec = load_spec(write_spec(tmp_path, **{
        "workload.hold": "steps", "workload.steps": steps, "workload.grad_histogram_epochs": [],
        "search.pruner": "none", "search.batch_sizes": [16, 64], "budget.trials": 2}))
    result = run_study(spec)
    client = MlflowClient(spec.tracking_uri)
    runs = _trial_runs(spec)
    assert len(runs) == 2 and {r.data.tags["bstune.state"] for r in runs} == {"COMPLETE"}
    by_b = {int(r.data.params["batch_size"]): r for r in runs}
    for b, run in by_b.items():
        assert run.data.metrics["optimizer_steps"] == steps, "every batch size takes the same optimizer steps"
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "optimizer_steps")]
        assert epochs == list(range(1, math.ceil(steps / math.ceil(480 / b)) + 1))
    # 480 training examples: B=16 sees 50 x 16 examples; B=64 (8 steps an epoch, the last of 32) sees
    # 6 epochs of 480 and 2 more steps of 64.
    assert by_b[16].data.metrics["examples_seen"] == 800
    assert by_b[64].data.metrics["examples_seen"] == 6 * 480 + 2 * 64
    assert {r.batch_size: r.examples_seen for r in result.table.records} == {16: 800, 64: 3008}


@pytest.mark.slow
def test_per_layer_norms_histograms_and_gap_land_in_mlflow(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, **{
        "workload.grad_histogram_epochs": [1, "last"], "workload.diagnostics_every": 2,
        "search.pruner": "none", "search.batch_sizes": [16, 128], "budget.trials": 2}))
    run_study(spec)
    client = MlflowClient(spec.tracking_uri)
    runs = _trial_runs(spec)
    layers = ["1", "3", "5"]  # the MLP's three Linear modules
    n_params = sum(p.numel() for p in build_model("mlp", (32,), 4, 32).parameters())
    for run in runs:
        m = run.data.metrics
        assert {f"weight_distance.{k}" for k in layers} | {f"grad_norm.{k}" for k in layers} <= set(m)
        assert len([k for k in m if "." in k]) == 2 * len(layers), "one metric per layer and family, no more"
        assert m["weight_distance"] == pytest.approx(math.sqrt(sum(m[f"weight_distance.{k}"] ** 2 for k in layers)))
        for name in ("grad_norm.1", "weight_distance.5", "grad_noise_scale"):
            history = client.get_metric_history(run.info.run_id, name)
            assert [h.step for h in history] == [1, 2, 3] and all(h.value > 0 for h in history)
        assert m["generalization_gap"] == pytest.approx(m["train_accuracy"] - m["val_accuracy"])
        files = {a.path for a in client.list_artifacts(run.info.run_id, "grad_histograms")}
        assert files == {"grad_histograms/epoch_0001.json", "grad_histograms/epoch_0003.json"}

    hists = load_grad_histograms(spec.tracking_uri, spec.name)
    assert sorted(hists) == [16, 128]
    for b, group in hists.items():
        assert [h.epoch for h in group] == [1, 3]
        for h in group:
            assert h.edges == HISTOGRAM_EDGES, "the same bins for every trial"
            assert h.batch_size == b and h.state == "COMPLETE"
            steps_per_epoch = math.ceil(480 / b)
            assert h.measured_steps == math.ceil(steps_per_epoch / 2)
            assert sum(h.counts) == n_params * h.measured_steps
            assert [sum(c) for c in zip(*h.layers.values(), strict=True)] == list(h.counts)
    last = load_grad_histograms(spec.tracking_uri, spec.name, epoch="last")
    assert {b: [h.epoch for h in g] for b, g in last.items()} == {16: [3], 128: [3]}
    first = load_grad_histograms(spec.tracking_uri, spec.name, epoch=1)
    assert {b: [h.epoch for h in g] for b, g in first.items()} == {16: [1], 128: [1]}
    assert first[16][0].counts == hists[16][0].counts
    assert load_grad_histograms(spec.tracking_uri, spec.name, epoch=2) == {}


@pytest.mark.slow
def test_changing_diagnostics_keeps_a_study_resumable(tmp_path: Path) -> None:
    run_study(load_spec(write_spec(tmp_path, **{"budget.trials": 1, "search.pruner": "none"})))
    again = run_study(load_spec(write_spec(tmp_path, **{
        "budget.trials": 2, "search.pruner": "none", "workload.diagnostics_every": 0,
        "workload.grad_histogram_epochs": []})))
    assert again.trials_run == 1 and again.spent.trials == 2
    assert all(r.grad_noise_scale is None for r in again.table.records if r.number == 1)


def test_grad_histogram_epochs_are_validated(tmp_path: Path) -> None:
    ok = parse_spec(small_spec(tmp_path, **{"workload.grad_histogram_epochs": [2, "last"]}))
    assert ok.workload.grad_histogram_epochs == (2, "last")
    assert ok.to_dict()["workload"]["grad_histogram_epochs"] == [2, "last"]
    for bad, message in (([0], "epoch numbers"), (["first"], "epoch numbers"), ([7], "after the last epoch")):
        with pytest.raises(SpecError, match=f"workload.grad_histogram_epochs: .*{message}"):
            parse_spec(small_spec(tmp_path, **{"workload.grad_histogram_epochs": bad}))



def test_plan_is_what_training_does() -> None:
    from dataclasses import replace

    from bstune.train import TrainConfig, plan, synthetic_classification, train

    data = synthetic_classification(n=300, val_fraction=0.2)
    n = data.n_train
    cfg = TrainConfig(batch_size=64, lr=0.1, momentum=0.9, epochs=3, model="linear")
    assert plan(cfg, n) == (math.ceil(n / 64), 3 * math.ceil(n / 64), 3)
    assert plan(replace(cfg, compile="default"), n)[0] == n // 64  # compiled runs drop the last partial batch
    held = replace(cfg, steps=10)
    per_epoch, total, epochs = plan(held, n)
    history = train(held, data)
    assert (total, len(history), history[-1].optimizer_steps) == (10, epochs, 10)
    assert epochs == math.ceil(10 / per_epoch)
