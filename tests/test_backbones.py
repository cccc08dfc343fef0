"""Backbones: real (tiny, random) torch models; token layout, numerics against independent computations, weights.

Full-size architectures (random weights; no download is possible here) are marked `fullsize`.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featstore.backbones import feature_name, get_backbone, list_backbones
from featstore.backbones.base import sha256_file, url_reachable
from featstore.backbones.clip import clip_preprocess
from featstore.backbones.dinov2 import interpolate_pos_encoding
from featstore.errors import BadArgumentError, WeightsError

# The legacy DINOv2 input: a 425x425 stimulus zero-padded to 434 = 31 patches of 14.
IMAGE_HW = {"dinov2_q": (434, 434), "dinov2": (434, 434), "clip": (224, 224)}
TOKENS = {"dinov2_q": 962, "dinov2": 962, "clip": 257}
LAST_NAME = {"dinov2_q": "dinov2_q_last", "dinov2": "dinov2_last", "clip": "clip_vit_512"}


def _images(hw: tuple[int, int], n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *hw, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    """One tiny random backbone per registered name (seed 0, last layer), shared by read-only tests."""
    return {name: get_backbone(name, arch="tiny", weights="random", seed=0) for name in list_backbones()}


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty torch hub / Hugging Face / open_clip caches under tmp_path (torch, hf, home)."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.fixture
def no_weights_cache(empty_caches):
    """Empty caches and no network, so 'pretrained' has nowhere to get weights from."""
    import huggingface_hub.constants

    hosts = ["https://dl.fbaipublicfiles.com", huggingface_hub.constants.ENDPOINT, "https://openaipublic.azureedge.net"]
    if any(url_reachable(h, timeout=2.0) for h in hosts):
        pytest.skip("network reachable: 'pretrained' would download the weights")


# ---------------------------------------------------------------- the registry contract, for every backbone


def test_registry_names():
    assert {"dinov2_q", "dinov2", "clip"} <= set(list_backbones())


@pytest.mark.parametrize("name", list_backbones())
def test_tokens_shape_dtype_and_layout(tiny, name):
    bb = tiny[name]
    hw = IMAGE_HW[name]
    y = bb(_images(hw))
    T, C, grid = bb.token_shape(hw)
    assert y.dtype == torch.float32
    assert tuple(y.shape) == (2, T, C) and T == TOKENS[name] == 1 + grid[0] * grid[1]
    assert bb.cls_index == 0 and torch.isfinite(y).all()
    assert bb.layer == bb.num_layers - 1 and bb.feature == LAST_NAME[name]
    assert not bb.module.training and not any(p.requires_grad for p in bb.module.parameters())
    assert bb.device == torch.device("cpu")
    assert bb.preprocess.output_size((425, 425)) == hw
    json.dumps(bb.describe())  # provenance is JSON-serialisable
    assert bb.weights == {"kind": "random", "seed": 0}


@pytest.mark.parametrize("name", list_backbones())
def test_batch_independent(tiny, name):
    x = _images(IMAGE_HW[name], n=3)
    torch.testing.assert_close(tiny[name](x)[1:2], tiny[name](x[1:2]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list_backbones())
def test_random_weights_are_seeded(tiny, name):
    x = _images(IMAGE_HW[name], n=1)
    again = get_backbone(name, arch="tiny", weights="random", seed=0)
    other = get_backbone(name, arch="tiny", weights="random", seed=1)
    assert torch.equal(tiny[name](x), again(x))
    assert not torch.allclose(tiny[name](x), other(x))
    assert other.weights == {"kind": "random", "seed": 1}


@pytest.mark.parametrize("name", list_backbones())
def test_intermediate_layer(name):
    k = -2 + get_backbone(name, arch="tiny", weights="random").num_layers  # dinov2*: 1 of 3, clip: 0 of 2
    bb = get_backbone(name, arch="tiny", weights="random", layer=k)
    neg = get_backbone(name, arch="tiny", weights="random", layer=-2)
    assert bb.layer == neg.layer == k and bb.feature == f"{name}_layer{k}"
    x = _images(IMAGE_HW[name], n=1)
    y = bb(x)
    assert tuple(y.shape) == (1, *bb.token_shape(IMAGE_HW[name])[:2])
    assert torch.equal(y, neg(x))
    last = get_backbone(name, arch="tiny", weights="random", layer=-1)
    assert not torch.allclose(y, last(x))


@pytest.mark.parametrize("name", list_backbones())
def test_tiny_depth_by_name(tiny, name):
    """--arch tiny-dN: the tiny architecture with N blocks (plain tiny keeps its own); no pretrained weights, and
    N >= 1."""
    n = tiny[name].num_layers
    deeper = get_backbone(name, arch=f"tiny-d{n + 2}", weights="random", seed=0, layer=n - 1)
    assert deeper.num_layers == n + 2 and deeper.arch == f"tiny-d{n + 2}"
    assert get_backbone(name, arch=f"tiny-d{n}", weights="random", layer=0).num_layers == n
    with pytest.raises(WeightsError, match=f"--arch tiny-d{n + 2} has no pretrained weights"):
        get_backbone(name, arch=f"tiny-d{n + 2}", weights="pretrained")
    with pytest.raises(BadArgumentError, match="tiny-d0"):
        get_backbone(name, arch="tiny-d0", weights="random")


@pytest.mark.parametrize("name", list_backbones())
def test_layer_out_of_range(tiny, name):
    n = tiny[name].num_layers
    for layer in (n, -n - 1, 99):
        with pytest.raises(BadArgumentError, match="--enc_layer"):
            get_backbone(name, arch="tiny", weights="random", layer=layer)


@pytest.mark.parametrize("name", list_backbones())
def test_bad_arguments(name):
    with pytest.raises(WeightsError, match="--weights random"):
        get_backbone(name, arch="tiny", weights="pretrained")
    with pytest.raises(WeightsError, match="no-such-thing"):
        get_backbone(name, arch="tiny", weights="no-such-thing")
    with pytest.raises(BadArgumentError, match="not-an-arch"):
        get_backbone(name, arch="not-an-arch", weights="random")


# ---------------------------------------------------------------- DINOv2 numerics, computed independently


def _capture_block(module, layer):
    """Input and output of blocks[layer] of a timm ViT, captured by hooks during a forward."""
    got = {}
    blk = module.blocks[layer]
    h1 = blk.register_forward_pre_hook(lambda m, args: got.__setitem__("x", args[0].detach().clone()))
    h2 = blk.register_forward_hook(lambda m, args, out: got.__setitem__("y", out.detach().clone()))
    return got, (h1, h2)


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_dinov2_q_is_the_query_projection(layer):
    bb = get_backbone("dinov2_q", arch="tiny", weights="random", layer=layer)
    blk = bb.module.blocks[bb.layer]
    got, hooks = _capture_block(bb.module, bb.layer)
    x = _images((434, 434))
    q = bb(x)
    for h in hooks:
        h.remove()
    assert "y" not in got  # the block stops at its qkv projection: no attention/MLP computed for nothing
    C = blk.attn.qkv.in_features
    ln = F.layer_norm(got["x"], (C,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    expected = ln @ blk.attn.qkv.weight[:C].T + blk.attn.qkv.bias[:C]
    assert q.shape == (2, 962, C)
    torch.testing.assert_close(q, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, -1])
def test_dinov2_is_the_normed_block_output(layer):
    bb = get_backbone("dinov2", arch="tiny", weights="random", layer=layer)
    got, hooks = _capture_block(bb.module, bb.layer)
    y = bb(_images((434, 434)))
    for h in hooks:
        h.remove()
    norm = bb.module.norm
    expected = F.layer_norm(got["y"], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_dinov2_matches_timm_at_the_native_grid():
    """At 518 px (the 37x37 grid the position embedding was trained on) no interpolation happens at all, so our
    block loop must give exactly timm's own forward_features / forward_intermediates, and the qkv hook of the full
    model: the hand-written path differs from timm's public one only in the position embedding."""
    x = _images((518, 518), n=1)
    bb = get_backbone("dinov2,dinov2_q", arch="tiny", weights="random", layer="all")
    m = bb.module
    got = bb.forward_features(x)
    assert torch.equal(got["dinov2_last"], m.forward_features(x))
    out = m.forward_intermediates(
        x, indices=bb.layers, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )
    for k, (patches, prefix) in zip(bb.layers, out):
        assert torch.equal(got[feature_name("dinov2", k, bb.num_layers)], torch.cat([prefix, patches], 1))
    seen = {}
    hooks = [blk.attn.qkv.register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(k, o))
             for k, blk in enumerate(m.blocks)]
    m.forward_features(x)
    for h in hooks:
        h.remove()
    for k in bb.layers:
        assert torch.equal(got[feature_name("dinov2_q", k, bb.num_layers)], seen[k][..., : m.embed_dim])


