"""The in-trial probes of `probes` for each member of a stacked model, from the stacked gradients.

Each member's numbers are what `probes` computes for a lone run: per-parameter gradient norms are taken over
member views `grad.view(K, -1)`, so a step's norms are a (K, parameters) tensor, and each member keeps its own
`NoiseScale`. Everything stays on the device until the epoch's end, as in `probes`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bstune.train.probes import HISTOGRAM_EDGES, EpochGradients, Layers, NoiseScale


def member_norms(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
    """(K, len(tensors)): the L2 norm of each member's slice of each tensor."""
    return torch.stack([torch.linalg.vector_norm(t.reshape(k, -1), dim=1) for t in tensors], dim=1)


def member_grad_norms(params: list[nn.Parameter], k: int) -> torch.Tensor:
    """(K, parameters): each member's gradient norm of each parameter."""
    return member_norms([p.grad for p in params], k)


class MemberGradientProbe:
    """`probes.GradientProbe` for stacked parameters: one step's backward in pieces, each piece's gradient norms
    per member, the update unchanged."""

    def __init__(self, params: list[nn.Parameter], k: int, total: int) -> None:
        self.params = params
        self.k = k
        self.total = total
        self._pieces: list[torch.Tensor] = []  # (K, parameters) per piece
        self._sizes: list[int] = []

    def backward(self, losses: torch.Tensor, parts: int = 1) -> None:
        """Backward of per-member, per-example `losses` (K, N) in `parts` pieces along the examples."""
        pieces = losses.split(math.ceil(losses.shape[1] / parts), dim=1)
        for j, piece in enumerate(pieces):
            so_far = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None
            (piece.sum() / self.total).backward(retain_graph=j < len(pieces) - 1)
            self._pieces.append(member_grad_norms(self.params, self.k))
            self._sizes.append(piece.shape[1])
            if so_far[0] is not None:
                torch._foreach_add_([p.grad for p in self.params], so_far)

    def finish(self, noise: list[NoiseScale] | None = None) -> torch.Tensor:
        """(K, parameters) norms of the step's whole gradient; gives each member's step to its `noise`."""
        total_norms = member_grad_norms(self.params, self.k)
        if noise is not None and len(self._sizes) >= 2:
            small_sq = torch.stack([v.float().pow(2).sum(1) * (self.total / n) ** 2
                                    for v, n in zip(self._pieces, self._sizes, strict=True)]).mean(0)
            b_small = len(self._sizes) / sum(1.0 / n for n in self._sizes)
            big_sq = total_norms.float().pow(2).sum(1)
            for i, member in enumerate(noise):
                member.add(small_sq[i], big_sq[i], b_small, float(sum(self._sizes)))
        return total_norms


class MemberGradientStats:
    """`probes.GradientStats` per member: gradient norms per layer and raw-value histograms on the shared bins."""

    def __init__(self, params: list[nn.Parameter], layers: Layers,
                 edges: tuple[float, ...] = HISTOGRAM_EDGES) -> None:
        self.params = params
        self.layers = layers
        self.edges = edges
        self._edges = torch.tensor(edges, device=layers.device)
        self._nbins = len(edges) - 1
        self._norms: list[torch.Tensor] = []  # (K, parameters) per measured step
        self._hist: torch.Tensor | None = None  # (K, layers, bins)

    def start_epoch(self, k: int, histogram: bool) -> None:
        self._norms = []
        shape = (k, len(self.layers.names), self._nbins)
        self._hist = torch.zeros(shape, dtype=torch.long, device=self._edges.device) if histogram else None

    def add(self, norms: torch.Tensor) -> None:
        """Record a measured step: its (K, parameters) gradient norms; histograms read `.grad` itself."""
        self._norms.append(norms)
        if self._hist is not None:
            k, n_layers, nb = self._hist.shape
            flat = self._hist.view(-1)
            base = torch.arange(k, device=flat.device)[:, None] * (n_layers * nb)
            for p, i in zip(self.params, self.layers.of_param, strict=True):
                bins = torch.bucketize(p.grad.detach().reshape(k, -1).float(), self._edges).clamp_(1, nb) - 1
                flat.scatter_add_(0, (bins + base + i * nb).view(-1), torch.ones_like(bins).view(-1))

    def keep(self, keep: torch.Tensor, params: list[nn.Parameter]) -> None:
        """Only the members at indices `keep` go on, with parameters `params`."""
        self.params = params
        self._norms = [n.index_select(0, keep) for n in self._norms]
        if self._hist is not None:
            self._hist = self._hist.index_select(0, keep)

    def end_epoch(self, k: int) -> list[EpochGradients]:
        """Each member's statistics over the epoch's measured steps (one host transfer)."""
        if not self._norms:
            return [EpochGradients(None) for _ in range(k)]
        per_step = self.layers.combine(torch.stack(self._norms))  # (steps, K, layers)
        whole = per_step.pow(2).sum(-1).sqrt()  # (steps, K)
        means = torch.cat([per_step.mean(0), whole.mean(0)[:, None]], dim=1).tolist()  # (K, layers + 1)
        hists = self._hist.cpu() if self._hist is not None else None
        out = []
        for i, row in enumerate(means):
            hist = None
            if hists is not None:
                hist = {
                    "edges": list(self.edges), "counts": hists[i].sum(0).tolist(),
                    "layers": {name: r.tolist() for name, r in zip(self.layers.names, hists[i], strict=True)},
                    "measured_steps": len(self._norms),
                }
            out.append(EpochGradients(row[-1], dict(zip(self.layers.names, row[:-1], strict=True)), hist))
        return out
