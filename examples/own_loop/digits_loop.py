"""A training loop of one's own, tuned by bstune: plain PyTorch with a DataLoader and AdamW-style weight
decay on scikit-learn's digits. bstune picks (batch_size, lr, momentum); the loop reports each epoch and
stops when bstune says so."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _data() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 8.0 - 1.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)  # the same split for every trial
    idx = torch.randperm(len(x), generator=g)
    return TensorDataset(x[idx[:1400]], y[idx[:1400]]), TensorDataset(x[idx[1400:]], y[idx[1400:]])


def fit(trial) -> float:  # noqa: ANN001 - bstune's trial
    torch.manual_seed(trial.seed)
    torch.set_num_threads(1)  # a small model: extra threads only wait
    train, val = _data()
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))
    opt = torch.optim.SGD(net.parameters(), lr=trial.lr, momentum=trial.momentum,
                          weight_decay=trial.weight_decay)
    batches = DataLoader(train, batch_size=trial.batch_size, shuffle=True)
    seen, val_loss = 0, float("nan")
    for epoch in range(1, trial.epochs + 1):
        net.train()
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            seen += len(x)
        net.eval()
        with torch.no_grad():
            out = net(val.tensors[0])
            val_loss = nn.functional.cross_entropy(out, val.tensors[1]).item()
            accuracy = (out.argmax(1) == val.tensors[1]).float().mean().item()
        trial.report(epoch, val_loss, examples=seen, val_accuracy=accuracy)
        if trial.should_stop():
            break
    return val_loss
