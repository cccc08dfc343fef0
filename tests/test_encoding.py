"""The reference brain encoders (featstore.encoding, tools/train_encoder.py) trained on a real store: a synthetic
subject with a planted ROI-structured signal, features from a real extract with the tiny random backbone. The
models are checked step for step against a minimal reference implementation written here from the reference
training code's facts (plain torch, none of featstore's model code)."""
from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, load_tool
from torch import nn
from torch.utils.data import default_collate

from featstore import FeatureDataset, FeatureStore, extract, make_sample_subject
from featstore.encoding import (
    READOUTS,
    ROI_CLASSES,
    EncoderConfig,
    LinearBrainEncoder,
    TrainConfig,
    TransformerBrainEncoder,
    channels_last_collate,
    load_checkpoint,
    load_rois,
    make_readout,
    pearson_r,
    train_encoder,
    train_one_epoch,
)
from featstore.encoding.models import sine_position_encoding
from featstore.errors import BadArgumentError, CorruptChunkError, FeatstoreError, LayoutError
from featstore.export import export_npy
from featstore.sample import ROI_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "train_encoder.py"
N_TRAIN, N_TEST, VERTICES = 120, 6, (200, 180)
SMALL = {"hidden_dim": 32, "nheads": 2, "dim_feedforward": 64, "dropout": 0.0}  # a few seconds per run on 2 CPUs
# per architecture: model, learning rate, epochs (the linear model overfits 108 images after ~3 epochs)
RUNS = {"transformer": (EncoderConfig(**SMALL), 5e-3, 8), "linear": (EncoderConfig(encoder_arch="linear"), 5e-4, 2)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and on a shared 2-core machine a second intra-op thread that is
    descheduled stalls every op (10x slower runs were seen); the process's setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """ROOT/subj01 (120 train + 6 test images, planted signal) and its tiny dinov2_q store."""
    root = tmp_path_factory.mktemp("enc")
    subj = make_sample_subject(root / "data", n_train=N_TRAIN, n_test=N_TEST, n_vertices=VERTICES, seed=0)
    store = root / "store.zarr"
    extract(subj, store, backbone="dinov2_q", batch_size=32, durable=False, **TINY)
    return {"root": root, "data": root / "data", "subj": subj, "store": store}


def config(data: dict, arch: str, **kw) -> TrainConfig:
    model, lr, epochs = RUNS[arch]
    base = {"model": model, "lr": lr, "epochs": epochs, "num_workers": 0, "progress": False, "device": "cpu",
            "val_fraction": 0.25}  # 30 validation images: a steadier chance level than the legacy 12
    return TrainConfig(store=data["store"], **{"data_dir": data["subj"], **base, **kw})


_runs: dict = {}


def run(data: dict, arch: str, shuffle: bool):
    """Each (arch, shuffle) run once per module: the tests below read their results."""
    if (arch, shuffle) not in _runs:
        torch.manual_seed(0)
        _runs[arch, shuffle] = train_encoder(config(data, arch, shuffle_targets=shuffle))
    return _runs[arch, shuffle]


# ---- learning the planted signal, and not shuffled targets --------------------------------------------------------
@pytest.mark.parametrize("arch", ["transformer", "linear"])
def test_encoder_learns_the_planted_signal_and_not_shuffled_targets(data, arch):
    real, shuffled = run(data, arch, False).metrics, run(data, arch, True).metrics
    for hemi in ("lh", "rh"):
        assert real[f"{hemi}_mean_r"] > 0.3, (arch, hemi, real[f"{hemi}_mean_r"])
        assert real[f"{hemi}_median_r"] > 0.3
    # chance level: about 0 +- 0.05 over seeds for 30 validation images; the epoch of best val_perf is kept, as for
    # real, and when none beats 0 the last one (so a shuffled run may end below 0, never far above)
    assert shuffled["mean_r"] < 0.15, (arch, shuffled["mean_r"])
    assert shuffled["mean_r"] < real["mean_r"] / 3
    assert shuffled["shuffle_targets"] and not real["shuffle_targets"]


@pytest.mark.parametrize("arch", ["transformer", "linear"])
def test_metrics_and_per_roi_scores(data, arch):
    res = run(data, arch, False)
    m = res.metrics
    assert m["n_train"] == 90 and m["n_val"] == 30 and m["n_test"] == N_TEST
    assert 1 <= m["best_epoch"] <= m["epochs"] == RUNS[arch][2] and len(m["history"]) == m["epochs"]
    assert m["samples_per_s"] > 0 and m["feature"] == "dinov2_q_last" and m["encoder_arch"] == arch
    perf = (np.nan_to_num(res.val_r["lh"]).mean() + np.nan_to_num(res.val_r["rh"]).mean()) / 2
    assert m["val_perf"] == pytest.approx(perf) and m["val_perf"] == max(e["val_perf"] for e in m["history"])
    assert m["history"][m["best_epoch"] - 1]["val_perf"] == pytest.approx(perf)
    for hemi, nv in zip(("lh", "rh"), VERTICES):
        assert res.val_r[hemi].shape == (nv,)
        assert m[f"{hemi}_mean_r"] == pytest.approx(np.nanmean(res.val_r[hemi]))
        assert res.test_pred[hemi].shape == (N_TEST, nv) and res.test_pred[hemi].dtype == np.float32
    names = {n for cls in ROI_CLASSES for k, n in ROI_MAPPINGS[cls].items() if k}
    assert set(m["roi_mean_r"]) == names
    roi = m["roi_mean_r"]
    # global-content ROIs are learned by both models
    assert np.mean([roi[n]["lh"] for n in ("FFA-1", "PPA", "EBA", "VWFA-1")]) > 0.2


def test_training_never_reads_the_array_whole(data, monkeypatch):
    """Features reach the model only as single samples through FeatureDataset (FeatureArray.read_sample)."""
    from featstore.storage import array as store_module

    def refuse(*a, **k):
        raise AssertionError("FeatureArray.read called: the array must not be loaded in blocks")

    monkeypatch.setattr(store_module.FeatureArray, "read", refuse)
    calls = []
    orig = store_module.FeatureArray.read_sample
    monkeypatch.setattr(store_module.FeatureArray, "read_sample", lambda self, j: calls.append(j) or orig(self, j))
    res = train_encoder(config(data, "transformer", epochs=1, subj=1))
    assert np.isfinite(res.metrics["mean_r"]) and res.metrics["subj"] == "01"
    assert len(calls) == 90 + 30 + 30 + N_TEST  # one epoch of training, validation twice, the test split once


# ---- the tool ----------------------------------------------------------------------------------------------------
def tool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as one_thread, for the tool's process
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)


