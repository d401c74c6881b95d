"""K training runs that differ only in lr, momentum and weight decay, trained as one stacked model.

Trials of one study at one batch size share the seed, so they share the initial weights, the data order and
the augmentation; only the update differs. `train_fused` builds the standalone model once (after the same
`torch.manual_seed`), stacks it K times (`stacked.stack_model`), draws batches and augmentation from one
generator seeded as `train`'s, and updates the stacked weights with per-member hyperparameters
(`stacked_optim`). Each member's numbers are then `train`'s for its config, to float tolerance.

A member whose loss turns non-finite or explodes (`train`'s checks), or whose `on_epoch` returns True (a
pruner's decision), leaves the stack: parameters, buffers and optimizer state are re-sliced to the members
that go on, so the work shrinks. Each member is charged its share of the group's time: each epoch's seconds
split over the optimizer steps the members took in it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from bstune import registry
from bstune.train.config import TrainConfig
from bstune.train.data import Dataset
from bstune.train.func_stacked import FuncStacked
from bstune.train.loop import (
    Diverged,
    EpochStats,
    InputPipeline,
    backward_step,
    blowup_threshold,
    device_guard,
    histogram_epochs,
    lr_factor,
    make_loss,
    new_noise_scale,
    shared_setup,
    small_on_cpu,
    summed_over_val,
)
from bstune.train.models import build_model
from bstune.train.probes import Layers, NoiseScale
from bstune.train.stacked import keep_members, stack_model
from bstune.train.stacked_optim import StackedOptimizer
from bstune.train.stacked_probes import MemberGradientProbe, MemberGradientStats, member_grad_norms, member_norms
from bstune.train.user import Loss

PER_MEMBER = ("lr", "momentum", "weight_decay")  # the only fields in which fused configs may differ


@dataclass
class MemberResult:
    """One member's run: its epochs, and why it stopped early, if it did."""

    index: int  # position in `configs`
    history: list[EpochStats] = field(default_factory=list)  # one per epoch it completed
    error: BaseException | None = None  # Diverged, or None: trained every epoch, or stopped
    stopped: bool = False  # on_epoch returned True: stopped after its last epoch


def check_fusable(configs: Sequence[TrainConfig]) -> TrainConfig:
    """The settings the configs share; ValueError naming the first field they disagree on."""
    if not configs:
        raise ValueError("train_fused needs at least one config")
    first = configs[0]
    for f in fields(TrainConfig):
        if f.name in PER_MEMBER:
            continue
        for other in configs[1:]:
            if getattr(other, f.name) != getattr(first, f.name):
                raise ValueError(f"fused configs must agree on {f.name}: {getattr(first, f.name)!r} "
                                 f"vs {getattr(other, f.name)!r} (only {', '.join(PER_MEMBER)} may differ)")
    return first


@dataclass
class _Group:
    """What the members' steps share, and how far they have got."""

    cfg: TrainConfig  # the shared settings
    members: list[int]  # indices into configs of the members still in the stack, in order
    results: list[MemberResult]
    device: torch.device
    data: Dataset  # on the device
    inputs: InputPipeline
    model: nn.Module  # stacked
    forward: Callable[..., torch.Tensor]
    params: list[nn.Parameter]
    initial: list[torch.Tensor]  # the shared initial weights, with a member axis of 1
    opt: StackedOptimizer
    autocast: AbstractContextManager
    gen: torch.Generator  # batch order and augmentation, as a lone run's
    per_epoch: int
    total_steps: int
    epochs: int
    warmup: int
    layers: Layers
    grad_stats: MemberGradientStats
    noise: list[NoiseScale]  # per member in the stack
    loss: Loss
    seconds: dict[int, float]  # each member's share of the training time so far
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # this epoch's, per member
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    member_steps: int = 0  # this epoch's optimizer steps summed over the members taking them
    step: int = 0
    examples: int = 0

    @property
    def k(self) -> int:
        return len(self.members)


