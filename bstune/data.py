"""Temporary: the names study.py and cli.py import from here, until they import them from bstune.train."""

from bstune.train import CIFAR10_TRAIN, Dataset, load_dataset, needs_download

__all__ = ["CIFAR10_TRAIN", "Dataset", "load_dataset", "needs_download"]
