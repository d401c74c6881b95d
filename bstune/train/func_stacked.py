"""Any model's K members as one, by torch.func: stacked weights and buffers, one `functional_call` under `vmap`.

The built-ins stack by hand (`stacked`); a user's module may hold any layers and any forward code, so it is
stacked the general way: every parameter and buffer gets a leading K axis (registered under the module's own
names, so per-layer metrics read as a lone run's), and the forward pass maps the module's own code over the
members with the input shared. Batch-norm running statistics are buffers with a member axis, updated in place
per member. Randomness is drawn once for all members (``randomness="same"``), with the unbatched shape, from
the global generator as a lone run draws it: each member's dropout masks are its lone run's.

A model whose forward pass vmap refuses (data-dependent control flow, a buffer updated in a way vmap cannot
batch, ``.item()``) cannot be fused: `why_not_fusable` says why in one line, and its trials run one at a time.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call


def _repeat(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.detach().unsqueeze(0).repeat(k, *([1] * t.dim())).contiguous()


def _holder(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The (empty) submodule of `root` that holds the dotted `name`'s last part, made if missing."""
    *path, leaf = name.split(".")
    m = root
    for part in path:
        if part not in m._modules:
            m._modules[part] = nn.Module()
        m = m._modules[part]
    return m, leaf


class FuncStacked(nn.Module):
    """K copies of `model`, all starting from its weights and buffers; forward (N, ...) -> (K, N, ...)."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        base = copy.deepcopy(model)
        object.__setattr__(self, "_base", base)  # not a submodule: its own weights are never trained
        self._names = ([n for n, _ in base.named_parameters()], [n for n, _ in base.named_buffers()])
        for n, p in base.named_parameters():
            holder, leaf = _holder(self, n)
            holder._parameters[leaf] = nn.Parameter(_repeat(p, k), requires_grad=p.requires_grad)
        for n, b in base.named_buffers():
            holder, leaf = _holder(self, n)
            holder._buffers[leaf] = _repeat(b, k)

    def train(self, mode: bool = True) -> FuncStacked:
        super().train(mode)
        self._base.train(mode)
        return self

    def _stacked(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        params, buffers = dict(self.named_parameters()), dict(self.named_buffers())
        return {n: params[n] for n in self._names[0]}, {n: buffers[n] for n in self._names[1]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params, buffers = self._stacked()

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(self._base, (p, b), (x,))

        return torch.vmap(one, in_dims=(0, 0, None), randomness="same")(params, buffers, x)

    @property
    def members(self) -> int:
        params, buffers = self._stacked()
        return next(iter(params.values() or buffers.values())).shape[0]

    @torch.no_grad()
    def keep(self, keep: torch.Tensor) -> None:
        """Re-slice every parameter and buffer to the members at indices `keep` (new parameter objects)."""
        for n in self._names[0]:
            holder, leaf = _holder(self, n)
            p = holder._parameters[leaf]
            holder._parameters[leaf] = nn.Parameter(p.index_select(0, keep), requires_grad=p.requires_grad)
        for n in self._names[1]:
            holder, leaf = _holder(self, n)
            holder._buffers[leaf] = holder._buffers[leaf].index_select(0, keep)


def why_not_fusable(model: nn.Module, x: torch.Tensor) -> str | None:
    """None if two stacked copies of `model` run forward and backward on the example batch `x` in training
    and evaluation mode (the model itself untouched); else why not, in one line."""
    try:
        stacked = FuncStacked(model, 2)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            out = stacked.train()(x)
            out.float().sum().backward()
            with torch.no_grad():
                stacked.eval()(x)
    except Exception as e:  # noqa: BLE001 - whatever vmap refuses, said in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # its first sentence
        return f"{type(e).__name__}: {first[:200]}"
    return None
