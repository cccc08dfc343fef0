"""The reference consumers of a feature store: brain encoders trained on stored features (issue 9).

ROI masks -> readout (rois.py) -> models (models.py) -> training loop (train.py) -> scores and files (metrics.py).
Features are read only through `featstore.FeatureDataset`; nothing here knows how the store is laid out. Names load
on first use, so the command line can check its flags without importing torch.

`sweep` (sweep.py: which stored layer predicts which ROI, a ridge per layer) is imported at once: the function shares
its module's name, and importing the module later would otherwise leave `featstore.encoding.sweep` naming the module.
sweep.py imports numpy only at load (not torch, zarr or himalaya).
"""
from __future__ import annotations

from importlib import import_module

from .sweep import SweepConfig, SweepResult, project_tokens, sweep

_LAZY = {
    "ENCODER_ARCHS": "names",
    "FEATURE_ALIASES": "names",
    "READOUTS": "rois",
    "ROI_CLASSES": "rois",
    "Readout": "rois",
    "SubjectRois": "rois",
    "load_rois": "rois",
    "make_readout": "rois",
    "EncoderConfig": "models",
    "LinearBrainEncoder": "models",
    "TransformerBrainEncoder": "models",
    "build_encoder": "models",
    "pearson_r": "metrics",
    "plot_roi_r": "metrics",
    "save_submission": "metrics",
    "summarize": "metrics",
    "write_metrics": "metrics",
    "EncodingResult": "train",
    "EpochStats": "train",
    "PermutedTargets": "train",
    "TrainConfig": "train",
    "channels_last_collate": "train",
    "predict": "train",
    "resolve_device": "train",
    "train_encoder": "train",
    "train_one_epoch": "train",
}

__all__ = [*_LAZY, "SweepConfig", "SweepResult", "project_tokens", "sweep"]  # noqa: PLE0604


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'featstore.encoding' has no attribute {name!r}")