def test_tool_end_to_end_with_the_guides_flags(data, capfd):
    """The tool's main in this process, with DataLoader workers (its exit path in a real process:
    test_tool_process_exit_code), so no interpreter start and torch import are paid twice."""
    out = data["root"] / "run"
    code = _tool_main()(["--subj", "1", "--saved_feats", "dinov2q", "--saved_feats_dir", str(data["store"]),
                         "--data_dir", str(data["data"]), "--encoder_arch", "transformer", "--readout_res", "rois_all",
                         "--epochs", "1", "--batch_size", "16", "--lr", "5e-3", "--hidden_dim", "32", "--nheads", "2",
                         "--dim_feedforward", "64", "--num_workers", "2", "--device", "cpu", "--output_path", str(out)])
    r = subprocess.CompletedProcess([], code, *capfd.readouterr())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "validation mean r lh" in r.stdout and "samples/s" in r.stdout
    assert "epoch 1/1" in r.stderr and "samples/s]" in r.stderr  # the per-epoch tqdm bar with its rate
    m = json.loads((out / "metrics.json").read_text())
    for key in ("lh_mean_r", "rh_mean_r", "lh_median_r", "rh_median_r", "roi_mean_r", "epochs", "samples_per_s",
                "val_perf"):
        assert key in m, key
    assert m["epochs"] == 1 and m["config"]["num_workers"] == 2 and m["num_queries"] > 2
    for hemi, nv in zip(("lh", "rh"), VERTICES):
        pred = np.load(out / f"{hemi}_pred_test.npy")
        assert pred.dtype == np.float32 and pred.shape == (N_TEST, nv) and np.isfinite(pred).all()
    assert (out / "roi_r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == m["best_epoch"] and ckpt["model_config"]["hidden_dim"] == 32
    # the checkpoint rebuilds the model that made the submission
    ds = FeatureDataset(data["store"], split="test")
    readout = make_readout("rois_all", {"lh": VERTICES[0], "rh": VERTICES[1]}, load_rois(data["subj"]))
    model = TransformerBrainEncoder(ds.channels, readout, EncoderConfig.from_dict(ckpt["model_config"]))
    assert load_checkpoint(out / "checkpoint.pt", model).layout == "featstore"
    with torch.no_grad():
        model.eval()
        lh = model(torch.stack([ds[i] for i in range(len(ds))]).float())["lh_f_pred"].numpy()
    np.testing.assert_allclose(lh, np.load(out / "lh_pred_test.npy"), rtol=1e-4, atol=1e-5)


def _tool_main():
    return load_tool("train_encoder").main


@pytest.mark.parametrize("args, message", [
    (["--readout_res", "everything"], "invalid choice"),
    (["--subj", "x1"], "--subj 'x1'"),
    (["--subj", "2"], "no subj02/ folder"),
    (["--saved_feats", "nope"], "no array nope/01/train"),
    (["--hidden_dim", "30"], "multiple of --nheads"),
    (["--epochs", "0"], "--epochs must be"),
    (["--feature_dtype", "bfloat16"], "argument --feature_dtype: invalid choice: 'bfloat16'"),
])
def test_tool_bad_input_is_one_line_and_exit_2(data, capsys, args, message):
    argv = ["--saved_feats_dir", str(data["store"]), "--data_dir", str(data["data"]), "--device", "cpu",
            "--output_path", str(data["root"] / "bad"), *args]
    try:
        code = _tool_main()(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_encoder: error: ") and message in lines[0], err
    assert not (data["root"] / "bad").exists()


def test_tool_process_exit_code(data):
    r = tool("--saved_feats_dir", str(data["store"]), "--data_dir", str(data["data"]), "--readout_res", "roi",
             timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("train_encoder: error: argument --readout_res")
    assert "invalid choice: 'roi'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---- parts --------------------------------------------------------------------------------------------------------
def test_rois_and_readouts(data):
    rois = load_rois(data["subj"])
    assert rois.names == {c: dict(m) for c, m in ROI_MAPPINGS.items()}
    nv = {"lh": VERTICES[0], "rh": VERTICES[1]}
    ro = make_readout("rois_all", nv, rois)
    for hemi in ("lh", "rh"):
        mask = ro.masks[hemi]
        assert mask.shape == (len(ro.query_names[hemi]), nv[hemi]) and ro.query_names[hemi][-1] == f"{hemi}_rest"
        labels = rois.labels[hemi]
        in_rois = sum((labels[c] > 0).astype(int) for c in ROI_CLASSES[:5])
        np.testing.assert_array_equal(mask.sum(0), np.maximum(in_rois, 1))  # overlaps counted twice, rest once
        np.testing.assert_array_equal(mask[-1] > 0, in_rois == 0)
        v1v = ro.query_names[hemi].index(f"{hemi}_V1v")
        np.testing.assert_array_equal(mask[v1v] > 0, labels["prf-visualrois"] == 1)
        # the sample's ROIs overlap across classes as real masks do: hV4 with EBA and OFA, floc ROIs pairwise
        assert in_rois.max() == 3 and (in_rois == 2).any()
        # the reference's layout: a query for every label of the five mappings, then "rest"
        assert len(ro.query_names[hemi]) == sum(len(ROI_MAPPINGS[c]) - 1 for c in ROI_CLASSES[:5]) + 1
        assert ro.loss_masks[hemi] is None
    assert ro.num_queries == sum(len(q) for q in ro.query_names.values())
    faces = make_readout("faces", nv, rois)  # a single-class readout's loss sees its ROIs' vertices only
    np.testing.assert_array_equal(faces.loss_masks["lh"], rois.labels["lh"]["floc-faces"] > 0)
    assert make_readout("streams_inc", nv, rois).loss_masks["lh"] is None
    assert make_readout("streams", nv, rois).loss_masks["rh"].sum() == (rois.labels["rh"]["streams"] > 0).sum()
    assert make_readout("hemis", nv).num_queries == 2 and make_readout("hemis", nv).masks["lh"].all()
    assert make_readout("voxels", nv).masks["lh"] is None and make_readout("voxels", nv).num_queries == sum(VERTICES)
    streams = make_readout("streams", nv, rois)
    assert streams.query_names["lh"][:3] == ["lh_early", "lh_midventral", "lh_midlateral"]
    assert set(READOUTS) == {"rois_all", "voxels", "hemis", "visuals", "bodies", "faces", "places", "words", "streams",
                             "streams_inc"}
    with pytest.raises(BadArgumentError, match="choose one of"):
        make_readout("rois", nv, rois)
    with pytest.raises(BadArgumentError, match="not the same subject"):
        make_readout("faces", {"lh": 10, "rh": VERTICES[1]}, rois)
    with pytest.raises(LayoutError, match="roi_masks"):
        load_rois(data["root"])


def test_transformer_reads_each_query_out_to_its_roi(data):
    rois = load_rois(data["subj"])
    nv = {"lh": VERTICES[0], "rh": VERTICES[1]}
    ro = make_readout("rois_all", nv, rois)
    torch.manual_seed(0)
    model = TransformerBrainEncoder(48, ro, EncoderConfig(**{**SMALL, "enc_layers": 1})).eval()
    seen = {}
    model.dec_norm.register_forward_hook(lambda m, i, o: seen.update(hs=o))
    x = torch.randn(3, 48, 31, 31)
    out = model(x)
    q_lh = len(ro.query_names["lh"])
    for hemi, hs, lin in (("lh", seen["hs"][:, :q_lh], model.lh_embed), ("rh", seen["hs"][:, q_lh:], model.rh_embed)):
        mask = torch.from_numpy(ro.masks[hemi])
        expected = torch.stack([sum(mask[q, v] * (hs[:, q] @ lin.weight[v] + lin.bias[v]) for q in range(len(mask)))
                                for v in range(0, nv[hemi], 17)], 1)  # the bias once per query covering v
        torch.testing.assert_close(out[f"{hemi}_f_pred"][:, ::17], expected, rtol=1e-4, atol=1e-5)
    assert out["lh_f_pred"].shape == (3, VERTICES[0]) and out["rh_f_pred"].shape == (3, VERTICES[1])
    vox = TransformerBrainEncoder(48, make_readout("voxels", {"lh": 5, "rh": 4}), EncoderConfig(**SMALL))
    assert vox.query_embed.num_embeddings == 9 and vox(x)["rh_f_pred"].shape == (3, 4)


def test_channels_last_batches_equal_default_collate_without_a_transpose(data):
    ds = FeatureDataset(data["store"], data_dir=data["subj"], indices=[4, 0, 7])
    items = [ds[i] for i in range(3)]
    x, y = channels_last_collate(items)
    ref_x, ref_y = default_collate(items)
    assert torch.equal(x, ref_x) and x.is_contiguous(memory_format=torch.channels_last)
    assert x.permute(0, 2, 3, 1).is_contiguous() and all(torch.equal(y[k], ref_y[k]) for k in ref_y)
    assert torch.equal(channels_last_collate([img for img, _ in items]), ref_x)
    ro = make_readout("rois_all", {"lh": VERTICES[0], "rh": VERTICES[1]}, load_rois(data["subj"]))
    torch.manual_seed(0)
    for model in (TransformerBrainEncoder(ds.channels, ro, EncoderConfig(**SMALL)),
                  LinearBrainEncoder(ds.channels, ds.grid, ro.n_vertices)):
        with torch.no_grad():
            a, b = model.eval()(x), model(ref_x.contiguous())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the same model for either layout


def test_float16_items_make_a_float16_channels_last_batch(data):
    """Float16 items collate into one contiguous (B, H, W, C) float16 buffer, returned as its (B, C, H, W) view: the
    float32 batch rounded once; the fMRI targets stay float32."""
    f16 = FeatureDataset(data["store"], data_dir=data["subj"], indices=[4, 0, 7], dtype="float16")
    f32 = FeatureDataset(data["store"], data_dir=data["subj"], indices=[4, 0, 7])
    x, y = channels_last_collate([f16[i] for i in range(3)])
    ref_x, ref_y = channels_last_collate([f32[i] for i in range(3)])
    assert x.dtype == torch.float16 and x.shape == ref_x.shape and x.stride() == ref_x.stride()
    assert x.is_contiguous(memory_format=torch.channels_last) and x.permute(0, 2, 3, 1).is_contiguous()
    assert torch.equal(x, ref_x.half()) and torch.equal(x.float(), ref_x)  # a float16 store: float32 adds nothing
    assert all(y[k].dtype == torch.float32 and torch.equal(y[k], ref_y[k]) for k in ref_y)
    bare = channels_last_collate([f16[i][0] for i in range(3)])
    assert torch.equal(bare, x) and bare.is_contiguous(memory_format=torch.channels_last)


def test_float16_loader_trains_exactly_as_float32_items(data):
    """feature_dtype float16 (the CUDA default) on the CPU: float16 batches, converted to float32 after the copy,
    train to the same losses and scores as float32 items of the same store, bit for bit. The store holds float16, so
    the float32 items are the rounded values, and the model sees identical float32 inputs in the same order; any
    difference would be a change of arithmetic, not of rounding. auto is float32 on a CPU (results as before)."""
    runs = {d: train_encoder(config(data, "transformer", epochs=2, feature_dtype=d)) for d in ("float16", "auto")}
    half, auto = runs["float16"].metrics, runs["auto"].metrics
    assert half["feature_dtype"] == "float16" and auto["feature_dtype"] == "float32"
    assert [e["train_loss"] for e in half["history"]] == [e["train_loss"] for e in auto["history"]]
    assert [e["val_perf"] for e in half["history"]] == [e["val_perf"] for e in auto["history"]]
    for h in ("lh", "rh"):
        assert np.array_equal(runs["float16"].test_pred[h], runs["auto"].test_pred[h])
    cfg = TrainConfig(store="s", data_dir="d")
    assert cfg.loader_dtype("cuda") == "float16" and cfg.loader_dtype("cpu") == "float32"
    assert TrainConfig(store="s", data_dir="d", feature_dtype="float32").loader_dtype("cuda") == "float32"
    from featstore.encoding.train import _features_to, _loader

    ds = FeatureDataset(data["store"], dtype="float16")
    assert _loader(ds, cfg, torch.device("cuda"), shuffle=False).pin_memory  # built only: no CUDA needed
    assert not _loader(ds, cfg, torch.device("cpu"), shuffle=False).pin_memory
    x = channels_last_collate([ds[i] for i in range(2)])
    y = _features_to(x, torch.device("cpu"))
    assert y.dtype == torch.float32 and torch.equal(y, x.float()) and y.is_contiguous(memory_format=torch.channels_last)


def test_sine_position_encoding_is_detrs():
    """Against DETR's PositionEmbeddingSine(normalize=True) written out over a mask, as DETR computes it
    (detr_sine, below, with the reference)."""
    h, w, d = 5, 7, 16
    torch.testing.assert_close(sine_position_encoding(h, w, d), detr_sine(h, w, d))


def test_linear_baseline_shape():
    """The reference's input convolution: 31x31 DINOv2 grid -> 11x11 (30,976 features), 16x16 CLIP grid -> 8x8."""
    model = LinearBrainEncoder(48, (31, 31), {"lh": 7, "rh": 5})
    conv = model.input_proj
    assert conv.kernel_size == (3, 3) and conv.stride == (3, 3) and conv.padding == (1, 1) and conv.out_channels == 256
    assert model.lh_embed.in_features == 30_976
    out = model(torch.randn(2, 48, 31, 31))
    assert out["lh_f_pred"].shape == (2, 7) and out["rh_f_pred"].shape == (2, 5)
    clip = LinearBrainEncoder(8, (16, 16), {"lh": 7, "rh": 5})
    assert clip.input_proj.stride == (2, 2) and clip.input_proj.padding == (1, 1) and clip.lh_embed.in_features == 256 * 64
    assert clip(torch.randn(2, 8, 16, 16))["rh_f_pred"].shape == (2, 5)


def test_pearson_r_per_vertex():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 6)), rng.standard_normal((20, 6))
    b[:, 5] = 1.0
    r = pearson_r(a, b)
    np.testing.assert_allclose(r[:5], [np.corrcoef(a[:, i], b[:, i])[0, 1] for i in range(5)])
    assert np.isnan(r[5])
    with pytest.raises(BadArgumentError):
        pearson_r(a, b[:, :3])


def test_config_errors_are_featstore_errors(data):
    for kw in ({"batch_size": 0}, {"num_workers": -1}, {"lr": 0.0}):
        with pytest.raises(BadArgumentError):
            train_encoder(config(data, "linear", **kw))
    with pytest.raises(FeatstoreError, match="readout_res"):
        train_encoder(config(data, "transformer", model=EncoderConfig(readout_res="all")))
    with pytest.raises(BadArgumentError, match="^feature_dtype 'half': choose one of auto, float16, float32$") as e:
        train_encoder(config(data, "linear", feature_dtype="half"))
    assert e.value.param == "feature_dtype"


def test_encoding_imports_neither_zarr_nor_dask():
    """The encoders read features only through FeatureDataset (the layer sweep's projection is the one part of
    encoding/ that runs dask, through featstore._dask)."""
    sweep = {"projection.py", "layerwise.py", "ridge.py", "sweep_config.py", "sweep_report.py"}
    for path in (p for p in (ROOT / "featstore" / "encoding").glob("*.py") if p.name not in sweep):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("zarr", "dask") for n in names), (path.name, names)


