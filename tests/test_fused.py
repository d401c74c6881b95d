"""Fused trials: K runs of one batch size trained as one stacked model give each run's own numbers."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bstune.spec import Workload
from bstune.train import Dataset, Diverged, EpochStats, TrainConfig, load_dataset, plan, train, train_fused
from bstune.train.loop import lr_factor
from bstune.train.models import build_model
from bstune.train.optimizers import make_optimizer
from bstune.train.stacked import keep_members, member_count, stack_model
from bstune.train.stacked_optim import StackedOptimizer

_DIGITS = load_dataset(Workload(dataset="digits"))

# Tiny models (see conftest.one_thread), and float64: a fused member and its lone run are the same sums done by
# different kernels (batched vs plain matmul, grouped vs plain convolution), whose float32 roundings differ by CPU
# (AVX-512, AVX2 or none: ATEN_CPU_CAPABILITY). Tens of steps of a chaotic run grow a 1e-7 difference to 1e-4;
# from float64's 1e-16 it stays far below the tolerances used here, on any CPU.
pytestmark = pytest.mark.usefixtures("one_thread", "float64")


@pytest.fixture(name="float64")
def _float64() -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _digits(n_train: int, n_val: int = 64) -> Dataset:
    d = _DIGITS
    return replace(d, train_x=d.train_x[:n_train].double(), train_y=d.train_y[:n_train],
                   val_x=d.val_x[:n_val].double(), val_y=d.val_y[:n_val])


def _images(n_train: int, n_val: int = 32, size: int = 8) -> Dataset:
    """Random uint8 RGB images with augmentation on: the CIFAR input path at a tiny size."""
    g = torch.Generator().manual_seed(0)
    xt = torch.randint(0, 256, (n_train, 3, size, size), dtype=torch.uint8, generator=g)
    xv = torch.randint(0, 256, (n_val, 3, size, size), dtype=torch.uint8, generator=g)
    yt, yv = torch.randint(0, 4, (n_train,), generator=g), torch.randint(0, 4, (n_val,), generator=g)
    return Dataset("images", xt, yt, xv, yv, 4, augment=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _members(base: TrainConfig) -> list[TrainConfig]:
    """Three members that differ in lr, momentum and weight decay."""
    return [base, replace(base, lr=base.lr * 2, momentum=0.5, weight_decay=0.0),
            replace(base, lr=base.lr / 2, momentum=0.0, weight_decay=base.weight_decay * 3)]


def _close(a: float | None, b: float | None, rel: float) -> bool:
    return a is b if a is None or b is None else math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)


def _same_run(fused: list[EpochStats], alone: list[EpochStats], rel: float) -> None:
    assert len(fused) == len(alone)
    for f, a in zip(fused, alone, strict=True):
        assert _close(f.train_loss, a.train_loss, rel), (f.epoch, f.train_loss, a.train_loss)
        assert _close(f.val_loss, a.val_loss, rel), (f.epoch, f.val_loss, a.val_loss)
        assert f.train_accuracy == pytest.approx(a.train_accuracy, abs=0.02)
        assert (f.examples_seen, f.optimizer_steps) == (a.examples_seen, a.optimizer_steps)


# With two optimizer steps per epoch, an epoch's training loss is the mean of two steps' losses on batches in
# the run's own order: 25 epochs compare the first 50 steps.
STEP_CASES = {
    "sgd": dict(model="mlp", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3),
    "nesterov": dict(model="mlp", optimizer="nesterov", lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": dict(model="mlp", optimizer="adam", lr=3e-3, momentum=0.9, weight_decay=1e-3),
    "adamw": dict(model="mlp", optimizer="adamw", lr=3e-3, momentum=0.9, weight_decay=1e-2),
    "cnn": dict(model="cnn", optimizer="nesterov", lr=0.05, momentum=0.9, weight_decay=5e-4, width=8,
                accumulation_steps=2, warmup_epochs=2.0, lr_schedule="linear"),
}


@pytest.mark.parametrize("case", STEP_CASES)
def test_each_member_trains_as_its_lone_run_step_by_step(case: str) -> None:
    data = _digits(n_train=32)
    base = TrainConfig(**{"batch_size": 16, "epochs": 25, "width": 32, "diagnostics_every": 4, "check_every": 2,
                          **STEP_CASES[case]})
    configs = _members(base)
    results = train_fused(configs, data)
    for cfg, result in zip(configs, results, strict=True):
        assert result.error is None
        alone = train(cfg, data)
        _same_run(result.history, alone, rel=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_resnet_member_with_augmentation_trains_as_its_lone_run(optimizer: str) -> None:
    data = _images(n_train=32)
    base = TrainConfig(batch_size=16, epochs=3, model="resnet", width=4, optimizer=optimizer,
                       lr=0.05 if optimizer == "sgd" else 3e-3, momentum=0.9, weight_decay=5e-4, check_every=2)
    configs = _members(base)
    for cfg, result in zip(configs, train_fused(configs, data), strict=True):
        _same_run(result.history, train(cfg, data), rel=1e-6)


def test_members_keep_their_own_batch_norm_statistics() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, width=8)
    fused = stack_model(model, 2)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        fused.features[0][0].weight[1].mul_(3.0)  # member 1's first convolution differs
        fused(x)
    bn = fused.features[0][1]
    assert bn.running_var.shape == (2, 8)
    assert not torch.allclose(bn.running_var[0], bn.running_var[1])
    alone = build_model("cnn", (1, 8, 8), 10, width=8)
    alone.load_state_dict(model.state_dict())
    alone(x)
    assert torch.allclose(bn.running_var[0], alone.features[0][1].running_var, rtol=1e-5)


def test_probes_per_member_match_the_lone_runs() -> None:
    data = _digits(n_train=400)
    base = TrainConfig(batch_size=32, lr=0.05, momentum=0.9, epochs=3, width=32, diagnostics_every=2)
    configs = _members(base)
    compared = 0
    for cfg, result in zip(configs, train_fused(configs, data), strict=True):
        for f, a in zip(result.history, train(cfg, data), strict=True):
            if None not in (f.grad_noise_scale, a.grad_noise_scale):  # undefined where its estimate is noise
                assert f.grad_noise_scale == pytest.approx(a.grad_noise_scale, rel=1e-3)
                compared += 1
            assert f.weight_distance == pytest.approx(a.weight_distance, rel=1e-4)
            assert f.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
            assert f.layer_distance.keys() == a.layer_distance.keys() == f.layer_grad_norm.keys()
            assert f.layer_distance == pytest.approx(a.layer_distance, rel=1e-4)
            assert f.layer_grad_norm == pytest.approx(a.layer_grad_norm, rel=1e-4)
            assert (f.grad_histogram is None) == (a.grad_histogram is None)
            if a.grad_histogram is not None:
                fh, ah = f.grad_histogram, a.grad_histogram
                assert fh.keys() == ah.keys() and fh["layers"].keys() == ah["layers"].keys()
                assert sum(fh["counts"]) == sum(ah["counts"])
                moved = sum(abs(x - y) for x, y in zip(fh["counts"], ah["counts"], strict=True))
                assert moved <= 0.002 * sum(ah["counts"])  # values on a bin edge may fall either side
    assert compared >= 3


def _by_hand(cfg: TrainConfig, data: Dataset) -> list[tuple[float, float]]:
    """Each epoch's (train loss, validation loss) of `cfg` trained by hand: the plain model, torch.optim's
    optimizer, batches in the trainer's order (a generator seeded as the run), the lr schedule at every step."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.width)
    opt = make_optimizer(cfg.optimizer, list(model.parameters()), cfg.lr, cfg.momentum, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch, total, epochs = plan(cfg, data.n_train)
    warmup, b, step, out = int(round(cfg.warmup_epochs * per_epoch)), cfg.batch_size, 0, []
    for _ in range(epochs):
        perm, loss_sum = torch.randperm(data.n_train, generator=gen), 0.0
        model.train()
        for i in range(per_epoch):
            idx = perm[i * b:(i + 1) * b]
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, step, total, warmup)
            for part in idx.chunk(cfg.accumulation_steps):
                loss = F.cross_entropy(model(data.train_x[part]), data.train_y[part], reduction="sum")
                (loss / len(idx)).backward()
                loss_sum += float(loss.detach())
            opt.step()
            opt.zero_grad()
            step += 1
        model.eval()
        with torch.no_grad():
            out.append((loss_sum / data.n_train, float(F.cross_entropy(model(data.val_x), data.val_y))))
    return out