def _reference_interpolate_pos_encoding(pos_embed, x, w, h, patch_size=14, interpolate_offset=0.1,
                                        interpolate_antialias=False):
    """facebookresearch/dinov2 dinov2/models/vision_transformer.py DinoVisionTransformer.interpolate_pos_encoding,
    copied with `self.` replaced by arguments (x: the tokens [B, 1 + npatch, C]; w, h: the image's dims 2 and 3)."""
    previous_dtype = x.dtype
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    M = int(math.sqrt(N))  # Recover the number of patches in each dimension
    assert N == M * M
    kwargs = {}
    if interpolate_offset:
        sx = float(w0 + interpolate_offset) / M
        sy = float(h0 + interpolate_offset) / M
        kwargs["scale_factor"] = (sx, sy)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=interpolate_antialias,
        **kwargs,
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


@pytest.mark.parametrize("hw", [(434, 434), (434, 518), (252, 378), (518, 518)])
def test_pos_embed_is_the_reference_dinov2_interpolation(hw):
    bb = get_backbone("dinov2", arch="tiny", weights="random")
    pe = bb.module.pos_embed
    gh, gw = hw[0] // 14, hw[1] // 14
    tokens = torch.zeros(1, 1 + gh * gw, pe.shape[-1])
    ref = _reference_interpolate_pos_encoding(pe, tokens, hw[0], hw[1])
    ours = interpolate_pos_encoding(pe, (gh, gw))
    assert ours.shape == ref.shape == (1, 1 + gh * gw, pe.shape[-1])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # and it is what the backbone adds to the patch tokens
    x = _images(hw, n=1)
    patches = bb.module.patch_embed(x).reshape(1, gh * gw, -1)
    expected = torch.cat([bb.module.cls_token, patches], 1) + ref
    torch.testing.assert_close(bb.embed(x), expected, atol=1e-6, rtol=0)


