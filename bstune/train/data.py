"""Data sets as in-memory tensors: digits (ships with scikit-learn), CIFAR-10 (torchvision) and synthetic.

Everything is held as one tensor per split so that a trainer can move it to the device once and slice
batches from it; there are no DataLoader workers and no per-batch host-to-device copies.
"""

from __future__ import annotations

import importlib.util
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bstune import entry, registry
from bstune.errors import BstuneError
from bstune.spec import Workload
from bstune.train.user import user_tensors

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Dataset:
    """Train and validation tensors. Images are (N, C, H, W): uint8 with `mean`/`std` set (normalised on the
    device, batch by batch), or float32 already normalised. Tabular data is (N, D) float32."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int  # 0: the targets are not class labels (a user's regression, say): no accuracy
    augment: bool = False  # random crop with padding + horizontal flip, done on the device
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every tensor on `device` (a no-op for tensors already there)."""
        return replace(
            self,
            train_x=self.train_x.to(device), train_y=self.train_y.to(device),
            val_x=self.val_x.to(device), val_y=self.val_y.to(device),
        )


def load_dataset(workload: Workload) -> Dataset:
    """Load the workload's data set, a built-in (`registry.DATASETS`) or a user's entry point; raise
    BstuneError naming `workload.dataset`/`data_dir` if it is absent or has the wrong shape. With no data set
    (a trainer of one's own without one), an empty one."""
    name = workload.dataset
    if name == "":
        empty = torch.zeros(0)
        return Dataset("", empty, empty, empty, empty, num_classes=0)
    if isinstance(name, str) and name in registry.DATASETS:
        ds = entry.load(registry.DATASETS[name], "workload.dataset")(workload)
    else:
        fn = entry.load(name, "workload.dataset")
        try:
            returned = entry.call(fn, {"seed": workload.seed, "val_fraction": workload.val_fraction})
        except Exception as e:  # noqa: BLE001 - the user's function failed: one line, before any trial
            raise BstuneError(f"workload.dataset: {entry.name_of(name)} raised {type(e).__name__}: {e}; fix "
                              f"it") from None
        ds = Dataset(entry.name_of(name), *user_tensors(entry.name_of(name), returned))
    if workload.n_train is not None and workload.n_train < ds.n_train:
        ds = replace(ds, train_x=ds.train_x[: workload.n_train], train_y=ds.train_y[: workload.n_train])
    if workload.augment is not None:
        ds = replace(ds, augment=workload.augment)  # applied to images only (loop.InputPipeline)
    return ds


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    # A fixed split (seed 0, whatever the trial seed): every trial is scored on the same validation set.
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_val = max(1, int(round(len(x) * val_fraction)))
    val, train = idx[:n_val], idx[n_val:]
    return x[train], y[train], x[val], y[val]


def digits(workload: Workload) -> Dataset:
    """scikit-learn's 1,797 8x8 digit images (shipped with it, no download)."""
    return _digits(workload.val_fraction)


def synthetic(workload: Workload) -> Dataset:
    """`synthetic_classification` with the workload's size (n_train, at least 64) and validation share."""
    return synthetic_classification(n=max(workload.n_train or 2000, 64), val_fraction=workload.val_fraction)


def cifar10(workload: Workload) -> Dataset:
    """CIFAR-10 from workload.data_dir (downloaded first with download: true)."""
    return load_cifar10(workload.data_dir, download=workload.download)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 8x8 images, 0..16; labels) as `load_digits` gives them, read from the file it
    ships without importing scikit-learn (which brings pandas and scipy: ~2 s of every study process's start)."""
    found = importlib.util.find_spec("sklearn")  # finds the package without running its __init__
    path = Path(found.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if found else None
    if path is None or not path.is_file():  # another layout: scikit-learn's own loader
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _digits(val_fraction: float) -> Dataset:
    images, target = digits_arrays()
    x = (images.astype(np.float32) / 16.0 - 0.5) / 0.5  # 8x8 greyscale, 0..16 -> -1..1
    x = x[:, None, :, :]
    y = target.astype(np.int64)
    xt, yt, xv, yv = _split(x, y, val_fraction)
    return Dataset("digits", torch.from_numpy(xt), torch.from_numpy(yt), torch.from_numpy(xv),
                   torch.from_numpy(yv), num_classes=10)


def synthetic_classification(
    n: int = 2000, n_features: int = 32, n_classes: int = 4, val_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """A small, learnable tabular problem (scikit-learn's make_classification), for tests."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n, n_features=n_features, n_informative=n_features // 2, n_redundant=0,
        n_classes=n_classes, n_clusters_per_class=2, class_sep=1.0, random_state=seed,
    )
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    xt, yt, xv, yv = _split(x, y.astype(np.int64), val_fraction, seed)
    return Dataset("synthetic", torch.from_numpy(xt), torch.from_numpy(yt), torch.from_numpy(xv),
                   torch.from_numpy(yv), num_classes=n_classes)


CIFAR10_DIR = "cifar-10-batches-py"  # torchvision's folder under data_dir
CIFAR10_TRAIN = 50_000  # training examples
CIFAR10_FILES = ("batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6)))


def needs_download(workload: Workload) -> bool:
    """Whether loading the workload's data would download it first (CIFAR-10 with download: true, and a file of
    it missing)."""
    folder = Path(workload.data_dir) / CIFAR10_DIR
    return (workload.dataset == "cifar10" and workload.download
            and not all((folder / name).is_file() for name in CIFAR10_FILES))


def load_cifar10(data_dir: str | Path, download: bool = False) -> Dataset:
    """CIFAR-10 through torchvision (its own on-disk format under data_dir/cifar-10-batches-py)."""
    from torchvision.datasets import CIFAR10

    root = Path(data_dir)
    if not download and not (root / CIFAR10_DIR).is_dir():
        raise BstuneError(
            f"workload.data_dir: no CIFAR-10 data under {root}/{CIFAR10_DIR}; "
            f"set workload.download: true or point data_dir at the folder holding it"
        )
    class _CIFAR10(CIFAR10):
        # torchvision checks every file's MD5 at each load (170 MB read twice). A download checks them
        # already; for data that is there, that the files exist and parse is enough (md5 None = exists).
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    cls = CIFAR10 if download else _CIFAR10
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise BstuneError(f"workload.data_dir: cannot read CIFAR-10 from {root} ({e}); "
                          f"re-download it or fix data_dir") from None

    def tensors(ds: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    xt, yt = tensors(train)
    xv, yv = tensors(test)
    return Dataset("cifar10", xt, yt, xv, yv, num_classes=10, augment=True, mean=CIFAR10_MEAN, std=CIFAR10_STD)