@pytest.mark.parametrize("case", STEP_CASES)
def test_a_lone_run_is_the_plain_model_trained_by_torch_optim(case: str) -> None:
    """A lone run is a group of one: the model itself, updated by the stacked optimizer; step by step it is the
    plain model trained by hand with torch.optim."""
    data = _digits(n_train=32)
    cfg = TrainConfig(**{"batch_size": 16, "epochs": 25, "width": 32, "diagnostics_every": 4, "check_every": 2,
                         **STEP_CASES[case]})
    history = train(cfg, data)
    assert len(history) == cfg.epochs
    for s, (train_loss, val_loss) in zip(history, _by_hand(cfg, data), strict=True):
        assert _close(s.train_loss, train_loss, 1e-6), (s.epoch, s.train_loss, train_loss)
        assert _close(s.val_loss, val_loss, 1e-6), (s.epoch, s.val_loss, val_loss)


@pytest.mark.parametrize("bad_lr", [1e4, 1e6])  # explodes by the epoch's end; non-finite at a mid-epoch check
def test_a_diverging_member_leaves_the_others_unchanged(bad_lr: float) -> None:
    data = _digits(n_train=256)
    good = TrainConfig(batch_size=16, lr=0.05, momentum=0.9, epochs=3, width=32, check_every=4)
    bad = replace(good, lr=bad_lr)
    with_bad = train_fused([good, bad, replace(good, lr=0.2)], data)
    without = train_fused([good, replace(good, lr=0.2)], data)
    assert isinstance(with_bad[1].error, Diverged)
    with pytest.raises(Diverged) as alone:
        train(bad, data)
    assert str(with_bad[1].error) == str(alone.value)
    assert (with_bad[1].error.epoch, with_bad[1].error.step) == (alone.value.epoch, alone.value.step)
    assert len(with_bad[1].history) == alone.value.epoch - 1
    for kept, ref in zip([with_bad[0], with_bad[2]], without, strict=True):
        assert kept.error is None
        _same_run(kept.history, ref.history, rel=1e-6)