# ---- the reference, written from its facts: a few dozen lines of plain torch, none of featstore's model code --------
def detr_sine(h: int, w: int, d: int) -> torch.Tensor:
    """DETR's PositionEmbeddingSine(d // 2, normalize=True) over an all-valid (h, w) mask, as (h * w, d)."""
    not_mask = torch.ones(1, h, w)
    y_embed, x_embed = not_mask.cumsum(1), not_mask.cumsum(2)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(d // 2, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / (d // 2))
    pos_x, pos_y = x_embed[:, :, :, None] / dim_t, y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)[0].flatten(1).T


class RefDecoderLayer(nn.Module):
    """DETR's decoder layer as the reference runs it: sequence-first, no query self-attention (self_attn, and norm2
    under pre-norm, are carried unused, as in the reference's state dict)."""

    def __init__(self, d: int, nhead: int, ff: int, pre_norm: int):
        super().__init__()
        self.self_attn, self.multihead_attn = nn.MultiheadAttention(d, nhead), nn.MultiheadAttention(d, nhead)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.pre_norm = pre_norm

    def forward(self, t, memory, pos, query_pos):
        def ffn(z):
            return self.linear2(torch.relu(self.linear1(z)))

        if self.pre_norm:
            t2 = self.norm1(t)
            t = t + self.multihead_attn(t2 + query_pos, memory + pos, memory, need_weights=False)[0]
            return t + ffn(self.norm3(t))
        t = self.norm1(t)
        t = self.norm2(t + self.multihead_attn(t + query_pos, memory + pos, memory, need_weights=False)[0])
        return self.norm3(t + ffn(t))


