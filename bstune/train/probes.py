"""What happens inside a trial, beyond its loss: gradient noise scale, per-layer norms, gradient histograms.

The trainer measures the noise scale on every `diagnostics_every`-th optimizer step (it costs a second
backward pass there) and the gradient statistics on those steps and on each epoch's first step (they cost a
few small kernels). Everything is accumulated on the device, so the step loop never waits for the host; the
trainer reads the results once per epoch.

- `GradientProbe` runs the backward pass of one optimizer step in pieces (the accumulation micro-batches,
  or two halves of the batch through one graph) and records each piece's gradient norm, while the update
  stays exactly the whole batch's.
- `NoiseScale` turns those norms into McCandlish et al.'s B_simple = tr(Sigma) / |G|^2.
- `GradientStats` keeps per-layer gradient norms and histograms of raw gradient values on fixed, shared bins
  (`HISTOGRAM_EDGES`), so histograms from any trial of any study can be overlaid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

# Histogram bins for raw gradient values, the same for every trial: symmetric and log-spaced, 4 bins per
# decade for magnitudes 1e-10 .. 1e2, and one bin (-1e-10, 1e-10] in the middle that also holds exact zeros
# (dead units). Values beyond +-1e2 are counted in the outermost bins.
_MAGNITUDES = np.logspace(-10, 2, 49)
HISTOGRAM_EDGES: tuple[float, ...] = tuple(float(v) for v in np.concatenate([-_MAGNITUDES[::-1], _MAGNITUDES]))


def layer_names(param_names: list[str], max_layers: int = 32) -> list[str]:
    """The layer (module path) of each parameter, coarsened until there are at most `max_layers` layers.

    "stage1.res.0.0.weight" -> "stage1.res.0.0"; with too many layers, "stage1.res.0", then "stage1", ...
    """
    modules = [n.rsplit(".", 1)[0] if "." in n else n for n in param_names]
    depth = max((m.count(".") + 1 for m in modules), default=1)

    def cut(m: str, d: int) -> str:
        return ".".join(m.split(".")[:d])

    while depth > 1 and len({cut(m, depth) for m in modules}) > max_layers:
        depth -= 1
    return [cut(m, depth) for m in modules]


class Layers:
    """Parameters grouped into layers, for per-layer norms computed on the device in a few kernels."""

    def __init__(self, param_names: list[str], device: torch.device, max_layers: int = 32) -> None:
        per_param = layer_names(param_names, max_layers)
        self.names: list[str] = list(dict.fromkeys(per_param))  # in model order
        self.of_param = [self.names.index(n) for n in per_param]
        self._index = torch.tensor(self.of_param, device=device)
        self.device = device

    def combine(self, param_norms: torch.Tensor) -> torch.Tensor:
        """Per-parameter norms (last dimension) -> per-layer norms: the L2 norm of each layer's tensors together."""
        out = torch.zeros(*param_norms.shape[:-1], len(self.names), device=param_norms.device, dtype=torch.float32)
        return out.index_add_(-1, self._index, param_norms.float().pow(2)).sqrt()

    def norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """L2 norm of each layer's tensors taken together: a vector of len(names), on the device."""
        return self.combine(torch.stack(torch._foreach_norm(tensors)))


