"""Backbone registry, in the spirit of timm's `create_model`: `get_backbone("dinov2_q", layer=-1, weights=...)`."""
from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from ..errors import UnknownBackboneError
from .base import Backbone, Preprocess, feature_name, resolve_layer

_REGISTRY: dict[str, Callable[..., Backbone]] = {}
# name -> module of its family; imported on first use so that commands that build no model never import timm/open_clip
_FAMILIES = {"dinov2_q": "dinov2", "dinov2": "dinov2", "clip": "clip"}


def register(name: str):
    def deco(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(set(_FAMILIES) | set(_REGISTRY))


def get_backbone(
    name: str,
    layer: int = -1,
    weights: str = "pretrained",
    arch: str | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> Backbone:
    """Build a frozen backbone in eval mode on CPU.

    weights: "pretrained" (official weights; an error if they cannot be fetched), "random" (explicit, seeded),
    or a path to a local checkpoint. arch: another timm/open_clip architecture, or "tiny" for tests.
    """
    if name in _FAMILIES and name not in _REGISTRY:
        import_module(f".{_FAMILIES[name]}", __name__)
    if name not in _REGISTRY:
        raise UnknownBackboneError(f"unknown --backbone {name!r}; choose one of: {', '.join(list_backbones())}")
    return _REGISTRY[name](layer=layer, weights=weights, arch=arch, seed=seed, image_size=image_size)


from . import clip, dinov2  # noqa: F401  (registers the families)

__all__ = ["Backbone", "Preprocess", "feature_name", "get_backbone", "list_backbones", "register", "resolve_layer"]
