"""OpenCLIP vision towers (`clip`): CLS = the pooled, projected image embedding; patches = ln_post(tokens) @ proj.

Only the vision tower is kept (built by `open_clip.CLIP` from open_clip's model config, with a stub text tower);
preprocessing comes from open_clip's config for the pretrained tag (size, mean/std, interpolation, resize mode), so
the two cannot drift. Requested blocks come from open_clip's public `forward_intermediates`.

open_clip names used beyond its top-level API (checked against open_clip_torch 3.3.0, the only version the suite
has run on): `open_clip.transformer.VisionTransformer` (type check of the tower) and
`open_clip.transform.PreprocessCfg` / `merge_preprocess_dict` (the preprocessing of a pretrained tag).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BadArgumentError, WeightsError
from .base import (
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

DEFAULT_TAG = "openai"
# A CLIP-shaped vision tower small enough for tests: 224 px, patch 14 -> 16x16 grid, 2 heads of 32.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "patch_size": 14, "width": 64, "layers": 2, "head_width": 32},
}
# The text tower is never used; CLIP() needs one, so it gets the smallest that builds.
_TEXT_STUB = {"context_length": 1, "vocab_size": 1, "width": 8, "heads": 1, "layers": 1}


def _model_config(arch: str) -> dict[str, Any] | None:
    """open_clip's model config of `arch`, or TINY (with N layers for tiny-dN); None for an unknown name."""
    if not is_tiny(arch):
        import open_clip

        return open_clip.get_model_config(arch)
    depth = tiny_depth(arch)
    return TINY if depth is None else {**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": depth}}


@dataclass
class Clip(Backbone):
    """open_clip VisionTransformer through its `forward_intermediates`: ln_post on each requested block, then proj."""

    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (14, 14)

    def token_shape(self, input_hw: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
        if tuple(input_hw) != self.image_size:
            raise BadArgumentError(f"clip takes {self.image_size} inputs, got {tuple(input_hw)}")
        gh, gw = self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]
        return 1 + gh * gw, int(self.module.proj.shape[1]), (gh, gw)

    @torch.no_grad()
    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        v = self.module
        self.token_shape(tuple(x.shape[-2:]))
        layers = self.layers
        out = v.forward_intermediates(
            x.to(device=v.proj.device, dtype=v.proj.dtype), indices=layers, stop_early=True,
            normalize_intermediates=True, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True,
        )
        # 'tok' pooling: the pooled embedding is ln_post(x)[:, 0] @ proj, so one matmul gives CLS and patches.
        # Intermediates come in block order, which is `layers` (ascending).
        tokens = {
            k: (torch.cat([prefix, patches], dim=1) @ v.proj).float()
            for k, prefix, patches in zip(layers, out["image_intermediates_prefix"], out["image_intermediates"])
        }
        return {o.feature: tokens[o.layer] for o in self.outputs}


def _tag_for(arch: str) -> str | None:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    if DEFAULT_TAG in tags:
        return DEFAULT_TAG
    return tags[0] if tags else None


def _build_visual(arch: str, quick_gelu: bool) -> torch.nn.Module:
    """The vision tower of `open_clip.CLIP` built from open_clip's model config (the class and config that
    `open_clip.create_model` uses), with a one-layer stub text tower: featstore never uses the text tower, and the
    real one costs seconds of init and ~0.5 GB for ViT-L-14. The vision tower is built first, so random weights under
    a seed do not depend on the text config. Weights are loaded afterwards by featstore (`load_strict`), which is why
    `create_model`'s own weight resolution (and its "initialized randomly" warning) is not used.
    """
    import open_clip
    from open_clip.transformer import VisionTransformer

    cfg = _model_config(arch)
    if cfg is None:
        raise BadArgumentError(f"unknown --arch {arch!r} for clip: not an open_clip model name")
    model = open_clip.CLIP(
        embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=_TEXT_STUB,
        quick_gelu=cfg.get("quick_gelu", quick_gelu),
    )
    visual = model.visual
    if not (
        isinstance(visual, VisionTransformer)
        and visual.attn_pool is None
        and visual.pool_type == "tok"
        and not visual.final_ln_after_pool
        and visual.proj is not None
    ):
        raise BadArgumentError(f"--arch {arch!r} is not a CLS-pooled open_clip ViT; only those are supported")
    return visual


def _visual_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole-model (visual.*) or vision-tower-only state dict -> vision tower keys."""
    if any(k.startswith("visual.") for k in state_dict):
        return {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    return state_dict


def _pretrained(arch: str, tag: str) -> tuple[str, dict[str, Any]]:
    """Local path of open_clip's pretrained file (cache first, then open_clip's download), never random."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    tried = []
    hf, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hf:
        repo, fn = os.path.split(hf)  # 'org/name/' (default file) or 'org/name/file'
        fn = fn or "open_clip_pytorch_model.bin"
        stem, ext = os.path.splitext(fn)
        safe = "open_clip_model.safetensors" if fn == "open_clip_pytorch_model.bin" else stem + ".safetensors"
        files = [safe, fn] if ext in (".bin", ".pth") else [fn]  # safetensors first, as open_clip does
        try:
            path = hf_hub_file(repo, files, download=lambda: open_clip.download_pretrained(cfg, prefer_hf_hub=True))
            return path, {"kind": "pretrained", "name": f"{arch}/{tag}"}
        except OSError as e:
            tried.append(f"hf-hub {repo}: {one_line(e)}")
    if url:
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached.is_file() or url_reachable(url):
            try:
                path = open_clip.download_pretrained({"url": url}, prefer_hf_hub=False)
                return path, {"kind": "pretrained", "name": f"{arch}/{tag}"}
            except Exception as e:  # noqa: BLE001 - report below as one line
                tried.append(f"{url}: {one_line(e)}")
        else:
            tried.append(f"{url}: unreachable")
    reason = "; ".join(tried) if tried else "open_clip knows no source"
    raise WeightsError(f"cannot get pretrained weights for {arch}/{tag} ({reason}); {WEIGHTS_HINT}")


