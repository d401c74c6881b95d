"""A user's data set and loss, as bstune's trainers take them.

`user_tensors` turns what a user's dataset FUNC() returned, (train, val), each a torch Dataset of (input, target)
pairs or an (inputs, targets) pair of tensors or arrays, into in-memory tensors, with one line naming
`workload.dataset` and the fix when it has the wrong shape. `Loss` is the training loss a run uses: the
default per-example cross-entropy, or a user's (outputs, targets) -> mean loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bstune.errors import BstuneError

_FIELD = "workload.dataset"


def user_tensors(name: str, returned: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The (train, val) a user's data set function returned, as (train_x, train_y, val_x, val_y, num_classes);
    num_classes 0: the targets are not class labels."""
    if not isinstance(returned, tuple | list) or len(returned) != 2:
        raise BstuneError(f"{_FIELD}: {name} returned {type(returned).__name__}; it must return (train, val), "
                          f"each a torch Dataset of (input, target) pairs or an (inputs, targets) pair of tensors")
    (xt, yt), (xv, yv) = (_split(part, which) for part, which in zip(returned, ("train", "val"), strict=True))
    if xt.shape[1:] != xv.shape[1:] or yt.shape[1:] != yv.shape[1:]:
        raise BstuneError(f"{_FIELD}: train and val examples differ in shape (inputs {tuple(xt.shape[1:])} vs "
                          f"{tuple(xv.shape[1:])}, targets {tuple(yt.shape[1:])} vs {tuple(yv.shape[1:])}); "
                          f"make them alike")
    classes = not yt.is_floating_point() and yt.dim() == 1
    num_classes = int(max(int(yt.max()), int(yv.max()))) + 1 if classes else 0
    if classes and min(int(yt.min()), int(yv.min())) < 0:
        raise BstuneError(f"{_FIELD}: class targets must be 0, 1, 2, ...; got a negative one")
    return xt, yt, xv, yv, num_classes


def _split(part: Any, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(part, tuple | list) and len(part) == 2 and all(_is_array(v) for v in part):
        x, y = (_tensor(v, which) for v in part)
    elif hasattr(part, "__len__") and hasattr(part, "__getitem__"):
        x, y = _stack_pairs(part, which)
    else:
        raise BstuneError(f"{_FIELD}: its {which} split is a {type(part).__name__}; give a torch Dataset of "
                          f"(input, target) pairs or an (inputs, targets) pair of tensors")
    if len(x) == 0:
        raise BstuneError(f"{_FIELD}: its {which} split is empty")
    if len(x) != len(y):
        raise BstuneError(f"{_FIELD}: its {which} split has {len(x)} inputs but {len(y)} targets; give one "
                          f"target per input")
    if x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if y.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        y = y.long()
    if not y.is_floating_point() and y.dim() == 2 and y.shape[1] == 1:
        y = y.view(-1)  # class labels as a column
    elif y.is_floating_point():
        y = y.to(torch.get_default_dtype())
    return x.contiguous(), y.contiguous()


def _is_array(v: Any) -> bool:
    return isinstance(v, torch.Tensor | np.ndarray)


def _tensor(v: Any, which: str) -> torch.Tensor:
    try:
        return torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError) as e:
        raise BstuneError(f"{_FIELD}: its {which} split holds what is not a number array ({e}); give tensors "
                          f"or numeric arrays") from None


def _stack_pairs(part: Any, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in range(len(part)):
        item = part[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise BstuneError(f"{_FIELD}: item {i} of its {which} split is a {type(item).__name__}, not an "
                              f"(input, target) pair; make __getitem__ return (x, y)")
        xs.append(_tensor(item[0], which))
        ys.append(_tensor(item[1], which))
    try:
        return torch.stack(xs), torch.stack(ys)
    except RuntimeError as e:
        raise BstuneError(f"{_FIELD}: the examples of its {which} split differ in shape ({e}); give inputs of "
                          f"one shape") from None


def per_example_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def member_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-member, per-example cross-entropy (K, N) of stacked logits (K, N, classes) against shared labels y."""
    k, n, c = logits.shape
    return F.cross_entropy(logits.reshape(k * n, c), y.expand(k, n).reshape(-1), reduction="none").view(k, n)


class Loss:
    """A run's training loss. `pieces(out, y, parts)`: summed losses along the last axis, in up to `parts`
    pieces of the batch whose gradients the noise-scale probe can tell apart (per example for the default
    cross-entropy; for a user's mean loss, the batch's halves); per member first when `fused` (outputs
    (K, N, ...)). `summed(out, y)`: the batch's summed loss (per member when fused)."""

    def __init__(self, user: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, fused: bool) -> None:
        self.user, self.fused = user, fused

    def pieces(self, out: torch.Tensor, y: torch.Tensor, parts: int = 1) -> torch.Tensor:
        if self.user is None:
            return member_cross_entropy(out, y) if self.fused else per_example_cross_entropy(out, y)
        n = y.shape[0]
        size = math.ceil(n / parts) if n > 1 else n
        cuts = [(i, min(i + size, n)) for i in range(0, n, size)]
        return torch.stack([self._mean(_rows(out, a, b, self.fused), y[a:b]) * (b - a) for a, b in cuts], dim=-1)

    def summed(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.user is None:
            return (member_cross_entropy(out, y).sum(1) if self.fused
                    else F.cross_entropy(out, y, reduction="sum"))
        return self._mean(out, y) * y.shape[0]

    def _mean(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return _scalar(self.user(out, y))
        return torch.stack([_scalar(self.user(o, y)) for o in out.unbind(0)])


def _rows(out: torch.Tensor, a: int, b: int, fused: bool) -> torch.Tensor:
    return out[:, a:b] if fused else out[a:b]


def _scalar(v: Any) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"workload.loss returned {shape}, not one number; return the batch's mean loss")
    return v.reshape(())
