"""Extraction: config.py (ExtractConfig, the flags' single source) -> api.py (`extract`: checks, then per split)
-> plan.py (what each array lacks) -> run.py (loader -> backbone -> writer.py, on this process) or cluster.py (the
same units as dask tasks); launcher.py reads SLURM/torchrun shares; images.py checks and decodes the images.
Names load on first use, so the command line builds its parser from ExtractConfig without PIL or torch."""
from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {"extract": "api", "ExtractConfig": "config", "ExtractResult": "plan", "PlannedArray": "plan",
         "SplitSummary": "plan"}

__all__ = [*sorted(_LAZY)]  # noqa: PLE0604


__getattr__ = lazy_getattr(__name__, _LAZY)
