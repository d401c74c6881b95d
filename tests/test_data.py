"""Data sets: the real CIFAR-10 loader on an archive written in CIFAR-10's format, digits, synthetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bstune.errors import BstuneError
from bstune.spec import Workload
from bstune.train import CIFAR10_DIR, TrainConfig, augment_images, load_cifar10, load_dataset, needs_download, train
from tests.cifar_archive import write_cifar10


def test_cifar10_loader_reads_the_archive(tmp_path: Path) -> None:
    data, labels = write_cifar10(tmp_path, per_batch=20, n_test=30)
    ds = load_cifar10(tmp_path)
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.val_x.shape == (30, 3, 32, 32)
    assert ds.train_y[:20].tolist() == labels
    # CIFAR-10 rows hold the red plane first: pixel (0, 0) of channel c is at index c * 1024.
    for c in range(3):
        assert ds.train_x[0, c, 0, 0].item() == data[0, c * 1024]
        assert ds.train_x[3, c, 31, 31].item() == data[3, c * 1024 + 1023]
    assert ds.augment and ds.mean is not None and ds.num_classes == 10


@pytest.mark.slow
def test_cifar10_trains_a_cnn_on_the_archive(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    ds = load_dataset(Workload(dataset="cifar10", data_dir=str(tmp_path), model="resnet"))
    history = train(TrainConfig(batch_size=32, lr=0.05, momentum=0.9, epochs=2, model="resnet", width=8), ds)
    assert len(history) == 2 and history[-1].examples_seen == 200
    assert all(torch.isfinite(torch.tensor(h.val_loss)) for h in history)


def test_cifar10_missing_or_broken(tmp_path: Path) -> None:
    with pytest.raises(BstuneError, match="no CIFAR-10 data"):
        load_cifar10(tmp_path)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(BstuneError, match="cannot read CIFAR-10"):
        load_cifar10(tmp_path)


def test_needs_download_only_where_a_file_is_missing(tmp_path: Path) -> None:
    w = Workload(dataset="cifar10", model="cnn", data_dir=str(tmp_path), download=True)
    assert needs_download(w)
    write_cifar10(tmp_path)
    assert not needs_download(w)
    (tmp_path / CIFAR10_DIR / "data_batch_3").unlink()  # an interrupted download
    assert needs_download(w)
    assert not needs_download(Workload(dataset="cifar10", model="cnn", data_dir=str(tmp_path), download=False))
    assert not needs_download(Workload(dataset="digits"))


def test_digits_split_is_fixed() -> None:
    a = load_dataset(Workload(dataset="digits"))
    b = load_dataset(Workload(dataset="digits", seed=5))
    assert a.n_train + a.val_x.shape[0] == 1797
    assert torch.equal(a.val_y, b.val_y)  # the trial seed never changes the validation set
    assert a.input_shape == (1, 8, 8)


def test_augmentation_crops_and_flips_on_device() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = augment_images(x, pad=1, generator=g)
    assert out.shape == x.shape
    # Every output row is a shifted (possibly flipped) window of the reflect-padded input.
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    for i in range(2):
        found = any(
            torch.equal(out[i, 0], w) or torch.equal(out[i, 0], w.flip(-1))
            for dy in range(3) for dx in range(3) for w in [padded[i, 0, dy:dy + 4, dx:dx + 4]]
        )
        assert found


def test_digits_read_from_scikit_learns_file_are_load_digits() -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    from bstune.train.data import digits_arrays

    images, target = digits_arrays()
    ref = load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, ref.images)
    assert np.array_equal(target, ref.target)