def build(
    configs: list[BackboneConfig], *, layer: LayerSpec, weights: str, arch: str | None, seed: int,
    image_size: int | None,
) -> Clip:
    """The OpenCLIP vision tower with open_clip's preprocessing for its pretrained tag, serving every requested layer."""
    arch = arch or configs[0].default_arch
    check_weights_arg(weights, arch)
    import open_clip

    if _model_config(arch) is None:
        raise BadArgumentError(f"unknown --arch {arch!r} for clip: not an open_clip model name")
    tag = None if is_tiny(arch) else _tag_for(arch)
    tag_cfg: dict[str, Any] = {}
    if tag is not None:
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    elif weights == "pretrained":
        raise WeightsError(f"open_clip has no pretrained tag for {arch}; {WEIGHTS_HINT}")
    if weights == "random":
        seeded_init(seed)
    # OpenAI weights were trained with QuickGELU; the tag's config says so (open_clip 3 no longer forces it).
    visual = _build_visual(arch, quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    num_layers = len(visual.transformer.resblocks)
    layers = parse_layers(layer, num_layers)
    size = tuple(visual.image_size)
    if image_size is not None and (image_size, image_size) != size:
        raise BadArgumentError(f"clip {arch} takes {size[0]}px images; --image_size {image_size} is not supported")
    pre = _preprocess(size, tag_cfg, arch)
    if weights == "random":
        identity: dict[str, Any] = {"kind": "random", "seed": int(seed)}
    else:
        if weights == "pretrained":
            path, identity = _pretrained(arch, tag)
            source = f"{identity['name']} ({path})"
        else:
            path, source = weights, weights
            identity = {"kind": "file", "name": Path(weights).name}
        log.info("loading clip weights from %s", path)
        load_strict(visual, _visual_keys(load_state_dict_file(path)), source)
        identity["sha256"] = sha256_file(path)
    visual.eval().requires_grad_(False)
    return Clip(
        arch=arch, num_layers=num_layers, preprocess=pre, weights=identity, module=visual,
        outputs=make_outputs(configs, layers, num_layers), image_size=size, patch_size=tuple(visual.patch_size),
    )


def _preprocess(size: tuple[int, int], tag_cfg: dict[str, Any], arch: str) -> Preprocess:
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    pp = merge_preprocess_dict(PreprocessCfg(size=size[0]), tag_cfg)
    common = {"mean": tuple(pp["mean"]), "std": tuple(pp["std"]), "resize": size[0], "interpolation": pp["interpolation"]}
    if size[0] == size[1] and pp["resize_mode"] == "shortest":
        return Preprocess(**common, resize_mode="shortest", crop=size[0])
    if size[0] == size[1] and pp["resize_mode"] == "squash":
        return Preprocess(**common, resize_mode="squash")
    raise BadArgumentError(f"clip {arch}: open_clip preprocessing {asdict(PreprocessCfg(**pp))} is not supported")


def clip_preprocess(arch: str | None = None) -> Preprocess:
    """The preprocessing `get_backbone("clip", arch=arch)` uses, from open_clip's configs, without building it."""
    import open_clip

    arch = arch or backbone_config("clip").default_arch
    cfg = _model_config(arch)
    if cfg is None:
        raise BadArgumentError(f"unknown --arch {arch!r} for clip: not an open_clip model name")
    size = cfg["vision_cfg"].get("image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    tag = None if is_tiny(arch) else _tag_for(arch)
    return _preprocess(size, open_clip.get_pretrained_cfg(arch, tag) if tag else {}, arch)
