"""Backbone registry, in the spirit of timm's `create_model`: `get_backbone("dinov2_q", layer=-1, weights=...)`.

Importing this package, `list_backbones()` and the layer/name parsers load no torch, timm or open_clip: the CLI
builds its parser from them. The family modules (dinov2.py, clip.py) load when a backbone is built.
"""
from __future__ import annotations

from importlib import import_module

from .registry import (
    BackboneConfig,
    Output,
    backbone_config,
    check_layer_spec,
    feature_name,
    get_backbone,
    list_backbones,
    parse_backbones,
    parse_layers,
    resolve_layer,
)

_LAZY = {"Backbone": "base", "Preprocess": "preprocess"}

__all__ = [
    "Backbone",
    "BackboneConfig",
    "Output",
    "Preprocess",
    "backbone_config",
    "check_layer_spec",
    "feature_name",
    "get_backbone",
    "list_backbones",
    "parse_backbones",
    "parse_layers",
    "resolve_layer",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