class RefBrainEncoder(nn.Module):
    """The reference brain encoder over a (d, H, W) grid: zero targets, learned query_pos, a final decoder
    LayerNorm, xavier_uniform_ on every transformer matrix, the readout applied to every query output."""

    def __init__(self, d: int, nhead: int, ff: int, pre_norm: int, dec_layers: int, rois: dict | None, nv: dict):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.decoder = nn.Module()
        self.transformer.decoder.layers = nn.ModuleList(RefDecoderLayer(d, nhead, ff, pre_norm) for _ in range(dec_layers))
        self.transformer.decoder.norm = nn.LayerNorm(d)
        self.transformer.memory_proj = nn.Conv2d(d, 64, kernel_size=1)
        for p in self.transformer.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.rois, self.nv = rois, nv
        self.query_embed = nn.Embedding(nv["lh"] + nv["rh"] if rois is None else 2 * len(rois["lh"]), d)
        self.lh_embed, self.rh_embed = nn.Sequential(nn.Linear(d, nv["lh"])), nn.Sequential(nn.Linear(d, nv["rh"]))

    def forward(self, x):
        b, c, h, w = x.shape
        src, pos = x.flatten(2).permute(2, 0, 1), detr_sine(h, w, c)[:, None, :]
        query_pos = self.query_embed.weight[:, None, :].repeat(1, b, 1)
        t = torch.zeros_like(query_pos)
        for layer in self.transformer.decoder.layers:
            t = layer(t, src, pos, query_pos)
        hs = self.transformer.decoder.norm(t).transpose(0, 1)  # (B, Q, d)
        if self.rois is None:  # voxels: query v reads out to vertex v
            n = self.nv["lh"]
            return (torch.diagonal(self.lh_embed(hs[:, :n]), dim1=-2, dim2=-1),
                    torch.diagonal(self.rh_embed(hs[:, n:]), dim1=-2, dim2=-1))
        half = hs.shape[1] // 2
        lh, rh = self.lh_embed(hs[:, :half]).movedim(1, -1), self.rh_embed(hs[:, half:]).movedim(1, -1)  # (B, V, Q)
        return (self.rois["lh"].T[None] * lh).sum(2), (self.rois["rh"].T[None] * rh).sum(2)


