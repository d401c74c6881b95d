"""Temporary: the name study.py imports from here, until it imports it from bstune.tracking."""

from bstune.tracking import HISTOGRAM_ARTIFACT_DIR

__all__ = ["HISTOGRAM_ARTIFACT_DIR"]
