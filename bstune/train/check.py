"""A user's model and loss checked on one batch before any trial: the model builds, its outputs fit the loss,
the loss has a gradient; and whether its trials can be fused (`func_stacked.why_not_fusable`)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from bstune import entry
from bstune.errors import BstuneError
from bstune.spec import Workload
from bstune.train.data import Dataset
from bstune.train.func_stacked import why_not_fusable
from bstune.train.models import build_model
from bstune.train.user import Loss


def check_model(w: Workload, data: Dataset) -> torch.nn.Module:
    """Build the workload's model (seeded, as a trial does) and push one small training batch through it and the
    loss, backward included; BstuneError naming the field and the fix if any of it fails. Returns the model."""
    if data.num_classes == 0 and w.loss is None:
        raise BstuneError("workload.loss: the data set's targets are not class labels (integers), so the default "
                          "cross-entropy does not apply; give workload.loss: FILE.py:FUNC (e.g. mean squared error)")
    torch.manual_seed(w.seed)
    try:
        model = build_model(w.model, data.input_shape, data.num_classes, w.width)
    except BstuneError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's function failed: one line, before any trial
        raise BstuneError(f"workload.model: building it raised {_said(e)}; fix {entry.name_of(w.model)}") from None
    x, y = _batch(data)
    try:
        out = copy.deepcopy(model).train()(x)
    except Exception as e:  # noqa: BLE001
        raise BstuneError(f"workload.model: its forward pass on a batch of inputs {tuple(x.shape)} raised "
                          f"{_said(e)}; make the model take the data set's inputs") from None
    user = None if w.loss is None else entry.load(w.loss, "workload.loss")
    try:
        loss = Loss(user, fused=False).summed(out, y)
        loss.backward()
    except Exception as e:  # noqa: BLE001
        field = "workload.loss" if user is not None else "workload.model"
        fix = ("return (N, number of classes) logits" if user is None
               else "make the loss take (outputs, targets) to one number")
        raise BstuneError(f"{field}: the model's outputs {_shape(out)} do not fit the loss with targets "
                          f"{_shape(y)} ({_said(e)}); {fix}") from None
    return model


def fusable(w: Workload, data: Dataset, device_type: str = "cpu", asked: bool = False) -> str | None:
    """None if the workload's model should train several trials as one; else why not, in one line. On a CPU a
    convolutional model is not fused unless `asked` (execution.fuse): its members measured no faster there
    (benchmarks/own_model_fused.py, MNIST-1D's CNN: 0.8-1.0x)."""
    torch.manual_seed(w.seed)
    model = build_model(w.model, data.input_shape, data.num_classes, w.width)
    conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    if device_type == "cpu" and not asked and conv:
        return "a convolutional model on a CPU, where fused members measured no faster; execution.fuse: K fuses it"
    why = why_not_fusable(model, _batch(data)[0])
    return None if why is None else f"the model cannot be fused ({why})"


def _batch(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(8, data.n_train)
    x = data.train_x[:n]
    if data.mean is not None:  # stored uint8 images, normalised on the device in training
        x = x.float()
    return x, data.train_y[:n]


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _said(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