def _flops(configs: list[TrainConfig], data: Dataset, prune: dict[int, int]) -> tuple[int, list]:
    """Matmul and convolution FLOPs of a fused run in which member i is pruned after epoch prune[i]."""

    def on_epoch(i: int, stats: EpochStats) -> bool:
        return prune.get(i) == stats.epoch  # True: stop member i (the pruner's decision, returned)

    counter = FlopCounterMode(display=False)
    with counter:
        results = train_fused(configs, data, on_epoch=on_epoch)
    return counter.get_total_flops(), results


def test_a_pruned_member_leaves_the_stack_and_stops_costing_compute() -> None:
    data = _digits(n_train=128)
    base = TrainConfig(batch_size=32, lr=0.05, momentum=0.9, epochs=4, width=32)
    configs = _members(base)
    pruned, results = _flops(configs, data, prune={1: 1})
    assert results[1].stopped and results[1].error is None and len(results[1].history) == 1
    assert not results[0].stopped and not results[2].stopped
    assert [len(r.history) for r in results] == [4, 1, 4]
    # The work is linear in the members: three members for one epoch, then two.
    two, _ = _flops([configs[0], configs[2]], data, prune={})
    one_epoch, _ = _flops([configs[1]], data, prune={0: 1})
    assert pruned == two + one_epoch
    full, _ = _flops(configs, data, prune={})
    assert pruned < full


