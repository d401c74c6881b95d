"""The trainer: K training runs that differ only in lr, momentum and weight decay, trained as one stacked model;
a lone run (`train`) is a group of one.

Trials of one study at one batch size share the seed, so they share the initial weights, the data order and
the augmentation; only the update differs. `train_fused` builds the standalone model once (after the same
`torch.manual_seed`), stacks it K times (`stacked.stack_model`; a user's model by `func_stacked`; a group of one
is the model itself, its outputs given a member axis of 1), draws batches and augmentation from one generator
seeded by the config, and updates the stacked weights with per-member hyperparameters (`stacked_optim`).
Each member's numbers are then its lone run's, to float tolerance. A group of one trains as fast as the lone
trainer it replaced (benchmarks/FUSED.md, "A lone trial is a group of one").

A member whose loss turns non-finite or explodes, or whose `on_epoch` returns True (a pruner's decision),
leaves the stack: parameters, buffers and optimizer state are re-sliced to the members that go on, so the work
shrinks. Each member is charged its share of the group's time: each epoch's seconds split over the optimizer
steps the members took in it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from bstune import registry
from bstune.train.config import TrainConfig, plan
from bstune.train.data import Dataset
from bstune.train.func_stacked import FuncStacked
from bstune.train.loop import (
    Diverged,
    EpochStats,
    InputPipeline,
    blowup_threshold,
    count_correct,
    device_guard,
    full_precision,
    histogram_epochs,
    lr_factor,
    make_loss,
    noise_window,
    small_on_cpu,
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
    model: nn.Module  # stacked (a group of one: the model itself)
    forward: Callable[..., torch.Tensor]  # inputs -> (K, N, ...) outputs, in training (compiled if asked)
    evaluate: Callable[..., torch.Tensor]  # the same, in evaluation
    params: list[nn.Parameter]
    initial: list[torch.Tensor]  # the shared initial weights, each flattened with a member axis of 1
    opt: StackedOptimizer
    autocast: AbstractContextManager
    gen: torch.Generator  # after initialisation, the run's only randomness: batch order and augmentation
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
    """Move the data to the device, build the (stacked) model and optimizer, and set up the probes."""
    cfg, k, cuda = configs[0], len(configs), device.type == "cuda"
    data = data.to(device)
    per_epoch, total_steps, epochs = plan(cfg, data.n_train)
    inputs = InputPipeline(data, device, channels_last=cuda)
    torch.manual_seed(cfg.seed)  # same initial weights for every trial of a study: fairer comparisons
    alone = build_model(cfg.model, data.input_shape, data.num_classes, cfg.width)
    small_on_cpu(cfg, alone, device)
    model = _stack(cfg, alone, k).to(device)
    if cuda and k == 1:  # a stacked convolution's weights are 5-D, which channels_last refuses
        model = model.to(memory_format=torch.channels_last)
    # reduce-overhead records CUDA graphs: at B = 32 a step is launch-bound, and replaying a graph removes
    # the per-kernel launch cost. A last, smaller batch would record a second graph, so compiled runs drop it.
    forward = model if cfg.compile == "off" else torch.compile(model, mode=cfg.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    layers = Layers([n for n, p in model.named_parameters() if p.requires_grad], device)
    window = noise_window(cfg, per_epoch)
    return _Group(
        cfg=cfg, members=list(range(k)), results=[MemberResult(i) for i in range(k)], device=device, data=data,
        inputs=inputs, model=model, forward=_member_axis(forward, k), evaluate=_member_axis(model, k),
        params=params, initial=[p.detach().reshape(k, -1)[:1].clone() for p in params],
        opt=StackedOptimizer(cfg.optimizer, params, [c.lr for c in configs], [c.momentum for c in configs],
                             [c.weight_decay for c in configs]),
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext(),
        gen=torch.Generator(device=device).manual_seed(cfg.seed), per_epoch=per_epoch, total_steps=total_steps,
        epochs=epochs, warmup=int(round(cfg.warmup_epochs * per_epoch)), layers=layers,
        grad_stats=MemberGradientStats(params, layers),
        noise=[NoiseScale(window, None if inputs.augment else data.n_train) for _ in configs],
        loss=make_loss(cfg), seconds=dict.fromkeys(range(k), 0.0),
    )


def _stack(cfg: TrainConfig, alone: nn.Module, k: int) -> nn.Module:
    """K members of `alone`: the built-ins stacked by hand (faster), any other model by torch.func; one member is
    `alone` itself (so a model that cannot be fused still trains, one trial at a time)."""
    if k == 1:
        return alone
    return (stack_model if registry.is_builtin_model(cfg.model) else FuncStacked)(alone, k)


def _member_axis(forward: Callable[..., torch.Tensor], k: int) -> Callable[..., torch.Tensor]:
    """`forward` with outputs (K, N, ...): a group of one's plain outputs get a member axis of 1."""
    return forward if k > 1 else lambda x: forward(x).unsqueeze(0)


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
    """One pass over a fresh permutation of the training set, stopping early at the run's last step, the members'
    losses and correct predictions summed on the device in `g.loss_sum` / `g.correct`; returns the examples seen.
    Losses are checked for divergence only every `check_every` steps, so the step loop rarely waits for the host."""
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
        # The noise scale costs a second backward pass, so it is measured on every `every`-th step only;
        # the cheap gradient statistics also on each epoch's first step, so that every epoch has them.
        probe = MemberGradientProbe(g.params, g.k, len(idx)) if every > 0 and g.step % every == 0 else None
        _backward_step(g, idx, probe)
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


