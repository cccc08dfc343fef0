"""The backbone registry as data, without torch: names, their family and outputs, layer and name parsing.

Shaped like timm's registry (one config per name, one builder per family), but the configs live here and the family
modules (which import torch, timm, open_clip) load only when a backbone is built, so the CLI can list the names and
check `--backbone` / `--enc_layer` without importing torch.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadArgumentError, UnknownBackboneError, WeightsError

LayerSpec = int | str | Sequence[int]


@dataclass(frozen=True)
class BackboneConfig:
    """One registered name. Names of one `family` are outputs of the same model, so one forward pass serves them all.

    head: what is applied to the output of block `layer` (recorded in the provenance);
    legacy_last: the store name of the last layer (other layers are "{name}_layer{k}").
    """

    name: str
    family: str
    default_arch: str
    head: str
    legacy_last: str
    summary: str


_CONFIGS: dict[str, BackboneConfig] = {
    c.name: c
    for c in (
        BackboneConfig("dinov2_q", "dinov2", "vit_base_patch14_dinov2.lvd142m", "qkv.query", "dinov2_q_last",
                       "DINOv2 ViT-B/14 (timm): query part of blocks[layer].attn.qkv, heads concatenated"),
        BackboneConfig("dinov2", "dinov2", "vit_base_patch14_dinov2.lvd142m", "norm", "dinov2_last",
                       "DINOv2 ViT-B/14 (timm): output of blocks[layer] through the final LayerNorm"),
        BackboneConfig("clip", "clip", "ViT-L-14", "ln_post+proj", "clip_vit_512",
                       "OpenCLIP ViT-L-14 (openai): output of resblocks[layer] through ln_post and proj"),
    )
}


@dataclass(frozen=True)
class Output:
    """One (variant, layer) a backbone yields, and the store feature name it is written under."""

    backbone: str
    layer: int  # resolved, non-negative
    feature: str


def list_backbones() -> list[str]:
    return sorted(_CONFIGS)


def backbone_config(name: str) -> BackboneConfig:
    try:
        return _CONFIGS[name]
    except KeyError:
        raise UnknownBackboneError(f"unknown --backbone {name!r}; choose one of: {', '.join(list_backbones())}") from None


def parse_backbones(name: str | Sequence[str]) -> list[BackboneConfig]:
    """`"dinov2_q,dinov2"` or a list -> their configs, de-duplicated in order; they must share one model (family)."""
    items = name.split(",") if isinstance(name, str) else list(name)
    names = list(dict.fromkeys(str(n).strip() for n in items))
    if not names or "" in names:
        raise UnknownBackboneError(f"--backbone {name!r}: give one or more of: {', '.join(list_backbones())}")
    configs = [backbone_config(n) for n in names]
    families = sorted({c.family for c in configs})
    if len(families) > 1:
        raise BadArgumentError(
            f"--backbone {','.join(names)}: {' and '.join(families)} are different models and cannot share one "
            "forward pass; extract them in separate runs"
        )
    return configs


def resolve_layer(layer: int, num_layers: int) -> int:
    """The one place a layer index is interpreted: negative counts from the end, as timm does."""
    k = layer + num_layers if layer < 0 else layer
    if not 0 <= k < num_layers:
        raise BadArgumentError(
            f"--enc_layer {layer} is out of range for a backbone with {num_layers} blocks "
            f"(use 0..{num_layers - 1} or -1..-{num_layers})"
        )
    return k


def _bad_spec(spec: object) -> BadArgumentError:
    return BadArgumentError(
        f"--enc_layer {spec!r}: expected a block index (-1), a list (-1,-4,6), a range (0:12) or 'all'"
    )


def _parse_int(text: str, spec: object) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad_spec(spec) from None


def _spec_items(spec: LayerSpec) -> list[int | slice]:
    """Syntax only (no model needed): ints and slices; 'all' is slice(None)."""
    if isinstance(spec, bool):
        raise _bad_spec(spec)
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        if parts == ["all"]:
            return [slice(None)]
        items: list[int | slice] = []
        for p in parts:
            if ":" in p:
                bounds = p.split(":")
                if len(bounds) > 3:
                    raise _bad_spec(spec)
                a, b, *c = (_parse_int(x, spec) if x.strip() else None for x in bounds)
                if c and c[0] == 0:
                    raise _bad_spec(spec)
                items.append(slice(a, b, c[0] if c else None))
            else:
                items.append(_parse_int(p, spec))
        return items
    if isinstance(spec, Sequence) and spec and all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
        return list(spec)
    raise _bad_spec(spec)


def _resolve_slice(s: slice, num_layers: int, spec: object) -> list[int]:
    """Python range semantics with negative bounds counted from the end; bounds past the model are an error."""
    start, stop = s.start, s.stop
    if start is not None:
        start = resolve_layer(start, num_layers)
    if stop is not None:
        k = stop + num_layers if stop < 0 else stop
        if not 0 <= k <= num_layers:
            raise BadArgumentError(
                f"--enc_layer {spec!r}: range end {stop} is out of range for a backbone with {num_layers} blocks"
            )
        stop = k
    ks = list(range(num_layers))[slice(start, stop, s.step)]
    if not ks:
        raise BadArgumentError(f"--enc_layer {spec!r} selects no block of a backbone with {num_layers} blocks")
    return ks


def check_layer_spec(spec: LayerSpec) -> None:
    """Syntax of a layer spec, before the model (and so its number of blocks) is known; ranges are checked later."""
    _spec_items(spec)


def parse_layers(spec: LayerSpec, num_layers: int) -> list[int]:
    """`-1`, `[-1, -4, 6]`, `"-1,-4,6"`, `"0:12"`, `"all"` -> resolved block indices, de-duplicated, order kept."""
    ks: list[int] = []
    for item in _spec_items(spec):
        if isinstance(item, slice):
            ks.extend(_resolve_slice(item, num_layers, spec))
        else:
            ks.append(resolve_layer(item, num_layers))
    return list(dict.fromkeys(ks))


def feature_name(backbone: str, layer: int, num_layers: int) -> str:
    """Store/legacy feature folder name: the legacy name for the last layer, else {backbone}_layer{k}."""
    k = resolve_layer(layer, num_layers)
    cfg = _CONFIGS.get(backbone)
    if k == num_layers - 1 and cfg is not None:
        return cfg.legacy_last
    return f"{backbone}_layer{k}"


def make_outputs(configs: Sequence[BackboneConfig], layers: Sequence[int], num_layers: int) -> list[Output]:
    """Variants outer, layers inner, as requested."""
    return [Output(c.name, k, feature_name(c.name, k, num_layers)) for c in configs for k in layers]


WEIGHTS_HINT = "use --weights PATH for a local checkpoint or --weights random"


def check_weights_arg(weights: str, arch: str) -> None:
    """Fail before building anything: the weights argument must name a source; tiny archs have no pretrained ones."""
    if weights not in ("pretrained", "random") and not Path(weights).is_file():
        raise WeightsError(f"--weights {weights!r} is neither 'pretrained', 'random' nor an existing file")
    if is_tiny(arch) and weights == "pretrained":
        raise WeightsError(f"--arch {arch} has no pretrained weights; {WEIGHTS_HINT}")


_TINY = re.compile(r"tiny(?:-d([1-9][0-9]?))?")


def is_tiny(arch: str | None) -> bool:
    """Whether `arch` names the tiny random test architecture of a family: `tiny`, or `tiny-dN` (N blocks)."""
    return arch is not None and _TINY.fullmatch(arch) is not None


def tiny_depth(arch: str) -> int | None:
    """The blocks a tiny architecture name asks for (`tiny-d12` -> 12), None for plain `tiny` (the family's own)."""
    m = _TINY.fullmatch(arch)
    return int(m.group(1)) if m and m.group(1) else None