def _start(configs: Sequence[TrainConfig], data: Dataset, device: torch.device) -> _Group:
    """Move the data to the device, build the stacked model and optimizer, set up the probes (as a lone run's:
    `loop.shared_setup`)."""
    cfg = configs[0]
    shared = shared_setup(cfg, data, device)
    torch.manual_seed(cfg.seed)  # the initial weights of a lone run with this seed
    alone = build_model(cfg.model, data.input_shape, data.num_classes, cfg.width)
    small_on_cpu(cfg, alone, device)
    # the built-ins stack by hand (faster); any other model by torch.func
    stacked = stack_model if registry.is_builtin_model(cfg.model) else FuncStacked
    model = stacked(alone, len(configs)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    layers = Layers([n for n, p in model.named_parameters() if p.requires_grad], device)
    return _Group(
        cfg=cfg, members=list(range(len(configs))), results=[MemberResult(i) for i in range(len(configs))],
        model=model, forward=model if cfg.compile == "off" else torch.compile(model, mode=cfg.compile),
        params=params, initial=[p.detach()[:1].clone() for p in params],
        opt=StackedOptimizer(cfg.optimizer, params, [c.lr for c in configs], [c.momentum for c in configs],
                             [c.weight_decay for c in configs]),
        layers=layers, grad_stats=MemberGradientStats(params, layers),
        noise=[new_noise_scale(cfg, shared) for _ in configs], loss=make_loss(cfg, fused=True),
        seconds=dict.fromkeys(range(len(configs)), 0.0), **shared,
    )


def _leave(g: _Group, errors: dict[int, BaseException | None]) -> None:
    """Members at stack positions `errors` leave with those errors (None: stopped by on_epoch); the stack is
    re-sliced to the rest."""
    if not errors:
        return
    for j, e in errors.items():
        g.results[g.members[j]].error = e
        g.results[g.members[j]].stopped = e is None
    stay = [j for j in range(g.k) if j not in errors]
    g.members = [g.members[j] for j in stay]
    if not stay:
        return
    keep = torch.tensor(stay, device=g.device)
    keep_members(g.model, keep)
    g.params = [p for p in g.model.parameters() if p.requires_grad]
    g.opt.keep(keep, g.params)
    g.grad_stats.keep(keep, g.params)
    g.noise = [g.noise[j] for j in stay]
    g.loss_sum, g.correct = g.loss_sum.index_select(0, keep), g.correct.index_select(0, keep)


# --------------------------------------------------------------------------------------------------
# The step loop


def _train_epoch(g: _Group, epoch: int, histogram: bool) -> int:
    """One pass over a fresh permutation of the training set (as `loop._train_epoch`), the members' losses and
    correct predictions summed in `g.loss_sum` / `g.correct`; returns the examples seen."""
    cfg, b, every = g.cfg, g.cfg.batch_size, g.cfg.diagnostics_every
    g.model.train()
    perm = torch.randperm(g.data.n_train, device=g.device, generator=g.gen)
    g.loss_sum = torch.zeros(g.k, device=g.device)
    g.correct = torch.zeros(g.k, device=g.device, dtype=torch.long)
    g.member_steps = 0
    seen = 0
    g.grad_stats.start_epoch(g.k, histogram=histogram)
    for i in range(g.per_epoch):
        if g.step >= g.total_steps or not g.members:
            break
        idx = perm[i * b:(i + 1) * b]
        probe = MemberGradientProbe(g.params, g.k, len(idx)) if every > 0 and g.step % every == 0 else None
        backward_step(g, idx, probe, g.loss, g.loss_sum, g.correct)
        if every > 0 and (probe is not None or i == 0):
            g.grad_stats.add(probe.finish(g.noise) if probe is not None else member_grad_norms(g.params, g.k))
        g.opt.step(lr_factor(cfg.lr_schedule, g.step, g.total_steps, g.warmup))
        for p in g.params:
            p.grad = None
        seen += len(idx)
        g.step += 1
        g.member_steps += g.k
        if g.step % cfg.check_every == 0:
            finite = torch.isfinite(g.loss_sum).tolist()  # the step loop's only sync
            _leave(g, {j: Diverged(epoch, g.step, "became non-finite") for j, ok in enumerate(finite) if not ok})
    return seen


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_members(model: nn.Module, data: Dataset, inputs: InputPipeline, batch_size: int,
                     autocast: AbstractContextManager, loss: Loss) -> tuple[list[float], list[float]]:
    """Each member's validation loss and accuracy (NaN when the targets are not classes), in batches of
    `batch_size` examples per member."""
    total, correct = summed_over_val(model, data, inputs, batch_size, autocast, loss.summed)
    n = data.val_x.shape[0]
    if not data.num_classes:
        return (total / n).tolist(), [math.nan] * len(total)
    return (total / n).tolist(), (correct.double() / n).tolist()


def _epoch_stats(g: _Group, epoch: int, train_losses: list[float], seen: int, share: float) -> list[EpochStats]:
    """Each member's numbers for the epoch, as `loop._epoch_stats` gives a lone run's."""
    eval_batch = max(1, g.cfg.eval_batch_size // g.k)  # the memory of a lone run's evaluation
    val_loss, val_acc = evaluate_members(g.model, g.data, g.inputs, eval_batch, g.autocast, g.loss)
    with torch.no_grad():
        moved = g.layers.combine(member_norms([p - p0 for p, p0 in zip(g.params, g.initial, strict=True)],
                                              g.k)).tolist()
    grads = g.grad_stats.end_epoch(g.k)
    correct = g.correct.tolist()
    out = []
    for j, m in enumerate(g.members):
        layer = dict(zip(g.layers.names, moved[j], strict=True))
        if grads[j].histogram is not None:
            grads[j].histogram.update(epoch=epoch, batch_size=g.cfg.batch_size)
        out.append(EpochStats(
            epoch=epoch, train_loss=train_losses[j],
            train_accuracy=correct[j] / max(seen, 1) if g.data.num_classes else math.nan,
            val_loss=val_loss[j], val_accuracy=val_acc[j], examples_seen=g.examples, optimizer_steps=g.step,
            train_seconds=g.seconds[m], examples_per_second=seen / share if share > 0 else 0.0,
            weight_distance=math.sqrt(sum(v * v for v in layer.values())), grad_noise_scale=g.noise[j].value(),
            layer_distance=layer, grad_norm=grads[j].grad_norm, layer_grad_norm=grads[j].layer_norms,
            grad_histogram=grads[j].histogram,
        ))
    return out


# --------------------------------------------------------------------------------------------------
# The group: the above, epoch by epoch


def train_fused(
    configs: Sequence[TrainConfig],
    data: Dataset,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, EpochStats], bool | None] | None = None,
) -> list[MemberResult]:
    """K runs that differ only in lr, momentum and weight_decay, trained as one stacked model.

    `on_epoch(i, stats)` is called after each epoch for each member i still training, in member order; True
    from it stops member i there (`stopped`); what it raises propagates. Members that diverge leave with
    Diverged; the others go on unchanged. Raises OutOfMemory for the whole group."""
    cfg = check_fusable(configs)
    if cfg.batch_size % cfg.accumulation_steps:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by accumulation_steps "
                         f"{cfg.accumulation_steps}")
    device = torch.device(device)
    with device_guard(cfg, device):
        return _train_fused(configs, data, device, on_epoch)


