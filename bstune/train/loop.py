"""One training run: a model, a batch size, a learning rate and a momentum, trained and scored every epoch.

The loop follows the fast CIFAR trainers: the data set lives on the device, each epoch is a random
permutation sliced into batches, augmentation happens on the device, and the step loop never waits for the
host: losses are summed on the device and checked for divergence only every `check_every` steps.
Nothing here knows about Optuna or MLflow; the caller gets each epoch's numbers through `on_epoch`, which
returns whether the run stops there (a pruner's decision, say).

Sections, in the order the data flows: what a run returns; data on the device and augmentation; the model;
the optimizer and its schedule; the step loop; evaluation; and `train`, which runs them epoch by epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch._dynamo  # noqa: F401 - see below
import torch.nn.functional as F
from torch import nn

from bstune import entry, registry
from bstune.train.config import TrainConfig, plan
from bstune.train.data import Dataset
from bstune.train.models import build_model
from bstune.train.optimizers import make_optimizer
from bstune.train.probes import GradientProbe, GradientStats, Layers, NoiseScale, param_norms
from bstune.train.user import Loss

# torch.optim imports torch._dynamo (a second or two) when the first optimizer is built; importing it above
# keeps that out of the first trial. A Ctrl-C landing in that import, inside a namedtuple's eval(), makes a
# `python -m bstune.cli` process exit by SIGINT after handling it, not with code 130 (a CPython quirk).


# --------------------------------------------------------------------------------------------------
# What a run returns, and how it can fail


@dataclass
class EpochStats:
    """One epoch's numbers, as `train` hands them to `on_epoch` and returns them."""

    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    examples_seen: int
    optimizer_steps: int
    train_seconds: float  # cumulative training time (no evaluation)
    examples_per_second: float  # this epoch
    weight_distance: float  # L2 distance of the weights from their initial values
    grad_noise_scale: float | None = None  # B_simple = tr(Sigma) / |G|^2, averaged over about the last epoch
    layer_distance: dict[str, float] = field(default_factory=dict)  # per layer (module), see probes.Layers
    grad_norm: float | None = None  # whole-model gradient norm, mean over this epoch's measured steps
    layer_grad_norm: dict[str, float] = field(default_factory=dict)  # the same per layer
    grad_histogram: dict | None = None  # raw gradient values on probes.HISTOGRAM_EDGES (histogram epochs)

    @property
    def generalization_gap(self) -> float:
        """Train accuracy (running, over the epoch's steps) minus validation accuracy."""
        return self.train_accuracy - self.val_accuracy

    def layer_metrics(self) -> dict[str, float]:
        """Per-layer numbers as flat metric names: weight_distance.<layer>, grad_norm.<layer>."""
        out = {f"weight_distance.{k}": v for k, v in self.layer_distance.items()}
        out.update({f"grad_norm.{k}": v for k, v in self.layer_grad_norm.items()})
        return out


class Diverged(Exception):
    """The loss became NaN/inf or exploded. Carries where it happened."""

    def __init__(self, epoch: int, step: int, detail: str) -> None:
        super().__init__(f"loss {detail} at epoch {epoch}, optimizer step {step}")
        self.epoch = epoch
        self.step = step


class OutOfMemory(Exception):
    """The device ran out of memory for this batch size."""


# --------------------------------------------------------------------------------------------------
# Data on the device, and augmentation


