"""The trainer's parts: what a run returns and how it fails, data on the device and augmentation, the lr schedule,
a run's constants (its divergence threshold, histogram epochs, noise window, loss), and the guard around a run.

The trainer itself, `fused.train_fused` (and `train`, a group of one), follows the fast CIFAR trainers: the
data set lives on the device, each epoch is a random permutation sliced into batches, augmentation happens on
the device, and the step loop never waits for the host. Nothing here knows about Optuna or MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bstune import entry, registry
from bstune.train.config import TrainConfig
from bstune.train.data import Dataset
from bstune.train.user import Loss


def preload_compiler() -> None:
    """Import torch._dynamo (2-3 s of CPU) before the first trial, for the runs that will use it: torch.compile,
    and a user's own loop (torch.optim's optimizers import it on their first step). A Ctrl-C landing in that
    import, inside a namedtuple's eval(), makes a `python -m bstune.cli` process exit by SIGINT after handling it,
    not with code 130 (a CPython quirk); before the first trial no run is cut by it. Bstune's own stacked
    training never imports it, so the built-in workloads do not pay for it."""
    import torch._dynamo  # noqa: F401


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
# The lr schedule, and a run's constants


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


def noise_window(cfg: TrainConfig, per_epoch: int) -> int:
    """The noise scale's averaging window: about an epoch's measured steps, and at least 20 of them."""
    return max(20, math.ceil(per_epoch / max(cfg.diagnostics_every, 1)))


def histogram_epochs(cfg: TrainConfig, epochs: int) -> set[int]:
    """The epochs whose gradient histograms are kept ("last": the run's last)."""
    return {epochs if e == "last" else int(e) for e in cfg.grad_histogram_epochs}


def make_loss(cfg: TrainConfig) -> Loss:
    """The run's training loss, per member: cross-entropy, or the workload's own (an entry point)."""
    return Loss(None if cfg.loss is None else entry.load(cfg.loss, "workload.loss"), fused=True)


def blowup_threshold(data: Dataset, cfg: TrainConfig) -> float:
    """An epoch's training loss above which a run has diverged: far above chance level for cross-entropy on
    classes; a user's loss has no known scale, so only a non-finite one counts."""
    if cfg.loss is None and data.num_classes > 0:
        return 10.0 * math.log(data.num_classes) + 10.0
    return math.inf


# --------------------------------------------------------------------------------------------------
# Outputs, and the guard around a run


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if autocast made it half or bfloat16; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def count_correct(out: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor | int:
    """Correct class predictions per member of outputs (K, N, C); 0 when the targets are not classes."""
    if num_classes == 0 or out.dim() - y.dim() != 2:
        return 0
    return (out.argmax(-1) == y).sum(-1)


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