def _train_fused(configs: Sequence[TrainConfig], data: Dataset, device: torch.device,
                 on_epoch: Callable[[int, EpochStats], bool | None] | None) -> list[MemberResult]:
    g = _start(configs, data, device)
    cfg = g.cfg
    blowup = blowup_threshold(data, cfg)  # as `train`
    histograms = histogram_epochs(cfg, g.epochs)
    for epoch in range(1, g.epochs + 1):
        if not g.members:
            break
        t0, first_step = time.perf_counter(), g.step
        seen = _train_epoch(g, epoch, cfg.diagnostics_every > 0 and epoch in histograms)
        if not g.members:
            break
        losses = (g.loss_sum / max(seen, 1)).tolist()  # the epoch's one host sync outside the checks
        if device.type == "cuda":
            torch.cuda.synchronize()
        # Each member that took every step of the epoch is charged its share of the epoch's time.
        share = (time.perf_counter() - t0) * (g.step - first_step) / max(g.member_steps, 1)
        g.examples += seen
        for m in g.members:
            g.seconds[m] += share
        _leave(g, {j: Diverged(epoch, g.step, "became non-finite") if not math.isfinite(v)
                   else Diverged(epoch, g.step, f"exploded to {v:.3g}")
                   for j, v in enumerate(losses) if not (math.isfinite(v) and v <= blowup)})
        if not g.members:
            break
        losses = [v for v in losses if math.isfinite(v) and v <= blowup]
        _finish_epoch(g, epoch, _epoch_stats(g, epoch, losses, seen, share), on_epoch)
    return g.results


def _finish_epoch(g: _Group, epoch: int, stats: list[EpochStats],
                  on_epoch: Callable[[int, EpochStats], bool | None] | None) -> None:
    """Record each member's epoch and report it; members with a non-finite validation loss, or that on_epoch
    stops, leave."""
    errors: dict[int, BaseException | None] = {}
    for j, (m, s) in enumerate(zip(g.members, stats, strict=True)):
        if not math.isfinite(s.val_loss):
            errors[j] = Diverged(epoch, g.step, "is non-finite on the validation set")
            continue
        g.results[m].history.append(s)
        if on_epoch is not None and on_epoch(m, s):
            errors[j] = None
    _leave(g, errors)
