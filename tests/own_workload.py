"""A user's own workload, as a test's entry points name it: a small network with batch norm and dropout on
scikit-learn's wine data (178 examples, 13 features, 3 classes), a loss and a training loop of one's own."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(13, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


def data() -> tuple:
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    idx = np.random.default_rng(0).permutation(len(x))
    tr, va = idx[:140], idx[140:]
    train = torch.utils.data.TensorDataset(torch.from_numpy(x[tr]), torch.from_numpy(y[tr]))
    return train, (torch.from_numpy(x[va]), torch.from_numpy(y[va]))


def smooth_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, label_smoothing=0.1)


def trainer(trial) -> float:  # noqa: ANN001 - bstune's trial
    """A plain PyTorch loop: bstune gives the point and takes a report each epoch."""
    torch.manual_seed(trial.seed)
    (xt, yt), (xv, yv) = _tensors()
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=trial.lr, momentum=trial.momentum)
    seen = 0
    loss = math.inf
    for epoch in range(1, trial.epochs + 1):
        net.train()
        for idx in torch.randperm(len(xt)).split(trial.batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
            seen += len(idx)
        net.eval()
        with torch.no_grad():
            loss = nn.functional.cross_entropy(net(xv), yv).item()
        trial.report(epoch, loss, examples=seen)
        if trial.should_stop():
            break
    return loss


def _tensors() -> tuple:
    train, val = data()
    return train.tensors, val