def test_timm_resampling_differs_from_the_reference():
    """Why we do not use timm's dynamic_img_size path: `resample_abs_pos_embed` resizes to an output *size* with
    antialiasing, whereas DINOv2 uses the *scale factor* (31 + 0.1) / 37 without antialias. On a 37 -> 31 grid the
    two sample the 37x37 table at different positions with different kernels; the official model (and so the legacy
    features) uses the reference, and timm only matches the official model exactly with the reference recipe."""
    from timm.layers import resample_abs_pos_embed

    # A smooth table, like trained position embeddings (the random init would exaggerate the gap).
    M, C = 37, 64
    yy, xx = torch.meshgrid(torch.linspace(0, 1, M), torch.linspace(0, 1, M), indexing="ij")
    freqs = torch.arange(1, C // 4 + 1).float()
    table = torch.cat([torch.sin(math.pi * freqs * yy[..., None]), torch.cos(math.pi * freqs * xx[..., None]),
                       torch.sin(2.3 * freqs * (xx + yy)[..., None]), torch.cos(1.7 * freqs * (xx - yy)[..., None])],
                      -1)
    pe = torch.cat([torch.randn(1, 1, C), table.reshape(1, M * M, C)], 1)
    ref = interpolate_pos_encoding(pe, (31, 31))
    timm_pe = resample_abs_pos_embed(pe, new_size=(31, 31), old_size=(M, M), num_prefix_tokens=1)
    assert timm_pe.shape == ref.shape
    rel = (timm_pe[:, 1:] - ref[:, 1:]).norm() / ref[:, 1:].norm()
    assert rel > 5e-3, rel  # a few % here (~1% on the trained ViT-B/14 table): systematic, not rounding
    assert torch.equal(timm_pe[:, :1], ref[:, :1])


def test_dinov2_preprocess_pads_to_patches():
    bb = get_backbone("dinov2", arch="tiny", weights="random")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (425, 425, 3), dtype=np.uint8))
    x = bb.preprocess(img)
    assert tuple(x.shape) == (3, 434, 434) and bb.preprocess.output_size((425, 425)) == (434, 434)
    assert torch.all(x[:, 425:, :] == 0) and torch.all(x[:, :, 425:] == 0)
    mean = torch.tensor(bb.preprocess.mean)[:, None, None]
    std = torch.tensor(bb.preprocess.std)[:, None, None]
    raw = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(x[:, :425, :425], (raw - mean) / std)
    assert bb.preprocess.resize is None
    assert get_backbone("dinov2", arch="tiny", weights="random", image_size=448).preprocess.resize == 448


# ---------------------------------------------------------------- CLIP numerics


def _clip_reference(v, x, layer):
    """The CLIP tokens written out from the vision tower's parts (what featstore computed by hand before it used
    open_clip's forward_intermediates): embeddings, resblocks[:layer + 1], ln_post, proj."""
    t = v.conv1(x).flatten(2).transpose(1, 2)
    t = torch.cat([v.class_embedding.expand(t.shape[0], 1, -1), t], dim=1) + v.positional_embedding
    t = v.ln_pre(t)
    assert v.transformer.batch_first
    for blk in v.transformer.resblocks[: layer + 1]:
        t = blk(t)
    return v.ln_post(t) @ v.proj