def param_norms(params: list[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of each parameter's `.grad`, as one vector on the device."""
    return torch.stack(torch._foreach_norm([p.grad for p in params]))


class NoiseScale:
    """McCandlish et al.'s two-batch-size estimate of B_simple = tr(Sigma) / |G|^2.

    Each measured step gives |g_b|^2 (the mean squared norm of micro-batch gradients, micro-batches of b
    examples) and |g_B|^2 (the step's whole-batch gradient). Sampling batches without replacement from N
    examples, E|g_b|^2 = |G|^2 + tr(Sigma) (1/b - 1/N), so
        tr(Sigma) ~ (|g_b|^2 - |g_B|^2) / (1/b - 1/B)
        |G|^2     ~ |g_B|^2 - tr(Sigma) (1/B - 1/N)
    which for N -> infinity is the paper's (B |g_B|^2 - b |g_b|^2) / (B - b). The 1/N term matters on small
    data sets: without it |G|^2 is underestimated by tr(Sigma)/N and the ratio blows up as B_simple nears N.
    With augmentation the examples are not a finite population, so `population` is None there.

    One step's |G|^2 estimate is very noisy (it is often negative when B << B_simple), so both are averaged
    over steps before dividing: an exponential moving average with a time constant of `window` measured
    steps (None: a plain average over all of them). The squared norms stay on the device until `value()`.
    """

    def __init__(self, window: float | None = None, population: int | None = None) -> None:
        self.beta = 1.0 if window is None else 1.0 - 1.0 / max(window, 1.0)
        self.inv_n = 0.0 if population is None else 1.0 / population
        self._g2 = self._tr = 0.0  # decayed sums of the |G|^2 and tr(Sigma) estimates
        self._pending: list[tuple[torch.Tensor, torch.Tensor, float, float]] = []

    def add(self, small_sq: torch.Tensor, big_sq: torch.Tensor, b_small: float, b_big: float) -> None:
        """One measured step: squared norms (0-d tensors, left on the device) and the two batch sizes."""
        self._pending.append((small_sq, big_sq, b_small, b_big))

    def value(self) -> float | None:
        """tr(Sigma)/|G|^2 from the averages (one host sync); None before any measurement or if |G|^2 <= 0."""
        if self._pending:
            norms = torch.stack([torch.stack(p[:2]) for p in self._pending]).double().tolist()
            for (small, big), (_, _, b, big_b) in zip(norms, self._pending, strict=True):
                tr = (small - big) / (1.0 / b - 1.0 / big_b)
                self._tr = self.beta * self._tr + tr
                self._g2 = self.beta * self._g2 + big - tr * (1.0 / big_b - self.inv_n)
            self._pending.clear()
        if not self._g2 > 0:  # also before any measurement
            return None
        ratio = self._tr / self._g2
        return ratio if math.isfinite(ratio) and ratio > 0 else None


class GradientProbe:
    """Runs one optimizer step's backward in pieces and keeps each piece's gradient norms.

    Every piece's loss is its per-example losses summed over the step's whole batch size `total`, so the
    pieces' gradients add up to exactly the whole batch's mean gradient: the update is unchanged. Before each
    piece the gradient so far is taken out of `.grad`, so that `.grad` holds the piece's alone, then added back.
    """

    def __init__(self, params: list[nn.Parameter], total: int) -> None:
        self.params = params
        self.total = total
        self._pieces: list[torch.Tensor] = []  # per-parameter norms of each piece's share of the gradient
        self._sizes: list[int] = []

    def backward(self, losses: torch.Tensor, parts: int = 1) -> None:
        """Backward of per-example `losses` in `parts` pieces through one graph (no second forward pass:
        batch-norm statistics stay those of the whole micro-batch)."""
        pieces = losses.split(math.ceil(len(losses) / parts))
        for j, piece in enumerate(pieces):
            so_far = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None
            (piece.sum() / self.total).backward(retain_graph=j < len(pieces) - 1)
            self._pieces.append(param_norms(self.params))
            self._sizes.append(len(piece))
            if so_far[0] is not None:
                torch._foreach_add_([p.grad for p in self.params], so_far)

    def finish(self, noise: NoiseScale | None = None) -> torch.Tensor:
        """Per-parameter norms of the step's whole gradient; gives the step to `noise` (if it had two pieces)."""
        total_norms = param_norms(self.params)
        if noise is not None and len(self._sizes) >= 2:
            # Piece j added n_j/total times its own mean gradient g_j: |g_j|^2 = |share_j|^2 (total/n_j)^2.
            small_sq = torch.stack([v.float().pow(2).sum() * (self.total / n) ** 2
                                    for v, n in zip(self._pieces, self._sizes, strict=True)]).mean()
            # E of the mean of |g_j|^2 involves the mean of 1/n_j: the harmonic mean is the b to use.
            b_small = len(self._sizes) / sum(1.0 / n for n in self._sizes)
            noise.add(small_sq, total_norms.float().pow(2).sum(), b_small, float(sum(self._sizes)))
        return total_norms


@dataclass
class EpochGradients:
    """One epoch's gradient statistics, over its measured steps."""

    grad_norm: float | None  # mean over measured steps of the whole-model gradient norm
    layer_norms: dict[str, float] = field(default_factory=dict)  # mean per-layer gradient norm
    histogram: dict | None = None  # counts on HISTOGRAM_EDGES, whole model and per layer (histogram epochs)


class GradientStats:
    """Per-layer gradient norms and raw-value histograms (in chosen epochs) of the steps it is given, kept on
    the device; `end_epoch` reads them with one host transfer."""

    def __init__(self, params: list[nn.Parameter], layers: Layers,
                 edges: tuple[float, ...] = HISTOGRAM_EDGES) -> None:
        self.params = params
        self.layers = layers
        device = layers.device
        self.edges = edges
        self._edges = torch.tensor(edges, device=device)
        self._nbins = len(edges) - 1
        self._ones = torch.ones(1, dtype=torch.long, device=device).expand(max(p.numel() for p in params))
        self._norms: list[torch.Tensor] = []
        self._hist: torch.Tensor | None = None

    def start_epoch(self, histogram: bool) -> None:
        self._norms = []
        n = len(self.layers.names)
        self._hist = torch.zeros(n, self._nbins, dtype=torch.long, device=self._edges.device) if histogram else None

    def add(self, param_norms: torch.Tensor) -> None:
        """Record a measured step: its gradient's per-parameter norms; histograms read `.grad` itself."""
        self._norms.append(param_norms)
        if self._hist is not None:
            for p, i in zip(self.params, self.layers.of_param, strict=True):
                bins = torch.bucketize(p.grad.detach().reshape(-1).float(), self._edges).clamp_(1, self._nbins) - 1
                self._hist[i].scatter_add_(0, bins, self._ones[:bins.numel()])

    def end_epoch(self) -> EpochGradients:
        if not self._norms:
            return EpochGradients(None)
        per_step = self.layers.combine(torch.stack(self._norms))  # (steps, layers)
        whole = per_step.pow(2).sum(1).sqrt()
        means = torch.cat([per_step.mean(0), whole.mean(0, keepdim=True)]).tolist()
        hist = None
        if self._hist is not None:
            per_layer = self._hist.cpu()
            hist = {
                "edges": list(self.edges), "counts": per_layer.sum(0).tolist(),
                "layers": {name: row.tolist() for name, row in zip(self.layers.names, per_layer, strict=True)},
                "measured_steps": len(self._norms),
            }
        layer_means = dict(zip(self.layers.names, means[:-1], strict=True))
        return EpochGradients(means[-1], layer_means, hist)

