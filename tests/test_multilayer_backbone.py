"""Many layers and several variants from one forward pass: layer specs, variant lists, and every output
bit-identical to the single-output backbone of the same (variant, layer). Real tiny timm/open_clip models."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from featstore.backbones import (
    Output,
    backbone_config,
    check_layer_spec,
    get_backbone,
    list_backbones,
    parse_backbones,
    parse_layers,
)
from featstore.errors import BadArgumentError, UnknownBackboneError

IMAGE_HW = {"dinov2": (434, 434), "clip": (224, 224)}  # by family
FAMILIES = sorted({backbone_config(n).family for n in list_backbones()})
HEADS = {"dinov2_q": "qkv.query", "dinov2": "norm", "clip": "ln_post+proj"}


def _variants(family: str) -> list[str]:
    return [n for n in list_backbones() if backbone_config(n).family == family]


def _images(family: str, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, *IMAGE_HW[family], generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- parsing, no model needed


@pytest.mark.parametrize(
    "spec,expected",
    [
        (-1, [11]),
        (6, [6]),
        ("-1", [11]),
        ("-1,-4,6", [11, 8, 6]),
        (" -1 , -4 ", [11, 8]),
        ("0:12", list(range(12))),
        ("all", list(range(12))),
        ("-4:", [8, 9, 10, 11]),
        (":3", [0, 1, 2]),
        ("0:12:4", [0, 4, 8]),
        ("-2:-5:-1", [10, 9, 8]),
        ("0:2,-1,1", [0, 1, 11]),
        ([3, -1, 3, 11], [3, 11]),
        ((0, 5), [0, 5]),
    ],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 12) == expected


@pytest.mark.parametrize(
    "spec", ["", "x", "1,,2", "1:2:3:4", "0:12:0", "0:13", "12", "-13", "5:5", "3:1", 12, [], [1.5], ["1"], True, None]
)
def test_bad_layer_specs_name_the_flag(spec):
    with pytest.raises(BadArgumentError, match="--enc_layer") as e:
        parse_layers(spec, 12)
    assert "\n" not in str(e.value)


def test_layer_spec_syntax_is_checked_without_a_model():
    for ok in (-1, "all", "0:99", "-1,-4,6", [0, 99]):  # ranges need the model's depth: checked by parse_layers
        check_layer_spec(ok)
    for bad in ("x", "1:2:3:4", [], True, None):
        with pytest.raises(BadArgumentError, match="--enc_layer"):
            check_layer_spec(bad)


def test_parse_backbones():
    assert [c.name for c in parse_backbones("dinov2_q,dinov2")] == ["dinov2_q", "dinov2"]
    assert [c.name for c in parse_backbones(["dinov2", " dinov2_q", "dinov2"])] == ["dinov2", "dinov2_q"]
    with pytest.raises(BadArgumentError, match="cannot share one forward pass") as e:
        parse_backbones("clip,dinov2")
    assert "\n" not in str(e.value)
    for bad in ("nope", "dinov2,", ""):
        with pytest.raises(UnknownBackboneError, match="--backbone"):
            parse_backbones(bad)


def test_bad_specs_fail_before_a_model_is_built(monkeypatch):
    import featstore.backbones.dinov2 as family

    monkeypatch.setattr(family, "_build_module", lambda arch: pytest.fail("model built for a bad argument"))
    with pytest.raises(BadArgumentError, match="--enc_layer"):
        get_backbone("dinov2", layer="1;2", arch="tiny", weights="random")
    with pytest.raises(BadArgumentError, match="cannot share"):
        get_backbone(["dinov2", "clip"], arch="tiny", weights="random")


def test_registry_path_imports_no_torch():
    """The CLI builds its parser from list_backbones() and checks names and layer specs for every command; that
    path must not pull in torch/timm/open_clip/PIL (the family modules load only when a backbone is built)."""
    code = (
        "import sys\n"
        "import featstore.backbones as b\n"
        "b.list_backbones(); b.parse_layers('all', 12); b.parse_backbones('dinov2_q,dinov2'); b.check_layer_spec('0:4')\n"
        "b.feature_name('clip', -1, 24); b.backbone_config('dinov2')\n"
        "print(sorted(m for m in ('torch', 'timm', 'open_clip', 'PIL', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------- one forward pass, every output


@pytest.mark.parametrize("family", FAMILIES)
def test_every_output_is_bit_identical_to_its_single_output_backbone(family):
    variants = _variants(family)
    bb = get_backbone(",".join(variants), layer="-1,0:-1", arch="tiny", weights="random", seed=0)
    n = bb.num_layers
    order = [n - 1, *range(n - 1)]
    assert [(o.backbone, o.layer) for o in bb.outputs] == [(v, k) for v in variants for k in order]
    x = _images(family)
    got = bb.forward_features(x)
    assert list(got) == [o.feature for o in bb.outputs]
    T, C, _ = bb.token_shape(IMAGE_HW[family])
    for o in bb.outputs:
        single = get_backbone(o.backbone, layer=o.layer, arch="tiny", weights="random", seed=0)
        assert single.outputs == [o] and single.feature == o.feature
        y = got[o.feature]
        assert y.dtype == torch.float32 and tuple(y.shape) == (2, T, C)
        assert torch.equal(y, single(x)), o


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_only_up_to_the_deepest_block(family):
    bb = get_backbone(_variants(family), layer=0, arch="tiny", weights="random")
    blocks = bb.module.blocks if family == "dinov2" else bb.module.transformer.resblocks
    assert len(blocks) > 1
    ran = []
    hooks = [blk.register_forward_pre_hook(lambda m, a, k=k: ran.append(k)) for k, blk in enumerate(blocks)]
    try:
        out = bb.forward_features(_images(family, n=1))
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0] and list(out) == [f"{v}_layer0" for v in _variants(family)]


def test_single_output_api_is_unchanged():
    bb = get_backbone("dinov2_q", arch="tiny", weights="random")
    assert bb.outputs == [Output("dinov2_q", 2, "dinov2_q_last")]
    assert bb.name == "dinov2_q" and bb.layer == 2 and bb.feature == "dinov2_q_last"
    x = _images("dinov2", n=1)
    assert torch.equal(bb(x), bb.forward_features(x)["dinov2_q_last"])
    assert bb.describe() == bb.describe("dinov2_q_last")


def test_multi_output_backbone_refuses_single_output_verbs():
    bb = get_backbone(["dinov2_q", "dinov2"], layer="all", arch="tiny", weights="random")
    assert bb.name == "dinov2_q,dinov2" and bb.layers == [0, 1, 2] and len(bb.outputs) == 6
    x = _images("dinov2", n=1)
    for verb in (lambda: bb(x), lambda: bb.feature, lambda: bb.layer, lambda: bb.describe()):
        with pytest.raises(BadArgumentError, match="forward_features") as e:
            verb()
        assert "\n" not in str(e.value)
    with pytest.raises(BadArgumentError, match="clip_vit_512"):
        bb.describe("clip_vit_512")


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_each_output(family):
    variants = _variants(family)
    bb = get_backbone(variants, layer=[0, -1], arch="tiny", weights="random", seed=3)
    for o in bb.outputs:
        d = bb.describe(o.feature)
        json.dumps(d)
        assert d == {
            "backbone": o.backbone, "arch": "tiny", "layer": o.layer, "num_layers": bb.num_layers,
            "weights": {"kind": "random", "seed": 3}, "preprocess": bb.preprocess.to_dict(), "head": HEADS[o.backbone],
        }