@pytest.mark.parametrize("layer", [0, -1])
def test_clip_tokens_are_projected_ln_post_tokens(layer):
    bb = get_backbone("clip", arch="tiny", weights="random", layer=layer)
    v = bb.module
    x = _images((224, 224))
    y = bb(x)
    with torch.no_grad():
        assert torch.equal(y, _clip_reference(v, x, bb.layer))
    if bb.layer == bb.num_layers - 1:  # CLS is the pooled, projected image embedding
        torch.testing.assert_close(y[:, 0], v(x), atol=1e-5, rtol=1e-5)


def test_clip_rejects_other_sizes(tiny):
    with pytest.raises(BadArgumentError, match="224"):
        tiny["clip"].token_shape((256, 256))
    with pytest.raises(BadArgumentError, match="image_size"):
        get_backbone("clip", arch="tiny", weights="random", image_size=256)


@pytest.mark.parametrize("size", [(300, 200), (224, 224), (640, 480), (97, 150)])
def test_clip_preprocess_equals_open_clip(size):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    pp = merge_preprocess_dict(PreprocessCfg(size=224), open_clip.get_pretrained_cfg("ViT-L-14", "openai"))
    theirs = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    ours = clip_preprocess()  # == get_backbone("clip").preprocess, checked in the fullsize test
    assert ours.mean == open_clip.OPENAI_DATASET_MEAN and ours.std == open_clip.OPENAI_DATASET_STD
    rng = np.random.default_rng(size[0])
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :, None]  # smooth half, noisy half
    for img in (Image.fromarray(arr), Image.fromarray(arr).convert("L")):
        a, b = ours(img), theirs(img)
        assert a.shape == b.shape == (3, 224, 224)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert ours.output_size((size[1], size[0])) == (224, 224)
    assert get_backbone("clip", arch="tiny", weights="random").preprocess == clip_preprocess("tiny")


# ---------------------------------------------------------------- weights


def _state_dict_file(bb, path):
    torch.save({k: v.clone() for k, v in bb.module.state_dict().items()}, path)
    return path


@pytest.mark.parametrize("name", list_backbones())
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_weights_from_a_local_file(tiny, tmp_path, name, fmt):
    src = get_backbone(name, arch="tiny", weights="random", seed=7)
    path = tmp_path / f"tiny.{fmt}"
    sd = {k: v.clone().contiguous() for k, v in src.module.state_dict().items()}
    if fmt == "pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    bb = get_backbone(name, arch="tiny", weights=str(path))
    x = _images(IMAGE_HW[name], n=1)
    assert torch.equal(bb(x), src(x))
    assert bb.weights == {"kind": "file", "name": path.name, "sha256": sha256_file(path)}
    assert not torch.equal(bb(x), tiny[name](x))


def test_dinov2_official_key_layout(tmp_path):
    """The official dinov2_vitb14_pretrain.pth layout: timm's keys plus `mask_token` [1, C] (and, for ViT-g,
    mlp.w12/w3 names); wrapped or not in {"model": ...}."""
    src = get_backbone("dinov2_q", arch="tiny", weights="random", seed=3)
    sd = dict(src.module.state_dict())
    sd["mask_token"] = torch.zeros(1, src.module.embed_dim)
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, src.module.embed_dim)  # 1x1370xC like the official file
    for i, payload in enumerate([sd, {"model": sd}]):
        path = tmp_path / f"official{i}.pth"
        torch.save(payload, path)
        bb = get_backbone("dinov2_q", arch="tiny", weights=str(path))
        x = _images((434, 434), n=1)
        assert torch.equal(bb(x), src(x))


def test_mismatched_weights_file(tmp_path):
    src = get_backbone("dinov2", arch="tiny", weights="random")
    sd = dict(src.module.state_dict())
    del sd["blocks.0.norm1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(WeightsError, match=r"bad\.pth.*missing: blocks\.0\.norm1\.weight.*unexpected: extra") as e:
        get_backbone("dinov2", arch="tiny", weights=str(bad))
    assert "\n" not in str(e.value)
    clip_file = _state_dict_file(get_backbone("clip", arch="tiny", weights="random"), tmp_path / "clip.pth")
    with pytest.raises(WeightsError, match="clip.pth"):
        get_backbone("dinov2", arch="tiny", weights=str(clip_file))
    grid = dict(src.module.state_dict())
    grid["pos_embed"] = grid["pos_embed"][:, :257]
    torch.save(grid, tmp_path / "grid.pth")
    with pytest.raises(WeightsError, match="pos_embed"):
        get_backbone("dinov2", arch="tiny", weights=str(tmp_path / "grid.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth") as e:
        get_backbone("clip", arch="tiny", weights=str(tmp_path / "junk.pth"))
    assert "\n" not in str(e.value)


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"blocks": Image.new("RGB", (2, 2))}, path)  # arbitrary objects need unsafe unpickling
    with pytest.raises(WeightsError, match="pickled.pth"):
        get_backbone("dinov2", arch="tiny", weights=str(path))


