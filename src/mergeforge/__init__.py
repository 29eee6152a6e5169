"""mergeforge: deep model fusion — streaming merges, every merge method, and a benchmark.

The public API is imported lazily so that ``import mergeforge`` stays light (no transformers).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "merge", "plan_recipe"]


def __getattr__(name: str):  # PEP 562: lazy public API
    if name == "load":  # mergeforge.load(DIR, task=None): a model written by `mergeforge fuse`
        from mergeforge.loading import load

        return load
    if name in ("merge", "plan_recipe"):
        from mergeforge.engine import merge as _merge

        return getattr(_merge, name)
    raise AttributeError(f"module 'mergeforge' has no attribute {name!r}")
