"""One training run: a model, a batch size, a learning rate and a momentum, trained and scored every epoch.

The loop follows the fast CIFAR trainers: the data set lives on the device, each epoch is a random
permutation sliced into batches, augmentation happens on the device, and the step loop never waits for the
host: losses are summed on the device and checked for divergence only every `check_every` steps.
Nothing here knows about Optuna or MLflow; the caller gets each epoch's numbers through `on_epoch`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bstune.data import Dataset
from bstune.models import build_model


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int  # the batch the optimizer sees (split into accumulation_steps micro-batches)
    lr: float
    momentum: float
    optimizer: str = "sgd"
    epochs: int = 10
    steps: int | None = None  # if set, train exactly this many optimizer steps (equal-steps control)
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    accumulation_steps: int = 1
    seed: int = 0
    model: str = "mlp"
    width: int = 128
    compile: bool = False
    diagnostics_every: int = 4  # gradient-noise-scale measurement every this many steps (0: never)
    check_every: int = 16  # steps between divergence checks (each is one host sync)
    eval_batch_size: int = 4096


@dataclass
class EpochStats:
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
    grad_noise_scale: float | None = None  # B_simple = tr(Sigma) / |G|^2, averaged over this epoch
    layer_distance: dict[str, float] = field(default_factory=dict)

    @property
    def generalization_gap(self) -> float:
        return self.train_accuracy - self.val_accuracy


class Diverged(Exception):
    """The loss became NaN/inf or exploded. Carries where it happened."""

    def __init__(self, epoch: int, step: int, detail: str) -> None:
        super().__init__(f"loss {detail} at epoch {epoch}, optimizer step {step}")
        self.epoch = epoch
        self.step = step


class OutOfMemory(Exception):
    """The device ran out of memory for this batch size."""


def pick_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return math.ceil(n_train / batch_size)


def make_optimizer(name: str, params: list[nn.Parameter], lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """SGD / Nesterov / Adam / AdamW. For the Adam family, momentum is beta1."""
    if name in ("sgd", "nesterov"):
        nesterov = name == "nesterov" and momentum > 0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


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


class _Inputs:
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
        if self.mean is not None:
            x = (x.float() - self.mean) / self.std
        if train and self.augment:
            x = augment_images(x, self.pad, generator)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class _NoiseScale:
    """McCandlish et al.'s two-batch-size estimate of B_simple = tr(Sigma)/|G|^2, kept as running averages.

    On a measured step the batch is split into micro-batches of size b (the accumulation micro-batches, or
    two halves); |g_b|^2 (averaged over micro-batches) and |g_B|^2 of their mean cost nothing extra to
    compute. Unbiased estimates follow from E|g_b|^2 = |G|^2 + tr(Sigma)/b:
        |G|^2     ~ (B |g_B|^2 - b |g_b|^2) / (B - b)
        tr(Sigma) ~ (|g_b|^2 - |g_B|^2) / (1/b - 1/B)
    One step's |G|^2 estimate is very noisy (it can be negative), so each is averaged over steps before
    dividing: an exponential moving average (bias-corrected), as in the paper's own measurements.
    """

    def __init__(self, device: torch.device, beta: float = 0.9) -> None:
        self.g2 = torch.zeros((), device=device)
        self.tr = torch.zeros((), device=device)
        self.beta = beta
        self.n = 0

    def add(self, small_sq: torch.Tensor, big_sq: torch.Tensor, b_small: float, b_big: float) -> None:
        self.g2.mul_(self.beta).add_((1 - self.beta) * (b_big * big_sq - b_small * small_sq) / (b_big - b_small))
        self.tr.mul_(self.beta).add_((1 - self.beta) * (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big))
        self.n += 1

    def value(self) -> float | None:
        """tr(Sigma)/|G|^2 from the running averages (the bias corrections cancel in the ratio)."""
        if self.n == 0:
            return None
        g2, tr = float(self.g2), float(self.tr)
        return tr / g2 if g2 > 0 and math.isfinite(tr / g2) else None


def train(
    cfg: TrainConfig,
    data: Dataset,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> list[EpochStats]:
    """Train and evaluate every epoch. Raises Diverged or OutOfMemory; whatever `on_epoch` raises (a
    pruning signal, say) propagates and ends the run."""
    device = torch.device(device)
    try:
        return _train(cfg, data, device, on_epoch)
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(str(e).splitlines()[0]) from None
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise OutOfMemory(str(e).splitlines()[0]) from None
        raise


def _train(cfg: TrainConfig, data: Dataset, device: torch.device,
           on_epoch: Callable[[EpochStats], None] | None) -> list[EpochStats]:
    if cfg.batch_size % cfg.accumulation_steps:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by accumulation_steps "
                         f"{cfg.accumulation_steps}")
    cuda = device.type == "cuda"
    data = data.to(device)
    inputs = _Inputs(data, device, channels_last=cuda)
    torch.manual_seed(cfg.seed)  # same initial weights for every trial of a study: fairer comparisons
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.width).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]
    opt = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.momentum, cfg.weight_decay)
    forward = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    n, b, k = data.n_train, cfg.batch_size, cfg.accumulation_steps
    per_epoch = steps_per_epoch(n, b)
    total_steps = cfg.steps if cfg.steps is not None else per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / per_epoch)
    warmup = int(round(cfg.warmup_epochs * per_epoch))
    blowup = 10.0 * math.log(data.num_classes) + 10.0  # a loss this far above chance level has diverged
    noise = _NoiseScale(device)

    history: list[EpochStats] = []
    step = 0
    examples = 0
    train_seconds = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for i in range(per_epoch):
            if step >= total_steps:
                break
            idx = perm[i * b:(i + 1) * b]
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, step, total_steps, warmup)
            measure = cfg.diagnostics_every > 0 and step % cfg.diagnostics_every == 0 and len(idx) >= 2
            parts = idx.chunk(2 if measure and k == 1 else k)
            split = measure and len(parts) > 1
            micro_sq, g_prev = [], 0.0
            for part in parts:
                x = inputs(data.train_x[part], train=True, generator=gen)
                y = data.train_y[part]
                with autocast:
                    out = forward(x)
                    loss = F.cross_entropy(out.float(), y)
                (loss * (len(part) / len(idx))).backward()
                loss_sum += loss.detach() * len(part)
                correct += (out.detach().argmax(1) == y).sum()
                if split:
                    # The accumulated gradient grew by this micro-batch's mean gradient, scaled by its share.
                    g_now = torch.cat([p.grad.reshape(-1) for p in params]).float()
                    micro_sq.append(((g_now - g_prev) * (len(idx) / len(part))).pow(2).sum())
                    g_prev = g_now
            if split:
                noise.add(torch.stack(micro_sq).mean(), g_prev.pow(2).sum(), len(idx) / len(parts), len(idx))
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(idx)
            step += 1
            if step % cfg.check_every == 0 and not torch.isfinite(loss_sum):
                raise Diverged(epoch, step, "became non-finite")
        epoch_loss = float(loss_sum) / max(seen, 1)  # one host sync per epoch
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_seconds += dt
        examples += seen
        if not math.isfinite(epoch_loss):
            raise Diverged(epoch, step, "became non-finite")
        if epoch_loss > blowup:
            raise Diverged(epoch, step, f"exploded to {epoch_loss:.3g}")
        val_loss, val_acc = evaluate(model, data, inputs, cfg.eval_batch_size, autocast)
        with torch.no_grad():
            sq = [(p - p0).float().pow(2).sum() for p, p0 in zip(params, initial, strict=True)]
            layer = {name: float(s.sqrt()) for name, s in zip(names, sq, strict=True)}
        stats = EpochStats(
            epoch=epoch, train_loss=epoch_loss, train_accuracy=float(correct) / max(seen, 1),
            val_loss=val_loss, val_accuracy=val_acc, examples_seen=examples, optimizer_steps=step,
            train_seconds=train_seconds, examples_per_second=seen / dt if dt > 0 else 0.0,
            weight_distance=math.sqrt(sum(v * v for v in layer.values())), grad_noise_scale=noise.value(),
            layer_distance=layer,
        )
        if not math.isfinite(val_loss):
            raise Diverged(epoch, step, "is non-finite on the validation set")
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return history


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, inputs: _Inputs, batch_size: int,
             autocast: object = nullcontext()) -> tuple[float, float]:
    """Validation loss and accuracy, in large batches, with one host sync at the end."""
    model.eval()
    loss = torch.zeros((), device=inputs.device)
    correct = torch.zeros((), device=inputs.device, dtype=torch.long)
    n = data.val_x.shape[0]
    for i in range(0, n, batch_size):
        x = inputs(data.val_x[i:i + batch_size], train=False)
        y = data.val_y[i:i + batch_size]
        with autocast:
            out = model(x).float()
        loss += F.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    return float(loss) / n, float(correct) / n
