"""Names the training command line accepts, kept free of torch so that a mistyped flag is refused at once."""
from __future__ import annotations

ENCODER_ARCHS = ("transformer", "linear")
POSITION_EMBEDDINGS = ("sine", "learned")
# the guide's --saved_feats names -> stored feature names
FEATURE_ALIASES = {"dinov2q": "dinov2_q_last", "dinov2": "dinov2_last", "clip": "clip_vit_512"}
