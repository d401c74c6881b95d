"""bstune: find the batch size, learning rate and momentum to use, and how the learning rate moves with batch
size. From Python: `bstune.run_study(spec)` and `bstune.analyze_study(spec)` (bstune.api), loaded on first use
so that `import bstune.spec` stays light."""

from __future__ import annotations

from typing import Any

__all__ = ["analyze_study", "as_spec", "run_study"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bstune import api

        return getattr(api, name)
    raise AttributeError(f"module 'bstune' has no attribute {name!r}")
