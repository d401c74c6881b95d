"""A model of K members trained as one: every weight gets a leading K axis (horizontal fusion, as in HFTA).

`stack_model` replaces a model's leaf modules with stacked equivalents and leaves its containers (and their
`forward` code) alone. Activations carry the members side by side in layouts that elementwise, pooling and
flattening modules already handle:

- images: (N, K*C, H, W). A convolution is a grouped one (groups=K) with weight (K*Cout, Cin, kh, kw); the
  first one sees the shared input (N, Cin, H, W) and is a plain convolution with K*Cout output channels.
  BatchNorm2d(C) becomes batch norm over K*C channels: per-member, per-channel statistics for free.
- features: (K, N, F). A linear layer is a batched matmul with weight (K, F, O) (transposed); given a 2-D input it takes
  (N, F) as the shared input and (N, K*F) (flattened images) as the members' own.

Logits come out as (K, N, classes); `user.member_cross_entropy` gives each member's own cross-entropy. Every parameter
and buffer of a stacked module has the member axis first (`p.view(K, -1)` is member k's row), so
`keep_members` can re-slice the model to the members that are left.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bstune.train.func_stacked import FuncStacked

# Modules without parameters that act per channel or per feature, so they work on the stacked layouts as is.
_AS_IS = (nn.Flatten, nn.ReLU, nn.GELU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
          nn.Identity, nn.Dropout)


def _repeat(t: torch.Tensor | None, k: int) -> torch.Tensor | None:
    return None if t is None else t.detach().unsqueeze(0).repeat(k, *([1] * t.dim())).contiguous()


class StackedLinear(nn.Module):
    """K linear layers: (K, N, F) -> (K, N, O) by a batched matmul."""

    def __init__(self, layer: nn.Linear, k: int) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        # Stored transposed, (K, F, O), so that the batched matmul's weight gradient comes out in the weight's
        # own layout: (K, O, F) made autograd copy every step's gradient into place.
        self.weight = nn.Parameter(_repeat(layer.weight.t(), k))
        self.bias = None if layer.bias is None else nn.Parameter(_repeat(layer.bias, k))  # (K, O)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        if x.dim() == 2:
            if x.shape[1] == self.in_features:  # the shared input (with K = 1 the two layouts agree)
                x = x.expand(k, *x.shape)
            else:  # flattened stacked images (N, K*F)
                x = x.view(x.shape[0], k, self.in_features).transpose(0, 1)
        w = self.weight
        return torch.bmm(x, w) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x, w)


class StackedConv2d(nn.Module):
    """K 2-D convolutions over (N, K*Cin, H, W), or over the shared input (N, Cin, H, W)."""

    def __init__(self, conv: nn.Conv2d, k: int) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"cannot stack {conv}: only ungrouped, zero-padded convolutions")
        self.in_channels = conv.in_channels
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = nn.Parameter(_repeat(conv.weight, k))  # (K, Cout, Cin, kh, kw)
        self.bias = None if conv.bias is None else nn.Parameter(_repeat(conv.bias, k))  # (K, Cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        w = self.weight.view(-1, *self.weight.shape[2:])
        groups = 1 if x.shape[1] == self.in_channels else k
        b = None if self.bias is None else self.bias.view(-1)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)


class StackedBatchNorm2d(nn.Module):
    """K BatchNorm2d(C) as one over K*C channels; running statistics per member and channel, shaped (K, C)."""

    def __init__(self, bn: nn.BatchNorm2d, k: int) -> None:
        super().__init__()
        if not (bn.affine and bn.track_running_stats):
            raise ValueError(f"cannot stack {bn}: only affine batch norm with running statistics")
        self.eps, self.momentum = bn.eps, bn.momentum
        self.weight = nn.Parameter(_repeat(bn.weight, k))
        self.bias = nn.Parameter(_repeat(bn.bias, k))
        self.register_buffer("running_mean", _repeat(bn.running_mean, k))
        self.register_buffer("running_var", _repeat(bn.running_var, k))
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())  # shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean.view(-1), self.running_var.view(-1), self.weight.view(-1),
                            self.bias.view(-1), self.training, factor, self.eps)


_STACKED = {nn.Linear: StackedLinear, nn.Conv2d: StackedConv2d, nn.BatchNorm2d: StackedBatchNorm2d}
STACKED_MODULES = tuple(_STACKED.values())


def stack_model(model: nn.Module, k: int) -> nn.Module:
    """A copy of `model` whose K members all start from `model`'s weights and buffers."""
    fused = copy.deepcopy(model)
    _replace(fused, k)
    return fused


def _replace(module: nn.Module, k: int) -> None:
    for name, child in module.named_children():
        kind = _STACKED.get(type(child))
        if kind is not None:
            setattr(module, name, kind(child, k))
        elif isinstance(child, _AS_IS):
            continue
        elif any(True for _ in child.children()) and not any(True for _ in child.parameters(recurse=False)):
            _replace(child, k)  # a container: its forward combines its children elementwise (models.py)
        else:
            raise ValueError(f"cannot stack module {type(child).__name__} ({name})")


def member_count(model: nn.Module) -> int:
    """K, the members a stacked model holds."""
    if isinstance(model, FuncStacked):
        return model.members
    return next(m.weight.shape[0] for m in model.modules() if isinstance(m, STACKED_MODULES))


@torch.no_grad()
def keep_members(model: nn.Module, keep: torch.Tensor) -> None:
    """Re-slice every stacked parameter and buffer to the members at indices `keep` (in that order). The
    parameters are new objects (lists of the old ones must be rebuilt), without gradients."""
    if isinstance(model, FuncStacked):
        model.keep(keep)
        return
    for m in model.modules():
        if isinstance(m, STACKED_MODULES):
            for name, p in m._parameters.items():
                if p is not None:
                    m._parameters[name] = nn.Parameter(p.index_select(0, keep), requires_grad=p.requires_grad)
            for name in ("running_mean", "running_var"):
                if name in m._buffers:
                    m._buffers[name] = m._buffers[name].index_select(0, keep)


