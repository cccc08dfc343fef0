"""featstore: stream frozen-backbone token features of Algonauts/NSD stimuli into chunked Zarr stores.

The public API is re-exported here. The Dataset and the dask statistics load on first use (dask is heavy).
"""
from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

from .backbones import get_backbone, list_backbones
from .errors import FeatstoreError
from .export import export_npy
from .extract import ExtractResult, extract
from .layout import read_subject
from .sample import make_sample_subject
from .store import FeatureArray, FeatureStore

_LAZY = {
    "FeatureDataset": "dataset",
    "train_val_split": "dataset",
    "feature_stats": "stats",
    "load_feature_stats": "stats",
}

__all__ = [
    "ExtractResult",
    "FeatstoreError",
    "FeatureArray",
    "FeatureDataset",
    "FeatureStore",
    "__version__",
    "export_npy",
    "extract",
    "feature_stats",
    "get_backbone",
    "list_backbones",
    "load_feature_stats",
    "make_sample_subject",
    "read_subject",
    "train_val_split",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'featstore' has no attribute {name!r}")