def reference_rois(subj: Path, classes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The reference's (queries, vertices) masks from the subject's files: a row per label 1.. of each class's
    mapping, then the vertices in none."""
    out = {}
    for hemi in ("lh", "rh"):
        rows = []
        for cls in classes:
            labels = np.load(subj / "roi_masks" / f"{hemi}.{cls}_challenge_space.npy")
            n_labels = len(np.load(subj / "roi_masks" / f"mapping_{cls}.npy", allow_pickle=True).item())
            rows += [labels == i for i in range(1, n_labels)]
        rows.append(np.sum(rows, axis=0) == 0)
        out[hemi] = torch.tensor(np.stack(rows), dtype=torch.float32)
    return out


def ref_loss(lh, rh, y, in_rois=None):
    if in_rois is not None:  # single-class readouts: predictions and targets zeroed outside the class's ROIs
        lh, rh, y = lh * in_rois["lh"], rh * in_rois["rh"], {"lh_f": y["lh_f"] * in_rois["lh"],
                                                           "rh_f": y["rh_f"] * in_rois["rh"]}
    return F.mse_loss(lh, y["lh_f"]) + F.mse_loss(rh, y["rh_f"])


class RefLinear(nn.Module):
    """The reference's linear baseline: 3x3 convolution to 256 channels, padding 1, stride 3 (31x31 grid) or 2
    (16x16), flattened, a linear readout per hemisphere."""

    def __init__(self, c: int, grid: int, nv: dict):
        super().__init__()
        stride = 3 if grid == 31 else 2
        self.input_proj = nn.Conv2d(c, 256, kernel_size=3, stride=stride, padding=1)
        n = 256 * ((grid + 2 - 3) // stride + 1) ** 2
        self.lh_embed, self.rh_embed = nn.Sequential(nn.Linear(n, nv["lh"])), nn.Sequential(nn.Linear(n, nv["rh"]))

    def forward(self, x):
        z = self.input_proj(x).flatten(1)
        return self.lh_embed(z), self.rh_embed(z)

    def loss(self, lh, rh, y):
        l2 = sum(p.norm(2) for p in [*self.lh_embed.parameters(), *self.rh_embed.parameters()])
        return F.mse_loss(lh, y["lh_f"]) + F.mse_loss(rh, y["rh_f"]) + 0.02 * l2


def reference_steps(model: nn.Module, loss_of, batches) -> list[float]:
    """The reference's training step (AdamW, lr 5e-4, weight decay 1e-4, gradient norm clipped to 0.1) per batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    losses = []
    for x, y in batches:
        loss = loss_of(x, y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        losses.append(loss.item())
    return losses


def featstore_steps(model: nn.Module, batches) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    return [train_one_epoch(model, [batch], opt, torch.device("cpu"), clip_max_norm=0.1).loss for batch in batches]


def save_reference_checkpoint(path: Path, ref: nn.Module, extra: dict | None = None, **args) -> Path:
    """A file laid out as the reference's main.py saves it (model, optimizer, lr_scheduler, epoch, args, val_perf)."""
    opt = torch.optim.AdamW(ref.parameters(), lr=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 100, gamma=0.5)
    torch.save({"model": {**ref.state_dict(), **(extra or {})}, "optimizer": opt.state_dict(),
                "lr_scheduler": sched.state_dict(), "epoch": 4, "val_perf": np.float64(0.21),
                "args": argparse.Namespace(**args, val_perf=np.float64(0.21), device=torch.device("cpu"))}, path)
    return path


def first_vertices(batches: list, nv: dict) -> list:
    return [(x, {f"{h}_f": y[f"{h}_f"][:, : nv[h]] for h in ("lh", "rh")}) for x, y in batches]


def double(batches: list) -> list:
    return [(x.double(), {k: v.double() for k, v in y.items()}) for x, y in batches]


D, HEADS, FF = 48, 4, 64  # the tiny backbone's 48 channels feed the decoder directly, as DINOv2's 768 do


@pytest.fixture(scope="module")
def batches(data) -> list:
    """The same 8 batches of 4 sample-subject images (features from the store, fMRI targets) for both models."""
    ds = FeatureDataset(data["store"], data_dir=data["subj"])
    assert ds.channels == D and ds.grid == (31, 31)
    return [default_collate([ds[i] for i in range(4 * k, 4 * k + 4)]) for k in range(8)]


@pytest.mark.parametrize("pre_norm, dec_layers, readout_res", [
    *((p, d, r) for p in (1, 0) for d in (1, 2) for r in ("rois_all", "voxels")), (1, 1, "faces"), (0, 1, "faces")])
def test_transformer_equals_the_reference_step_for_step(data, batches, tmp_path, readout_res, pre_norm, dec_layers):
    """Same weights, same 8 batches, dropout 0: the losses agree to 1e-5 relative at every training step.

    The steps run in float64: in float32 the two agree on the first loss to ~1e-7, but Adam turns rounding-level
    differences of near-zero gradients into whole steps, so float32 runs drift apart by chance (up to ~6e-5 by the
    sixth step); in float64 they agree to ~1e-15 at every step, which only the same arithmetic gives. "voxels"
    reads out the subject's first 30 + 25 vertices (a query each: the cost grows with them, the arithmetic does not)."""
    nv = dict(zip(("lh", "rh"), VERTICES))
    if readout_res == "voxels":
        nv = {"lh": 30, "rh": 25}
        batches = first_vertices(batches, nv)
    classes = READOUTS[readout_res]
    rois = reference_rois(data["subj"], classes) if classes else None
    in_rois = None if readout_res in ("rois_all", "voxels") else {  # the class's ROIs, from the label files
        h: torch.tensor(np.load(data["subj"] / "roi_masks" / f"{h}.{classes[0]}_challenge_space.npy") > 0).float()
        for h in ("lh", "rh")}
    torch.manual_seed(dec_layers + 2 * pre_norm)
    ref = RefBrainEncoder(D, HEADS, FF, pre_norm, dec_layers, rois, nv)
    cfg = EncoderConfig(hidden_dim=D, nheads=HEADS, dim_feedforward=FF, dropout=0.0, pre_norm=pre_norm,
                        dec_layers=dec_layers, readout_res=readout_res)
    ours = TransformerBrainEncoder(D, make_readout(readout_res, nv, None if readout_res == "voxels" else
                                                   load_rois(data["subj"])), cfg)
    load_checkpoint(save_reference_checkpoint(tmp_path / "ref.pth", ref), ours)  # the reference's weights, copied
    x, y = batches[0]
    with torch.no_grad():
        np.testing.assert_allclose(ours.loss(ours(x), y).item(), ref_loss(*ref(x), y, in_rois).item(), rtol=1e-6)
    want = reference_steps(ref.double(), lambda x, y: ref_loss(*ref(x), y, in_rois), double(batches))
    got = featstore_steps(ours.double(), double(batches))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_linear_baseline_equals_the_reference_step_for_step(data, batches, tmp_path):
    """The same for the linear baseline (its readout on the first 20 + 18 vertices: 30,976 x 38 weights, not x 380)."""
    nv = {"lh": 20, "rh": 18}
    batches = first_vertices(batches, nv)
    torch.manual_seed(0)
    ref = RefLinear(D, 31, nv)
    ours = LinearBrainEncoder(D, (31, 31), nv, EncoderConfig(encoder_arch="linear"))
    assert ours.lh_embed.in_features == ref.lh_embed[0].in_features == 30_976
    torch.save({"model": ref.state_dict()}, tmp_path / "ref.pth")
    load_checkpoint(tmp_path / "ref.pth", ours)
    want = reference_steps(ref, lambda x, y: ref.loss(*ref(x), y), batches)  # the same ops: float32 suffices
    got = featstore_steps(ours, batches)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_float16_features_run_in_float32(data, batches):
    x = batches[0][0]
    nv = dict(zip(("lh", "rh"), VERTICES))
    torch.manual_seed(0)
    for model in (TransformerBrainEncoder(D, make_readout("rois_all", nv, load_rois(data["subj"])),
                                          EncoderConfig(hidden_dim=D, nheads=HEADS, dim_feedforward=FF)),
                  LinearBrainEncoder(D, (31, 31), nv)):
        with torch.no_grad():
            half, single = model.eval()(x.half()), model(x.half().float())
        for k in single:
            assert half[k].dtype == torch.float32 and torch.equal(half[k], single[k])


def test_transformer_init_layers_and_options(data):
    """xavier_uniform_ on every transformer matrix; no query self-attention unless asked; norm2 only where used;
    --enc_output_layer picks the encoder layer that feeds the decoder; learned positions."""
    nv = {"lh": 5, "rh": 4}
    ro = make_readout("hemis", nv)
    torch.manual_seed(0)
    model = TransformerBrainEncoder(D, ro, EncoderConfig(hidden_dim=D, nheads=HEADS, dim_feedforward=FF, dec_layers=2))
    for name, p in [*model.decoder.named_parameters(), *model.encoder.named_parameters()]:
        if p.dim() > 1:
            bound = math.sqrt(6 / (p.shape[0] + p.shape[1]))
            assert 0.8 * bound < p.abs().max() <= bound, name
    keys = model.state_dict().keys()
    assert not any("self_attn" in k or "norm2" in k for k in keys) and "dec_norm.weight" in keys
    detr = TransformerBrainEncoder(D, ro, EncoderConfig(hidden_dim=D, nheads=HEADS, query_self_attn=True, pre_norm=0))
    assert {"decoder.0.self_attn.in_proj_weight", "decoder.0.norm2.weight"} <= detr.state_dict().keys()
    assert "decoder.0.norm2.weight" in TransformerBrainEncoder(D, ro, EncoderConfig(hidden_dim=D, nheads=HEADS,
                                                                                    pre_norm=0)).state_dict()
    x = torch.randn(2, D, 6, 7)
    for layer, changes in ((0, False), (-1, True)):
        enc = TransformerBrainEncoder(D, ro, EncoderConfig(hidden_dim=D, nheads=HEADS, enc_layers=2, dropout=0.0,
                                                           enc_output_layer=layer)).eval()
        with torch.no_grad():
            before = enc(x)["lh_f_pred"]
            enc.encoder[1].linear2.weight.add_(1.0)
            assert (not torch.equal(before, enc(x)["lh_f_pred"])) == changes
    with pytest.raises(BadArgumentError, match="--enc_output_layer 2: with --enc_layers 2"):
        EncoderConfig(enc_layers=2, enc_output_layer=2).check()
    learned = TransformerBrainEncoder(D, ro, EncoderConfig(hidden_dim=D, nheads=HEADS, position_embedding="learned"))
    assert learned.position.row_embed.weight.shape == (50, D // 2) and learned(x)["rh_f_pred"].shape == (2, 4)
    with pytest.raises(BadArgumentError, match="grids up to 50x50"):
        learned(torch.randn(1, D, 51, 2))


# ---- loading the reference's checkpoints --------------------------------------------------------------------------
REF_ARGS = {"encoder_arch": "transformer", "readout_res": "rois_all", "hidden_dim": D, "nheads": HEADS,
            "dim_feedforward": FF, "dec_layers": 1, "enc_layers": 0, "pre_norm": 1, "position_embedding": "sine",
            "enc_output_layer": 1, "lh_vs": VERTICES[0], "rh_vs": VERTICES[1], "rois_ind": [0, 1, 2, 3, 4]}
BACKBONE = {"backbone_model.0.blocks.0.attn.qkv.weight": torch.zeros(3, 2), "backbone_model.0.norm.bias": torch.zeros(2)}


def test_reference_checkpoint_loads_with_one_line_naming_the_ignored_keys(data, tmp_path, caplog):
    nv = dict(zip(("lh", "rh"), VERTICES))
    torch.manual_seed(1)
    ref = RefBrainEncoder(D, HEADS, FF, 1, 1, reference_rois(data["subj"], ROI_CLASSES[:5]), nv).eval()
    file = save_reference_checkpoint(tmp_path / "checkpoint.pth", ref, BACKBONE, **REF_ARGS)
    model = TransformerBrainEncoder(D, make_readout("rois_all", nv, load_rois(data["subj"])),
                                    EncoderConfig(hidden_dim=D, nheads=HEADS, dim_feedforward=FF)).eval()
    caplog.set_level(logging.INFO, logger="featstore")
    info = load_checkpoint(file, model)
    assert info.layout == "reference" and info.epoch == 4 and info.settings["readout_res"] == "rois_all"
    lines = [r.getMessage() for r in caplog.records if r.name == "featstore.encoding.checkpoint"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "loaded the reference's checkpoint (epoch 4)" in lines[0]
    for named in ("transformer.decoder.layers.{0}.self_attn.*", "transformer.decoder.layers.{0}.norm2.*",
                  "transformer.memory_proj.*", "backbone_model.0.* (2 tensors"):
        assert named in lines[0], lines[0]
    x = torch.randn(2, D, 31, 31)
    with torch.no_grad():
        for a, b in zip(ref(x), model(x).values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the same model
    # the command line: --resume FILE trains on from those weights, with the same one line
    caplog.clear()
    flags = ["--saved_feats_dir", str(data["store"]), "--data_dir", str(data["data"]), "--device", "cpu",
             "--hidden_dim", str(D), "--nheads", str(HEADS), "--dim_feedforward", str(FF), "--epochs", "1",
             "--num_workers", "0", "--no_progress", "--resume", str(file), "--output_path", str(tmp_path / "run")]
    assert _tool_main()(flags) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "featstore.encoding.checkpoint"]
    assert len(lines) == 1 and "ignored 10 keys" in lines[0] and "memory_proj" in lines[0], lines


def test_resume_refuses_other_model_flags_and_unsafe_files(data, tmp_path, capsys):
    nv = dict(zip(("lh", "rh"), VERTICES))
    ref = RefBrainEncoder(D, HEADS, FF, 1, 1, reference_rois(data["subj"], ROI_CLASSES[:5]), nv)
    good = save_reference_checkpoint(tmp_path / "ok.pth", ref, **REF_ARGS)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": ref.state_dict(), "args": argparse.Namespace(save_dir=Path("/x"))}, unsafe)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    base = ["--saved_feats_dir", str(data["store"]), "--data_dir", str(data["data"]), "--device", "cpu",
            "--hidden_dim", str(D), "--nheads", str(HEADS), "--dim_feedforward", str(FF), "--no_progress",
            "--output_path", str(tmp_path / "bad")]
    for extra, message in (
        (["--resume", str(good), "--pre_norm", "0"], "was trained with --pre_norm 1 (this run: 0); give the same"),
        (["--resume", str(good), "--dim_feedforward", "32"], "--dim_feedforward 64 (this run: 32)"),
        (["--resume", str(unsafe)], "not loaded, it holds more than tensors and plain values (it needs pathlib."),
        (["--resume", str(tmp_path / "junk.pth")], "not a readable torch checkpoint"),
        (["--resume", str(tmp_path / "none.pth")], "no such file"),
    ):
        assert _tool_main()(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("train_encoder: error: --resume ") and message in err[0], err
    assert not (tmp_path / "bad").exists()


# ---- training: StepLR, model selection by val_perf, damaged stores --------------------------------------------------
def test_never_better_than_zero_keeps_no_checkpoint_but_writes_predictions(data, tmp_path, caplog):
    """Constant fMRI: r is undefined (NaN, counted 0), so no epoch beats 0: one warning line, no checkpoint, the last
    epoch's predictions; the learning rate halves every --lr_drop epochs."""
    subj = tmp_path / "subj01"
    shutil.copytree(data["subj"], subj)
    for hemi, nv in zip(("lh", "rh"), VERTICES):
        np.save(subj / "training_split" / "training_fmri" / f"{hemi}_training_fmri.npy", np.ones((N_TRAIN, nv), np.float32))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"an earlier run's")
    caplog.set_level(logging.INFO, logger="featstore")
    res = train_encoder(config(data, "transformer", data_dir=subj, epochs=2, lr_drop=1, output_path=tmp_path / "run"))
    m = res.metrics
    assert m["best_epoch"] is None and m["val_perf"] == 0.0 and [e["val_perf"] for e in m["history"]] == [0.0, 0.0]
    assert [e["lr"] for e in m["history"]] == [5e-3, 2.5e-3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no epoch reached a val_perf above 0" in warnings[0], warnings
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and "checkpoint" not in res.files
    assert np.load(tmp_path / "run" / "lh_pred_test.npy").shape == (N_TEST, VERTICES[0])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val_perf"] == 0.0


def test_damaged_store_is_one_line_before_or_during_training(data, tmp_path, capfd):
    """A corrupt chunk: the same line export-npy prints (array and chunk named, `featstore verify --repair`), no
    DataLoader worker traceback, exit 1 (the test split's checksums are checked before training; a training chunk
    stops the first epoch). An incomplete array: refused before training, exit 2."""
    store = tmp_path / "store.zarr"
    shutil.copytree(data["store"], store)
    flags = ["--saved_feats_dir", str(store), "--data_dir", str(data["data"]), "--device", "cpu", "--epochs", "1",
             "--hidden_dim", "32", "--nheads", "2", "--dim_feedforward", "64", "--num_workers", "2", "--no_progress",
             "--output_path", str(tmp_path / "run")]
    for split, chunk in (("synt", 2), ("train", 37)):
        f = next(p for p in (store / "dinov2_q_last" / "01" / split / "c" / str(chunk)).rglob("*") if p.is_file())
        original = f.read_bytes()
        f.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
        with pytest.raises(CorruptChunkError) as exported:
            export_npy(store, tmp_path / "npy", split=split, progress=False)
        capfd.readouterr()
        assert _tool_main()(flags) == 1
        err = capfd.readouterr().err.strip().splitlines()
        assert err == [f"train_encoder: error: {exported.value}"], err
        assert f"dinov2_q_last/01/{split}: chunk {chunk} is corrupt" in err[0] and "featstore verify --repair" in err[0]
        f.write_bytes(original)
    assert not (tmp_path / "run").exists()
    FeatureStore(store, mode="a").get("dinov2_q_last", "01", "train").mark_undone([5])
    assert _tool_main()(flags) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [("train_encoder: error: dinov2_q_last/01/train is incomplete (119/120 chunks done); finish the "
                    "extraction (rerun the same extract command) before training an encoder on it")], err
