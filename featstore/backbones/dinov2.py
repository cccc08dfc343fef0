"""DINOv2 ViTs (timm modules, official or timm weights): `dinov2` (normed block tokens), `dinov2_q` (block queries).

The positional embedding is resized with the reference DINOv2 recipe (bicubic, scale factor (g + 0.1) / M, no
antialias), not timm's `resample_abs_pos_embed` (output size, antialias): at 434 px the two differ by ~1%, and only the
reference matches the features of the official torch.hub model that the legacy pipeline used.

timm names used beyond `timm.create_model` / `timm.models.get_pretrained_cfg` (checked against timm 1.0.31, the
upper bound in setup.cfg): `timm.models.vision_transformer.VisionTransformer` (the tiny test model) and
`.checkpoint_filter_fn` (official -> timm key layout); the module attributes `blocks`, `patch_embed`, `pos_embed`,
`cls_token`, `norm` and each block's `attn.qkv`.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from ..errors import BadArgumentError, WeightsError
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHTS_HINT,
    Backbone,
    Preprocess,
    check_weights_arg,
    hf_hub_file,
    load_state_dict_file,
    load_strict,
    one_line,
    seeded_init,
    sha256_file,
    url_reachable,
)
from .registry import BackboneConfig, LayerSpec, backbone_config, is_tiny, make_outputs, parse_layers, tiny_depth

log = logging.getLogger(__name__)

# A DINOv2-shaped ViT small enough for tests (--arch tiny; tiny-dN for N blocks): patch 14, 37x37 position grid
# (518 px), layer scale.
TINY = {"img_size": 518, "patch_size": 14, "embed_dim": 48, "depth": 3, "num_heads": 3, "init_values": 1e-5}


def interpolate_pos_encoding(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Position embedding [1, P + M*M, C] for a (gh, gw) patch grid, exactly as facebookresearch/dinov2 does it.

    Bicubic with scale factor ((g + 0.1) / M) (the operator uses the scale, not only the output size), no
    antialias, in float32; returned unchanged for the native M x M grid.
    """
    n = pos_embed.shape[1] - num_prefix
    m = int(math.sqrt(n))
    if m * m != n:
        raise BadArgumentError(f"position embedding of {n} patches is not a square grid")
    gh, gw = grid
    if (gh, gw) == (m, m):
        return pos_embed
    pe = pos_embed.float()
    patch = pe[:, num_prefix:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(
        patch, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic", antialias=False
    )
    if tuple(patch.shape[-2:]) != (gh, gw):  # cannot happen for g >= 1; guards the scale-factor kludge
        raise BadArgumentError(f"position embedding interpolation gave {tuple(patch.shape[-2:])}, not {(gh, gw)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    return torch.cat([pe[:, :num_prefix], patch], dim=1).to(pos_embed.dtype)


class _StopForward(Exception):
    """Raised by the query hook: the rest of the block is not needed."""


@dataclass
class DinoV2(Backbone):
    """timm VisionTransformer run block by block: patch embed, reference pos-embed, blocks[:deepest + 1].

    Not timm's `forward_intermediates`: it adds the position embedding with timm's own resampling (see the module
    docstring), and it cannot stop inside a block at its qkv projection. The loop over `blocks` and the final `norm`
    are what `forward_intermediates(norm=True)` runs; a test checks the two agree at the native grid.
    """

    patch_size: int = 14

    def token_shape(self, input_hw: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
        gh, gw = input_hw[0] // self.patch_size, input_hw[1] // self.patch_size
        if gh < 1 or gw < 1:
            raise BadArgumentError(f"input {tuple(input_hw)} is smaller than one {self.patch_size}px patch")
        return 1 + gh * gw, int(self.module.embed_dim), (gh, gw)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens entering block 0: [CLS, patches] + interpolated position embedding."""
        m = self.module
        x = m.patch_embed(x)  # dynamic_img_size: NHWC grid
        b, gh, gw, c = x.shape
        x = torch.cat([m.cls_token.expand(b, -1, -1), x.reshape(b, gh * gw, c)], dim=1)
        x = x + interpolate_pos_encoding(m.pos_embed, (gh, gw))
        return m.norm_pre(m.patch_drop(m.pos_drop(x)))  # identities in eval mode for DINOv2

    @torch.no_grad()
    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.module
        heads = {o.backbone: backbone_config(o.backbone).head for o in self.outputs}
        want = {h: {o.layer for o in self.outputs if heads[o.backbone] == h} for h in ("qkv.query", "norm")}
        deepest = max(self.layers)
        taken: dict[tuple[str, int], torch.Tensor] = {}
        x = self.embed(x.to(device=m.cls_token.device, dtype=m.cls_token.dtype))
        for i, blk in enumerate(m.blocks[: deepest + 1]):
            if i in want["qkv.query"]:
                stop = i == deepest and i not in want["norm"]  # nothing needs the rest of this block
                taken["qkv.query", i], x = _block_queries(blk, x, stop)
            else:
                x = blk(x)
            if i in want["norm"]:
                taken["norm", i] = m.norm(x).float()
        return {o.feature: taken[heads[o.backbone], o.layer] for o in self.outputs}


def _block_queries(blk: torch.nn.Module, x: torch.Tensor, stop: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Queries of `blk` (qkv[..., :C]; channels are [q | k | v], heads concatenated) taken from the block's own
    forward by a hook, and the block output (None when `stop`: the block ends at its qkv projection).

    A contiguous copy, so the k and v channels are not kept alive when many layers are taken.
    """
    dim = x.shape[-1]
    taken: dict[str, torch.Tensor] = {}
    me = threading.get_ident()

    def hook(_mod: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
        if threading.get_ident() != me:  # another thread's forward through the same module
            return
        taken["q"] = out[..., :dim].float().contiguous()
        if stop:
            raise _StopForward

    handle = blk.attn.qkv.register_forward_hook(hook)
    try:
        y = blk(x)
    except _StopForward:
        y = None
    finally:
        handle.remove()
    return taken["q"], y


def _build_module(arch: str) -> torch.nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if is_tiny(arch):  # tiny-dN: N blocks instead of TINY's
        model = VisionTransformer(num_classes=0, dynamic_img_size=True, **{**TINY, "depth": tiny_depth(arch) or TINY["depth"]})
    else:
        if not timm.is_model(arch):
            raise BadArgumentError(f"unknown --arch {arch!r} for dinov2: not a timm model name")
        img = timm.models.get_pretrained_cfg(arch).input_size[-1]
        model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img, dynamic_img_size=True)
    if not isinstance(model, VisionTransformer) or model.cls_token is None:
        raise BadArgumentError(f"--arch {arch!r} is not a timm VisionTransformer with a CLS token")
    if model.num_reg_tokens or model.no_embed_class:
        raise BadArgumentError(f"--arch {arch!r} has register tokens; only DINOv2 models without registers are supported")
    return model


def _to_timm_layout(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Official DINOv2 (mask_token, w12/w3) or timm layout -> timm keys; a different grid is an error, not a resize."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    pe = state_dict.get("pos_embed")
    if pe is not None and pe.shape != model.pos_embed.shape:
        raise WeightsError(
            f"weights {source} have pos_embed {tuple(pe.shape)}, the architecture {tuple(model.pos_embed.shape)}"
        )
    return checkpoint_filter_fn(dict(state_dict), model)


def _pretrained(arch: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Official checkpoint (torch hub cache/URL), else timm's hub weights; never random."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    tried = []
    if cfg is not None and cfg.url:
        name = os.path.basename(urlparse(cfg.url).path)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / name
        if cached.is_file() or url_reachable(cfg.url):
            try:
                sd = torch.hub.load_state_dict_from_url(
                    cfg.url, map_location="cpu", weights_only=True, progress=False, file_name=name
                )
                log.info("loaded official DINOv2 weights %s", cached)
                return sd, {"kind": "pretrained", "name": name, "sha256": sha256_file(cached)}
            except Exception as e:  # noqa: BLE001 - fall back to the timm hub
                tried.append(f"{cfg.url}: {one_line(e)}")
        else:
            tried.append(f"{cfg.url}: unreachable")
    if cfg is not None and cfg.hf_hub_id:
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        try:
            path = hf_hub_file(cfg.hf_hub_id, files)
            log.info("loaded timm DINOv2 weights %s", path)
            return load_state_dict_file(path), {"kind": "pretrained", "name": cfg.hf_hub_id, "sha256": sha256_file(path)}
        except (OSError, WeightsError) as e:
            tried.append(f"hf-hub {cfg.hf_hub_id}: {one_line(e)}")
    reason = "; ".join(tried) if tried else "timm knows no pretrained source"
    raise WeightsError(f"cannot get pretrained weights for {arch} ({reason}); {WEIGHTS_HINT}")


def build(
    configs: list[BackboneConfig], *, layer: LayerSpec, weights: str, arch: str | None, seed: int,
    image_size: int | None,
) -> DinoV2:
    """One timm ViT with its preprocessing, serving every requested (variant, layer)."""
    arch = arch or configs[0].default_arch
    check_weights_arg(weights, arch)
    if weights == "random":
        seeded_init(seed)
    model = _build_module(arch)
    num_layers = len(model.blocks)
    layers = parse_layers(layer, num_layers)
    if weights == "random":
        identity: dict[str, Any] = {"kind": "random", "seed": int(seed)}
    else:
        if weights == "pretrained":
            sd, identity = _pretrained(arch)
            source = f"{identity['name']} (pretrained)"
        else:
            sd, source = load_state_dict_file(weights), weights
            identity = {"kind": "file", "name": Path(weights).name, "sha256": sha256_file(weights)}
        load_strict(model, _to_timm_layout(sd, model, source), source)
    model.eval().requires_grad_(False)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    patch = model.patch_embed.patch_size[0]
    pre = Preprocess(
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        resize=image_size,
        interpolation="bicubic",
        pad_multiple=patch,
    )
    return DinoV2(
        arch=arch, num_layers=num_layers, preprocess=pre, weights=identity, module=model,
        outputs=make_outputs(configs, layers, num_layers), patch_size=patch,
    )