def test_leaving_members_reslices_parameters_buffers_and_optimizer_state() -> None:
    torch.manual_seed(0)
    fused = stack_model(build_model("cnn", (1, 8, 8), 10, width=8), 3)
    params = list(fused.parameters())
    opt = StackedOptimizer("adam", params, [1e-3, 2e-3, 3e-3], [0.9, 0.8, 0.7], [0.0, 0.0, 0.0])
    with torch.no_grad():
        for p in params:
            p[1].add_(1.0)  # tell member 1 apart
    before = [p[1].clone() for p in params]
    keep = torch.tensor([1, 2])
    keep_members(fused, keep)
    opt.keep(keep, list(fused.parameters()))
    assert member_count(fused) == 2
    assert all(p.shape[0] == 2 for p in fused.parameters())
    assert all(torch.equal(p[0], b) for p, b in zip(fused.parameters(), before, strict=True))
    assert fused.features[0][1].running_mean.shape == (2, 8)
    assert opt.lr.flatten().tolist() == pytest.approx([2e-3, 3e-3])
    assert all(t.shape[0] == 2 for ts in opt.state for t in ts)
    out = fused(torch.randn(4, 1, 8, 8))
    assert out.shape == (2, 4, 10)


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_what_on_epoch_raises_propagates(error: type[BaseException]) -> None:
    """A Ctrl-C, or a failure of the caller's own (its store went away), is no member's end: it stops the run."""
    data = _digits(n_train=64)
    cfg = TrainConfig(batch_size=16, lr=0.05, momentum=0.9, epochs=3, width=16)

    def on_epoch(i: int, stats: EpochStats) -> None:
        raise error

    with pytest.raises(error):
        train_fused([cfg, replace(cfg, lr=0.1)], data, on_epoch=on_epoch)
    with pytest.raises(error):
        train(cfg, data, on_epoch=lambda s: on_epoch(0, s))


def test_a_lone_run_stops_where_on_epoch_says() -> None:
    data = _digits(n_train=64)
    cfg = TrainConfig(batch_size=16, lr=0.05, momentum=0.9, epochs=4, width=16)
    history = train(cfg, data, on_epoch=lambda s: s.epoch == 2)
    assert [s.epoch for s in history] == [1, 2]


def test_members_report_in_order_and_share_the_training_time() -> None:
    data = _digits(n_train=256)
    cfg = TrainConfig(batch_size=16, lr=0.05, momentum=0.9, epochs=2, width=16)
    calls = []
    t0 = time.perf_counter()
    results = train_fused([cfg, replace(cfg, lr=0.1), replace(cfg, momentum=0.5)], data,
                          on_epoch=lambda i, s: calls.append((s.epoch, i)))
    wall = time.perf_counter() - t0
    assert calls == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    seconds = [r.history[-1].train_seconds for r in results]
    assert seconds[0] == seconds[1] == seconds[2] > 0
    assert sum(seconds) <= wall


def test_configs_that_differ_beyond_the_update_are_refused() -> None:
    cfg = TrainConfig(batch_size=16, lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match="batch_size"):
        train_fused([cfg, replace(cfg, batch_size=32)], _digits(64))
    with pytest.raises(ValueError, match="seed"):
        train_fused([cfg, replace(cfg, seed=1)], _digits(64))
    with pytest.raises(ValueError, match="at least one"):
        train_fused([], _digits(64))


@pytest.mark.slow
def test_the_fused_checks_hold_with_another_cpu_s_kernels() -> None:
    """The checks above again, with torch's plain kernels instead of this CPU's vector ones (AVX2, AVX-512):
    what they compare must not depend on which kernels a machine picks."""
    env = os.environ | {"ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "not slow"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
