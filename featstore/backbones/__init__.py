"""Backbone registry, in the spirit of timm's `create_model`: `get_backbone("dinov2_q", layer=-1, weights=...)`.

Importing this package, `list_backbones()` and the layer/name parsers load no torch, timm or open_clip: the CLI
builds its parser from them. The family modules (dinov2.py, clip.py) load when a backbone is built.
"""
from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module
from typing import TYPE_CHECKING

from .registry import (
    BackboneConfig,
    LayerSpec,
    Output,
    backbone_config,
    check_layer_spec,
    check_weights_arg,
    feature_name,
    list_backbones,
    parse_backbones,
    parse_layers,
    resolve_layer,
)

if TYPE_CHECKING:
    from .base import Backbone

_LAZY = {"Backbone": "base", "Preprocess": "preprocess"}

__all__ = [
    "Backbone",
    "BackboneConfig",
    "Output",
    "Preprocess",
    "backbone_config",
    "check_layer_spec",
    "check_weights_arg",
    "feature_name",
    "get_backbone",
    "list_backbones",
    "parse_backbones",
    "parse_layers",
    "resolve_layer",
]


def get_backbone(
    name: str | Sequence[str],
    layer: LayerSpec = -1,
    weights: str = "pretrained",
    arch: str | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> Backbone:
    """Build a frozen backbone in eval mode on CPU, with its preprocessing.

    name: a registered name, or several of one family (`"dinov2_q,dinov2"`, a list) served by one forward pass.
    layer: anything `parse_layers` accepts. weights: "pretrained" (official weights; an error if they cannot be
    fetched), "random" (explicit, seeded), or a path to a local checkpoint. arch: another timm/open_clip
    architecture, or "tiny" for tests.
    """
    configs = parse_backbones(name)
    check_layer_spec(layer)  # a typo in --enc_layer fails before a model is built
    family = import_module(f"{__name__}.{configs[0].family}")
    return family.build(configs, layer=layer, weights=weights, arch=arch, seed=seed, image_size=image_size)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
