"""Names the training command line accepts, kept free of torch so that a mistyped flag is refused at once."""
from __future__ import annotations

from ..backbones.registry import backbone_config

ENCODER_ARCHS = ("transformer", "linear")
POSITION_EMBEDDINGS = ("sine", "learned")
# the guide's --saved_feats names -> stored feature names (the registry's names of each backbone's last layer)
FEATURE_ALIASES = {alias: backbone_config(name).legacy_last
                   for alias, name in (("dinov2q", "dinov2_q"), ("dinov2", "dinov2"), ("clip", "clip"))}
