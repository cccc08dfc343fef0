"""featstore: stream frozen-backbone token features of Algonauts/NSD stimuli into chunked Zarr stores.

The public API is re-exported here and loaded on first use, so `import featstore` (and commands that run no model,
such as `featstore info`) never import torch or dask.
"""
from __future__ import annotations

from ._lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "ExtractConfig": "extraction",
    "ExtractResult": "extraction",
    "extract": "extraction",
    "get_backbone": "backbones",
    "list_backbones": "backbones",
    "FeatstoreError": "errors",
    "export_npy": "export",
    "read_subject": "layout",
    "make_sample_subject": "sample",
    "FeatureArray": "storage",
    "FeatureStore": "storage",
    "FeatureDataset": "dataset",
    "train_val_split": "dataset",
    "feature_stats": "stats.reduce",
    "load_feature_stats": "stats.persist",
    "sweep": "encoding.layerwise",
    **dict.fromkeys(("format_info", "format_stats", "plot_stats", "plot_token_maps", "pca_rgb"), "stats.report"),
}

__all__ = [*sorted(_LAZY), "__version__"]  # noqa: PLE0604


__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return __all__
