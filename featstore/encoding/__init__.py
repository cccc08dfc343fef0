"""The reference consumers of a feature store: brain encoders trained on stored features.

ROI masks -> readout (rois.py) -> models (models.py) -> training loop (train.py) -> scores and files (metrics.py);
checkpoint.py loads featstore's and the reference training code's checkpoints into the models.
Features are read only through `featstore.FeatureDataset` (the checks before training ask the store's public
`FeatureArray`); nothing here knows how the store is laid out. Names load on first use, so the command line can
check its flags without importing torch.

The layer sweep: which stored layer predicts which ROI. sweep_config.py -> projection.py (the streamed, cached
projection of each layer) -> ridge.py (himalaya's RidgeCV per layer) -> layerwise.py (`sweep`) -> sweep_report.py.
"""
from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {
    "ENCODER_ARCHS": "names",
    "POSITION_EMBEDDINGS": "names",
    "FEATURE_ALIASES": "names",
    "READOUTS": "rois",
    "ROI_CLASSES": "rois",
    "Readout": "rois",
    "SubjectRois": "rois",
    "load_rois": "rois",
    "make_readout": "rois",
    "EncoderConfig": "config",
    "LinearBrainEncoder": "models",
    "TransformerBrainEncoder": "models",
    "build_encoder": "models",
    "LoadedCheckpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "pearson_r": "metrics",
    "plot_roi_r": "metrics",
    "save_submission": "metrics",
    "summarize": "metrics",
    "val_perf": "metrics",
    "write_metrics": "metrics",
    "EncodingResult": "train",
    "EpochStats": "train",
    "PermutedTargets": "train",
    "TrainConfig": "config",
    "channels_last_collate": "train",
    "predict": "train",
    "train_encoder": "train",
    "train_one_epoch": "train",
    "SweepConfig": "sweep_config",
    "SweepResult": "layerwise",
    "sweep": "layerwise",
    "project_tokens": "projection",
}

__all__ = [*_LAZY]  # noqa: PLE0604


__getattr__ = lazy_getattr(__name__, _LAZY)