def pick_device(requested: str | None = None) -> torch.device:
    """The device asked for; None or "auto": CUDA if there is one, else the CPU."""
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def augment_images(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with reflect padding and random horizontal flip, per example, all on x's device."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (n, 1, 1, w)
    out = xp.gather(2, rows.expand(n, xp.shape[1], h, xp.shape[3]))
    out = out.gather(3, cols.expand(n, xp.shape[1], h, w))
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


class InputPipeline:
    """Turns stored examples into model inputs on the device: uint8 -> normalised float, augmentation."""

    def __init__(self, data: Dataset, device: torch.device, channels_last: bool) -> None:
        self.device = device
        self.channels_last = channels_last
        self.augment = data.augment and data.train_x.dim() == 4
        self.pad = max(1, data.train_x.shape[-1] // 8) if self.augment else 0
        if data.mean is not None:
            c = len(data.mean)
            self.mean = torch.tensor(data.mean, device=device).view(1, c, 1, 1) * 255
            self.std = torch.tensor(data.std, device=device).view(1, c, 1, 1) * 255
        else:
            self.mean = self.std = None

    def __call__(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Model inputs from stored examples `x`; `train` augments them, drawing from `generator`."""
        if self.mean is not None:
            x = (x.to(self.mean.dtype) - self.mean) / self.std
        if train and self.augment:
            x = augment_images(x, self.pad, generator)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


# --------------------------------------------------------------------------------------------------
# The model


def _model(cfg: TrainConfig, data: Dataset, device: torch.device) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """The model, and the callable that runs it forward (the model itself, or it compiled)."""
    torch.manual_seed(cfg.seed)  # same initial weights for every trial of a study: fairer comparisons
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # reduce-overhead records CUDA graphs: at B = 32 a step is launch-bound, and replaying a graph removes
    # the per-kernel launch cost. A last, smaller batch would record a second graph, so compiled runs drop it.
    forward = model if cfg.compile == "off" else torch.compile(model, mode=cfg.compile)
    return model, forward


# --------------------------------------------------------------------------------------------------
# The optimizer and its schedule


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier on the base lr at optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    if schedule == "linear":
        return max(0.0, 1.0 - t)
    return 1.0


# --------------------------------------------------------------------------------------------------
# The step loop


@dataclass
class _Run:
    """What one run's steps share, and how far it has got."""

    cfg: TrainConfig
    device: torch.device
    data: Dataset  # on the device
    inputs: InputPipeline
    model: nn.Module
    forward: Callable[..., torch.Tensor]
    params: list[nn.Parameter]
    initial: list[torch.Tensor]  # the weights at the start, for the distance travelled
    opt: torch.optim.Optimizer
    autocast: AbstractContextManager
    gen: torch.Generator  # after initialisation, the run's only randomness: batch order and augmentation
    per_epoch: int  # optimizer steps
    total_steps: int
    epochs: int
    warmup: int  # optimizer steps
    layers: Layers
    grad_stats: GradientStats
    noise: NoiseScale
    loss: Loss
    step: int = 0  # optimizer steps taken
    examples: int = 0  # examples trained on
    train_seconds: float = 0.0  # without evaluation


def shared_setup(cfg: TrainConfig, data: Dataset, device: torch.device) -> dict[str, Any]:
    """What a lone run and a fused group set up alike: the data on the device and its input pipeline, autocast,
    the generator of batch order and augmentation (seeded as every trial of the study), and the run's length."""
    cuda = device.type == "cuda"
    data = data.to(device)
    per_epoch, total_steps, epochs = plan(cfg, data.n_train)
    return dict(
        device=device, data=data, inputs=InputPipeline(data, device, channels_last=cuda),
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext(),
        gen=torch.Generator(device=device).manual_seed(cfg.seed),
        per_epoch=per_epoch, total_steps=total_steps, epochs=epochs, warmup=int(round(cfg.warmup_epochs * per_epoch)),
    )


def new_noise_scale(cfg: TrainConfig, shared: dict[str, Any]) -> NoiseScale:
    """A run's noise-scale estimate, averaged over about an epoch's measured steps, and at least 20 of them."""
    window = max(20, math.ceil(shared["per_epoch"] / max(cfg.diagnostics_every, 1)))
    return NoiseScale(window=window, population=None if shared["inputs"].augment else shared["data"].n_train)


def histogram_epochs(cfg: TrainConfig, epochs: int) -> set[int]:
    """The epochs whose gradient histograms are kept ("last": the run's last)."""
    return {epochs if e == "last" else int(e) for e in cfg.grad_histogram_epochs}


def _start(cfg: TrainConfig, data: Dataset, device: torch.device) -> _Run:
    """Move the data to the device, build the model and optimizer, and set up the probes."""
    shared = shared_setup(cfg, data, device)
    model, forward = _model(cfg, shared["data"], device)
    small_on_cpu(cfg, model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    layers = Layers([n for n, p in model.named_parameters() if p.requires_grad], device)
    return _Run(
        cfg=cfg, model=model, forward=forward, params=params, initial=[p.detach().clone() for p in params],
        opt=make_optimizer(cfg.optimizer, params, cfg.lr, cfg.momentum, cfg.weight_decay),
        layers=layers, grad_stats=GradientStats(params, layers), noise=new_noise_scale(cfg, shared),
        loss=make_loss(cfg, fused=False), **shared,
    )


def make_loss(cfg: TrainConfig, fused: bool) -> Loss:
    """The run's training loss: cross-entropy, or the workload's own (an entry point)."""
    return Loss(None if cfg.loss is None else entry.load(cfg.loss, "workload.loss"), fused)


def blowup_threshold(data: Dataset, cfg: TrainConfig) -> float:
    """An epoch's training loss above which a run has diverged: far above chance level for cross-entropy on
    classes; a user's loss has no known scale, so only a non-finite one counts."""
    if cfg.loss is None and data.num_classes > 0:
        return 10.0 * math.log(data.num_classes) + 10.0
    return math.inf


def _train_epoch(run: _Run, epoch: int, histogram: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over a fresh permutation of the training set, stopping early at the run's last step: the
    summed loss and the number of correct predictions (both still on the device), and the examples seen."""
    cfg, b, every = run.cfg, run.cfg.batch_size, run.cfg.diagnostics_every
    run.model.train()
    perm = torch.randperm(run.data.n_train, device=run.device, generator=run.gen)
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    seen = 0
    run.grad_stats.start_epoch(histogram=histogram)
    for i in range(run.per_epoch):
        if run.step >= run.total_steps:
            break
        idx = perm[i * b:(i + 1) * b]
        for group in run.opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, run.step, run.total_steps, run.warmup)
        # The noise scale costs a second backward pass, so it is measured on every `every`-th step only;
        # the cheap gradient statistics also on each epoch's first step, so that every epoch has them.
        probe = GradientProbe(run.params, len(idx)) if every > 0 and run.step % every == 0 else None
        backward_step(run, idx, probe, run.loss, loss_sum, correct)
        if every > 0 and (probe is not None or i == 0):
            run.grad_stats.add(probe.finish(run.noise) if probe is not None else param_norms(run.params))
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        seen += len(idx)
        run.step += 1
        if run.step % cfg.check_every == 0 and not torch.isfinite(loss_sum):  # the step loop's only sync
            raise Diverged(epoch, run.step, "became non-finite")
    return loss_sum, correct, seen


class StepProbe(Protocol):
    def backward(self, losses: torch.Tensor, parts: int = 1) -> None: ...


class StepRun(Protocol):
    """What one optimizer step's forward and backward need of a run: a lone `_Run` or a fused group."""

    cfg: TrainConfig
    data: Dataset
    inputs: InputPipeline
    forward: Callable[..., torch.Tensor]
    autocast: AbstractContextManager
    gen: torch.Generator


def backward_step(run: StepRun, idx: torch.Tensor, probe: StepProbe | None, loss: Loss, loss_sum: torch.Tensor,
                  correct: torch.Tensor) -> None:
    """Forward and backward of one optimizer step's examples `idx`, in accumulation_steps micro-batches;
    `loss.pieces` gives the summed losses of pieces of the batch, per example for cross-entropy (a fused
    group's: per member, (K, N), summed, so each member's gradient is its own). Adds their losses and correct
    predictions to `loss_sum` and `correct` in place (per member for a group)."""
    k = run.cfg.accumulation_steps
    for part in idx.chunk(k):
        x = run.inputs(run.data.train_x[part], train=True, generator=run.gen)
        y = run.data.train_y[part]
        with run.autocast:
            out = full_precision(run.forward(x))
            losses = loss.pieces(out, y, 2 if probe is not None and k == 1 else 1)
        if probe is None:
            (losses.sum() / len(idx)).backward()
        else:  # without micro-batches, the noise scale needs the gradients of two halves
            probe.backward(losses, parts=2 if k == 1 else 1)
        loss_sum += losses.detach().sum(-1)
        correct += count_correct(out.detach(), y, run.data.num_classes)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if autocast made it half or bfloat16; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def count_correct(out: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor | int:
    """Correct class predictions (per member for stacked outputs); 0 when the targets are not classes."""
    if num_classes == 0 or out.dim() - y.dim() not in (1, 2):  # (N, C) lone, (K, N, C) stacked
        return 0
    return (out.argmax(-1) == y).sum(-1)


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def summed_over_val(model: nn.Module, data: Dataset, inputs: InputPipeline, batch_size: int,
                    autocast: AbstractContextManager,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation set's summed loss (`loss_fn(logits, y)` sums a batch's) and correct predictions, in
    batches of `batch_size`, still on the device (per member for a fused model, whose logits are (K, N, C))."""
    model.eval()
    loss = torch.zeros((), device=inputs.device)
    correct = torch.zeros((), device=inputs.device, dtype=torch.long)
    for i in range(0, data.val_x.shape[0], batch_size):
        x = inputs(data.val_x[i:i + batch_size], train=False)
        y = data.val_y[i:i + batch_size]
        with autocast:
            out = full_precision(model(x))
        loss = loss + loss_fn(out, y)
        correct = correct + count_correct(out, y, data.num_classes)
    return loss, correct


def evaluate(model: nn.Module, data: Dataset, inputs: InputPipeline, batch_size: int,
             autocast: AbstractContextManager | None = None, loss: Loss | None = None) -> tuple[float, float]:
    """Validation loss and accuracy (NaN when the targets are not classes), in large batches, with one host
    sync at the end."""
    loss = loss or Loss(None, fused=False)
    total, correct = summed_over_val(model, data, inputs, batch_size, autocast or nullcontext(), loss.summed)
    n = data.val_x.shape[0]
    return float(total) / n, float(correct) / n if data.num_classes else math.nan


def _epoch_stats(run: _Run, epoch: int, train_loss: float, correct: torch.Tensor, seen: int,
                 seconds: float) -> EpochStats:
    """The epoch's numbers: validation, the weights' distance from their start, the gradient statistics."""
    val_loss, val_acc = evaluate(run.model, run.data, run.inputs, run.cfg.eval_batch_size, run.autocast, run.loss)
    with torch.no_grad():
        moved = run.layers.norms(torch._foreach_sub(run.params, run.initial)).tolist()
    layer = dict(zip(run.layers.names, moved, strict=True))
    grads = run.grad_stats.end_epoch()  # nothing measured (diagnostics_every = 0): no gradient statistics
    if grads.histogram is not None:
        grads.histogram.update(epoch=epoch, batch_size=run.cfg.batch_size)
    return EpochStats(
        epoch=epoch, train_loss=train_loss,
        train_accuracy=float(correct) / max(seen, 1) if run.data.num_classes else math.nan,
        val_loss=val_loss, val_accuracy=val_acc, examples_seen=run.examples, optimizer_steps=run.step,
        train_seconds=run.train_seconds, examples_per_second=seen / seconds if seconds > 0 else 0.0,
        weight_distance=math.sqrt(sum(v * v for v in layer.values())), grad_noise_scale=run.noise.value(),
        layer_distance=layer, grad_norm=grads.grad_norm, layer_grad_norm=grads.layer_norms,
        grad_histogram=grads.histogram,
    )


# --------------------------------------------------------------------------------------------------
# One run: the above, epoch by epoch


def train(
    cfg: TrainConfig,
    data: Dataset,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[EpochStats], bool | None] | None = None,
) -> list[EpochStats]:
    """Train and evaluate every epoch; the epochs trained. `on_epoch(stats)` returns True to stop the run
    after that epoch (a pruner's decision); what it raises propagates. Raises Diverged or OutOfMemory."""
    device = torch.device(device)
    with device_guard(cfg, device):
        return _train(cfg, data, device, on_epoch)


SMALL_MODEL = 200_000  # parameters: a user's model this small runs on one CPU thread, as the dense built-ins


def small_on_cpu(cfg: TrainConfig, model: nn.Module, device: torch.device) -> None:
    """One CPU thread for a user's small model (its ops too small to split; device_guard restores the count)."""
    if device.type == "cpu" and not registry.is_builtin_model(cfg.model) \
            and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        torch.set_num_threads(1)


@contextmanager
def device_guard(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """Around a run: one thread for a small dense model on the CPU, denormal floats flushed to zero on the CPU,
    and the device's out-of-memory errors raised as OutOfMemory."""
    threads = torch.get_num_threads()
    cpu = device.type == "cpu"
    if cpu and registry.is_builtin_model(cfg.model) and registry.MODELS[cfg.model].dense:
        # A small dense model's ops are too small to split: extra threads only spin, and on a busy machine
        # (parallel workers, a test suite) they made epochs 30x slower than one thread.
        torch.set_num_threads(1)
    # Momentum buffers of dead units decay into denormals (about 1% of them after a 12-epoch digits run), and
    # each denormal costs the CPU a slow path: an optimizer step on such buffers measured 9x slower.
    flush = cpu and torch.set_flush_denormal(True)
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(str(e).splitlines()[0]) from None
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise OutOfMemory(str(e).splitlines()[0]) from None
        raise
    finally:
        torch.set_num_threads(threads)
        if flush:
            torch.set_flush_denormal(False)  # torch's default; it has no getter to restore a caller's own choice


def _train(cfg: TrainConfig, data: Dataset, device: torch.device,
           on_epoch: Callable[[EpochStats], bool | None] | None) -> list[EpochStats]:
    if cfg.batch_size % cfg.accumulation_steps:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by accumulation_steps "
                         f"{cfg.accumulation_steps}")
    run = _start(cfg, data, device)
    blowup = blowup_threshold(data, cfg)
    histograms = histogram_epochs(cfg, run.epochs)
    history: list[EpochStats] = []
    for epoch in range(1, run.epochs + 1):
        t0 = time.perf_counter()
        histogram = cfg.diagnostics_every > 0 and epoch in histograms
        loss_sum, correct, seen = _train_epoch(run, epoch, histogram)
        epoch_loss = float(loss_sum) / max(seen, 1)  # the epoch's one host sync outside the divergence checks
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        run.train_seconds += seconds
        run.examples += seen
        if not math.isfinite(epoch_loss):
            raise Diverged(epoch, run.step, "became non-finite")
        if epoch_loss > blowup:
            raise Diverged(epoch, run.step, f"exploded to {epoch_loss:.3g}")
        stats = _epoch_stats(run, epoch, epoch_loss, correct, seen, seconds)
        if not math.isfinite(stats.val_loss):
            raise Diverged(epoch, run.step, "is non-finite on the validation set")
        history.append(stats)
        if on_epoch is not None and on_epoch(stats):
            break
    return history