def _backward_step(g: _Group, idx: torch.Tensor, probe: MemberGradientProbe | None) -> None:
    """Forward and backward of one optimizer step's examples `idx`, in accumulation_steps micro-batches;
    `loss.pieces` gives each member's summed losses of pieces of the batch, (K, N) per example for
    cross-entropy, summed, so each member's gradient is its own. Adds each member's losses and correct
    predictions to `g.loss_sum` and `g.correct` in place."""
    k = g.cfg.accumulation_steps
    for part in idx.chunk(k):
        x = g.inputs(g.data.train_x[part], train=True, generator=g.gen)
        y = g.data.train_y[part]
        with g.autocast:
            out = full_precision(g.forward(x))
            losses = g.loss.pieces(out, y, 2 if probe is not None and k == 1 else 1)
        if probe is None:
            (losses.sum() / len(idx)).backward()
        else:  # without micro-batches, the noise scale needs the gradients of two halves
            probe.backward(losses, parts=2 if k == 1 else 1)
        g.loss_sum += losses.detach().sum(-1)
        g.correct += count_correct(out.detach(), y, g.data.num_classes)


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def _evaluate(g: _Group) -> tuple[list[float], list[float]]:
    """Each member's validation loss and accuracy (NaN when the targets are not classes), in batches that take
    a lone run's evaluation memory, with one host sync at the end."""
    batch = max(1, g.cfg.eval_batch_size // g.k)
    g.model.eval()
    total = torch.zeros(g.k, device=g.device)
    correct = torch.zeros(g.k, device=g.device, dtype=torch.long)
    for i in range(0, g.data.val_x.shape[0], batch):
        x = g.inputs(g.data.val_x[i:i + batch], train=False)
        y = g.data.val_y[i:i + batch]
        with g.autocast:
            out = full_precision(g.evaluate(x))
        total += g.loss.summed(out, y)
        correct += count_correct(out, y, g.data.num_classes)
    n = g.data.val_x.shape[0]
    if not g.data.num_classes:
        return (total / n).tolist(), [math.nan] * g.k
    return (total / n).tolist(), (correct.double() / n).tolist()


def _epoch_stats(g: _Group, epoch: int, train_losses: list[float], seen: int, share: float) -> list[EpochStats]:
    """Each member's numbers for the epoch: validation, the weights' distance from their start, the gradient
    statistics (none when nothing was measured: diagnostics_every = 0)."""
    val_loss, val_acc = _evaluate(g)
    with torch.no_grad():
        moved = [p.reshape(g.k, -1) - p0 for p, p0 in zip(g.params, g.initial, strict=True)]
        moved = g.layers.combine(member_norms(moved, g.k)).tolist()
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
# The group, and a lone run: the above, epoch by epoch


def train(
    cfg: TrainConfig,
    data: Dataset,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[EpochStats], bool | None] | None = None,
) -> list[EpochStats]:
    """One run, trained and evaluated every epoch (a group of one); the epochs trained. `on_epoch(stats)` returns
    True to stop the run after that epoch (a pruner's decision); what it raises propagates. Raises Diverged or
    OutOfMemory."""
    (result,) = train_fused([cfg], data, device, None if on_epoch is None else lambda _, stats: on_epoch(stats))
    if result.error is not None:
        raise result.error
    return result.history


def train_fused(
    configs: Sequence[TrainConfig],
    data: Dataset,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, EpochStats], bool | None] | None = None,
) -> list[MemberResult]:
    """K runs that differ only in lr, momentum and weight_decay, trained as one stacked model (K = 1: a lone run).

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
    blowup = blowup_threshold(data, cfg)
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