def test_clip_whole_model_layout(tmp_path):
    src = get_backbone("clip", arch="tiny", weights="random", seed=5)
    sd = {f"visual.{k}": v for k, v in src.module.state_dict().items()}
    sd["logit_scale"] = torch.ones(())
    sd["text_projection"] = torch.zeros(8, 8)
    path = tmp_path / "open_clip_model.pth"
    torch.save({"state_dict": sd}, path)
    bb = get_backbone("clip", arch="tiny", weights=str(path))
    x = _images((224, 224), n=1)
    assert torch.equal(bb(x), src(x))


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.pth"
    for name in list_backbones():
        with pytest.raises(WeightsError, match="nope.pth") as e:
            get_backbone(name, arch="tiny", weights=str(missing))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name,arch",
    [("dinov2_q", "vit_small_patch14_dinov2.lvd142m"), ("dinov2", None), ("clip", "ViT-B-32")],
)
def test_pretrained_offline_fails_fast_and_clearly(no_weights_cache, name, arch):
    """Offline with empty caches: a one-line WeightsError naming both ways out, in seconds, never random weights.
    (dinov2 default ViT-B/14: the official URL, then timm's hub; ViT-B-32/openai: the same code path as ViT-L-14.)"""
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        get_backbone(name, arch=arch, weights="pretrained")
    msg = str(e.value)
    assert "--weights PATH" in msg and "--weights random" in msg and "\n" not in msg
    assert time.perf_counter() - t0 < 60


def test_pretrained_uses_the_torch_hub_cache(empty_caches):
    """A checkpoint already in the torch hub cache is used without any network access, with its checksum."""
    arch = "vit_small_patch14_dinov2.lvd142m"
    src = get_backbone("dinov2", arch=arch, weights="random", seed=2)
    sd = {**src.module.state_dict(), "mask_token": torch.zeros(1, src.module.embed_dim)}  # official layout
    ckpt = empty_caches / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(sd, ckpt)
    bb = get_backbone("dinov2", arch=arch, weights="pretrained")
    assert bb.weights == {"kind": "pretrained", "name": "dinov2_vits14_pretrain.pth", "sha256": sha256_file(ckpt)}
    x = _images((434, 434), n=1)
    assert torch.equal(bb(x), src(x))


def test_hf_hub_cache_is_used_offline(empty_caches):
    from featstore.backbones.base import hf_hub_file

    snap = empty_caches / "hf" / "models--org--name" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.bin").write_bytes(b"x")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    assert hf_hub_file("org/name", ["model.safetensors", "model.bin"]) == str(snap / "model.bin")


# ---------------------------------------------------------------- full-size architectures (random weights)


@pytest.mark.fullsize
@pytest.mark.parametrize("name", ["dinov2_q", "dinov2"])
def test_fullsize_dinov2(name):
    bb = get_backbone(name, weights="random")
    assert bb.arch == "vit_base_patch14_dinov2.lvd142m" and bb.num_layers == 12 and bb.layer == 11
    assert bb.module.pos_embed.shape == (1, 1370, 768)
    assert bb.token_shape((434, 434)) == (962, 768, (31, 31))
    y = bb(_images((434, 434), n=1))
    assert y.shape == (1, 962, 768) and y.dtype == torch.float32
    assert bb.preprocess.pad_multiple == 14 and bb.preprocess.resize is None


@pytest.mark.fullsize
def test_fullsize_clip():
    bb = get_backbone("clip", weights="random")
    assert bb.arch == "ViT-L-14" and bb.num_layers == 24
    assert bb.preprocess == clip_preprocess()
    assert bb.token_shape((224, 224)) == (257, 768, (16, 16))
    y = bb(_images((224, 224), n=1))
    assert y.shape == (1, 257, 768) and y.dtype == torch.float32
    # OpenAI CLIP was trained with QuickGELU; the openai tag's config says so and we honour it
    assert type(bb.module.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
