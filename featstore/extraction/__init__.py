"""Extraction: config.py (ExtractConfig, the flags' single source) -> api.py (`extract`: checks, then per split)
-> plan.py (what each array lacks) -> run.py (loader -> backbone -> writer.py, on this process) or cluster.py (the
same units as dask tasks); launcher.py reads SLURM/torchrun shares; images.py checks and decodes the images.
Names load on first use, so the command line builds its parser from ExtractConfig without PIL or torch."""
from __future__ import annotations

from importlib import import_module

_LAZY = {"extract": "api", "ExtractConfig": "config", "ExtractResult": "plan", "PlannedArray": "plan",
         "SplitSummary": "plan"}

__all__ = [*sorted(_LAZY)]  # noqa: PLE0604


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
