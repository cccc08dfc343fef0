"""Extraction: config.py (ExtractConfig, the flags' single source) -> api.py (`extract`: checks, then per split)
-> plan.py (what each array lacks) -> run.py (loader -> backbone -> writer.py, on this process) or cluster.py (the
same units as dask tasks); launcher.py reads SLURM/torchrun shares; images.py checks and decodes the images."""
from __future__ import annotations

from .api import extract
from .config import ExtractConfig
from .plan import ExtractResult, PlannedArray, SplitSummary

__all__ = ["ExtractConfig", "ExtractResult", "PlannedArray", "SplitSummary", "extract"]
