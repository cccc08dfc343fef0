"""Extraction core: real tiny backbones, real Zarr stores on disk, real subprocesses for the CLI."""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from featstore import export_npy, extract, get_backbone
from featstore.errors import LayoutError
from featstore.storage import FeatureStore
from tests.conftest import TINY, cli_here, run_cli


def _direct(backbone: str, subject, split: str = "train", **kw) -> np.ndarray:
    """Independent computation: preprocess each image and run the backbone, no pipeline involved."""
    bb = get_backbone(backbone, arch="tiny", weights="random", seed=0, **kw)
    folder = "training_split/training_images" if split == "train" else "test_split/test_images"
    paths = sorted((subject / folder).glob("*.png"))
    x = torch.stack([bb.preprocess(Image.open(p)) for p in paths])
    with torch.inference_mode():
        return bb(x).numpy()


@pytest.mark.parametrize("backbone", ["dinov2_q", "dinov2", "clip"])
def test_extract_matches_direct_forward(subject, tmp_path, backbone):
    res = extract(subject, tmp_path / "s.zarr", backbone=backbone, batch_size=4, dtype="float32", **TINY)
    ref = _direct(backbone, subject)
    fa = FeatureStore(tmp_path / "s.zarr").get(res.feature, "01", "train")
    np.testing.assert_array_equal(fa.read(0, fa.shape[0]), ref)
    assert [s.path.split("/")[-1] for s in res.splits] == ["train", "synt"]
    expected_T = 257 if backbone == "clip" else 962
    assert fa.shape[1] == expected_T and fa.grid == ((16, 16) if backbone == "clip" else (31, 31))


def test_float16_default_store_readable_by_plain_zarr(subject, tmp_path):
    extract(subject, tmp_path / "s.zarr", backbone="dinov2_q", batch_size=4, **TINY)
    a = zarr.open_array(tmp_path / "s.zarr", path="dinov2_q_last/01/train", mode="r")
    assert a.dtype == np.float16 and a.shape[:2] == (6, 962) and a.chunks[0] == 1
    assert a.metadata.dimension_names == ("train_image", "token", "channel")
    assert np.isnan(a.metadata.fill_value)  # unwritten samples read as NaN in any reader
    names = [c.to_dict()["name"] for c in a.metadata.codecs]
    from featstore.storage import DEFAULT_CODEC, compressors

    assert names == ["bytes", *[c.to_dict()["name"] for c in compressors(DEFAULT_CODEC, "float16")]]
    assert names[-1] == "crc32c"
    meta = a.attrs["featstore"]
    assert meta["backbone"] == "dinov2_q" and meta["layer"] == meta["num_layers"] - 1
    assert meta["weights"] == {"kind": "random", "seed": 0}
    assert meta["token_layout"] == {"cls_index": 0, "grid": [31, 31], "n_tokens": 962}
    assert meta["image_names"] == sorted(meta["image_names"]) and len(meta["image_names"]) == 6
    assert meta["preprocess"]["pad_multiple"] == 14 and meta["input_size"] == [434, 434]
    assert {"torch", "zarr", "numpy", "featstore"} <= set(meta["versions"])
    ref = _direct("dinov2_q", subject)
    np.testing.assert_array_equal(a[...], ref.astype(np.float16))
    # the zarr.json is plain JSON any Zarr v3 reader understands
    doc = json.loads((tmp_path / "s.zarr/dinov2_q_last/01/train/zarr.json").read_text())
    assert doc["zarr_format"] == 3 and doc["node_type"] == "array"


def test_chunks_of_several_samples_and_edge_chunk(subject, tmp_path):
    extract(subject, tmp_path / "a.zarr", backbone="dinov2", batch_size=3, chunk=4, **TINY)
    extract(subject, tmp_path / "b.zarr", backbone="dinov2", batch_size=5, chunk=1, **TINY)
    a = FeatureStore(tmp_path / "a.zarr").get("dinov2_last", "01", "train")
    b = FeatureStore(tmp_path / "b.zarr").get("dinov2_last", "01", "train")
    assert a.zarr.chunks[0] == 4 and a.nchunks == 2 and a.is_complete()
    np.testing.assert_array_equal(a.read(0, 6), b.read(0, 6))


def test_layer_naming_and_values(subject, tmp_path):
    res = extract(subject, tmp_path / "s.zarr", backbone="dinov2_q", enc_layer=0, dtype="float32", **TINY)
    assert res.feature == "dinov2_q_layer0"
    ref = _direct("dinov2_q", subject, layer=0)
    np.testing.assert_array_equal(FeatureStore(tmp_path / "s.zarr").get("dinov2_q_layer0", "01", "train").read(0, 6), ref)


def test_export_npy_equals_store_and_legacy_reshape(subject, tmp_path):
    extract(subject, tmp_path / "s.zarr", backbone="dinov2_q", **TINY)
    files = export_npy(tmp_path / "s.zarr", tmp_path / "npy", progress=False)
    assert sorted(p.relative_to(tmp_path / "npy").as_posix() for p in files) == [
        "dinov2_q_last/01/synt.npy", "dinov2_q_last/01/train.npy"]
    x = np.load(tmp_path / "npy/dinov2_q_last/01/train.npy")
    fa = FeatureStore(tmp_path / "s.zarr").get("dinov2_q_last", "01", "train")
    assert x.dtype == np.float32 and x.shape == fa.shape
    np.testing.assert_array_equal(x, fa.read(0, 6).astype(np.float32))
    C = x.shape[-1]
    legacy = torch.reshape(torch.tensor(x[2])[1:, :], (31, 31, C)).permute(2, 0, 1)
    assert legacy.shape == (C, 31, 31)


def test_float16_overflow_is_an_error_not_inf(subject, tmp_path):
    bb = get_backbone("dinov2", arch="tiny", weights="random")
    with torch.no_grad():
        bb.module.norm.bias.fill_(1e6)  # a backbone whose outputs do not fit float16
    from featstore.errors import Float16OverflowError

    with pytest.raises(Float16OverflowError, match="float32"):
        extract(subject, tmp_path / "s.zarr", backbone=bb, **{k: v for k, v in TINY.items() if k not in ("arch", "weights")})
    fa = FeatureStore(tmp_path / "s.zarr").get("dinov2_last", "01", "train")
    assert not fa.done_mask().any()


def test_missing_test_split_is_skipped_with_warning(tmp_path, caplog):
    from featstore.sample import make_sample_subject

    subj = make_sample_subject(tmp_path / "d", n_train=2, n_test=0)
    res = extract(subj, tmp_path / "s.zarr", backbone="dinov2_q", **TINY)
    assert [s.path for s in res.splits] == ["dinov2_q_last/01/train"]
    assert any("skipped" in r.message for r in caplog.records)


# Extract each (subject, store) pair in turn and print the process's own peak RSS after each; VmHWM, since
# ru_maxrss would carry the parent's peak over fork + exec.
_PEAK_CHILD = """
import sys
from featstore.extraction import extract
for subj, store in zip(sys.argv[1::2], sys.argv[2::2]):
    extract(subj, store, backbone="dinov2_q,dinov2", enc_layer="all", arch="tiny", weights="random", device="cpu",
            num_workers=0, progress=False, dtype="float32", batch_size=8, durable=False, queue_mb=4)
    print(next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_bounded_memory(tmp_path):
    """Peak RSS must not grow with N: 16 then 80 images into 6 arrays (both variants, every block of the tiny model)
    with a 4 MB writer queue, in one process (one interpreter start). Keeping the features would add ~70 MB (64 more
    images x 6 x 962 x 48 float32), and more if they outlived a run.

    glibc's mmap threshold is pinned: its dynamic threshold moves freed chunk-sized buffers into per-thread heaps,
    a one-off ~45 MB that takes ~100 images to level off and would read as growth between small N."""
    import os
    import subprocess

    from featstore.sample import make_sample_subject

    args = []
    for n in (16, 80):
        args += [str(make_sample_subject(tmp_path / f"d{n}", n_train=n, n_test=0)), str(tmp_path / f"s{n}.zarr")]
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)})
    peaks = [int(x) / 1024 for x in out.stdout.split()]
    assert len(peaks) == 2 and peaks[1] - peaks[0] < 25, peaks


# ---- the command line: one-line errors, exit 2, nothing written -------------------------------------------------
def _assert_one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("featstore: error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in err[0], err[0]


def _extract_args(subject, out, *extra):
    return ["extract", "--data_dir", str(subject), "--output_dir", str(out), "--weights", "random",
            "--arch", "tiny", "--device", "cpu", "--num_workers", "0", *extra]


BAD_RUNS = {  # (how the subject folder, the store and the flags are made wrong, words of the one error line)
    "missing data_dir": (lambda subj, tmp: (tmp / "nope", tmp / "s.zarr", []), ["--data_dir"]),
    "no train folder": (lambda subj, tmp: ((tmp / "subj01").mkdir() or tmp / "subj01", tmp / "s.zarr", []),
                        ["training_split/training_images"]),
    "unknown backbone": (lambda subj, tmp: (subj, tmp / "s.zarr", ["--backbone", "vgg"]), ["--backbone 'vgg'",
                                                                                            "dinov2_q"]),
    "subj 0": (lambda subj, tmp: (subj, tmp / "s.zarr", ["--subj", "0"]), ["--subj"]),
    "subj abc": (lambda subj, tmp: (subj, tmp / "s.zarr", ["--subj", "abc"]), ["--subj"]),
    "subj of another folder": (lambda subj, tmp: (subj, tmp / "s.zarr", ["--subj", "02"]), ["--subj 02"]),
    "output_dir under a file": (lambda subj, tmp: (subj, (tmp / "file").write_text("x") and tmp / "file" / "s.zarr",
                                                   []), ["--output_dir"]),
    "output_dir in /proc": (lambda subj, tmp: (subj, "/proc/x.zarr", []), ["--output_dir /proc/x.zarr"]),
    "output_dir not a store": (lambda subj, tmp: (subj, _folder_with_data(tmp), []),
                               ["--output_dir", "not a featstore store"]),
    "missing weights file": (lambda subj, tmp: (subj, tmp / "s.zarr", ["--weights", str(tmp / "missing.pth")]),
                             ["missing.pth"]),
}


def _folder_with_data(tmp):
    (tmp / "notastore").mkdir()
    (tmp / "notastore" / "keep.txt").write_text("data")
    return tmp / "notastore"


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_cli_mistakes_are_one_line_exit_2_and_write_nothing(case, subject, tmp_path, capsys, caplog):
    """Each mistake is refused before any model is built: one error line naming the flag, exit 2, no store made,
    no warning before it (e.g. no CUDA warning: the device is resolved after every argument is checked)."""
    make, words = BAD_RUNS[case]
    data_dir, out, extra = make(subject, tmp_path)
    args = ["extract", "--data_dir", str(data_dir), "--output_dir", str(out), "--device", "cuda", *extra]
    if "--weights" not in extra:
        args += ["--weights", "random", "--arch", "tiny"]
    with caplog.at_level(logging.WARNING, logger="featstore"):
        r = cli_here(capsys, *args)
    _assert_one_line_error(r, *words)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING], caplog.records
    assert not (tmp_path / "s.zarr").exists()
    if case == "output_dir not a store":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_cli_extract_cuda_falls_back_and_prints_summary(subject, tmp_path):
    r = run_cli(*_extract_args(subject, tmp_path / "s.zarr")[:-4], "--num_workers", "1", "--batch_size", "4",
                "--device", "cuda")
    assert r.returncode == 0, r.stderr
    if not torch.cuda.is_available():
        assert "CUDA is not available" in r.stderr
    assert "RANDOM weights" in r.stderr
    assert "dinov2_q_last/01/train: N=6" in r.stdout and "computed 6" in r.stdout
    info = run_cli("info", str(tmp_path / "s.zarr"))
    assert info.returncode == 0 and "dinov2_q_last/01/train" in info.stdout and "6/6" in info.stdout


@pytest.mark.parametrize("backbone", ["dinov2", "clip"])
def test_preprocessing_rebuilt_from_attributes_alone(subject, tmp_path, backbone):
    from featstore.backbones import Preprocess

    res = extract(subject, tmp_path / "s.zarr", backbone=backbone, dtype="float32", **TINY)
    fa = FeatureStore(tmp_path / "s.zarr").get(res.feature, "01", "train")
    pre = Preprocess.from_dict(fa.meta["preprocess"])
    img = Image.open(subject / "training_split/training_images" / fa.image_names[3])
    bb = get_backbone(backbone, arch="tiny", weights="random", seed=fa.meta["weights"]["seed"])
    with torch.inference_mode():
        row = bb(pre(img)[None]).numpy()[0]
    assert list(pre(img).shape[-2:]) == fa.meta["input_size"]
    np.testing.assert_array_equal(fa.read(3)[0], row)


def test_cli_export_info_verify_errors(subject, tmp_path):
    r = run_cli("info", str(tmp_path / "nowhere.zarr"))
    _assert_one_line_error(r, "nowhere.zarr", "not a featstore store")
    store = tmp_path / "s.zarr"
    extract(subject, store, backbone="dinov2_q", **TINY)
    r = run_cli("export-npy", "--store", str(store), "--output_dir", str(tmp_path / "npy"), "--feature", "clip_vit_512")
    _assert_one_line_error(r, "clip_vit_512", "dinov2_q_last/01/train")
    FeatureStore(store, mode="a").get("dinov2_q_last", "01", "train").mark_undone([2])
    r = run_cli("export-npy", "--store", str(store), "--output_dir", str(tmp_path / "npy"))
    _assert_one_line_error(r, "incomplete", "5/6")
    assert not list((tmp_path / "npy").rglob("*.npy"))
    r = run_cli("verify", str(store))
    assert r.returncode == 1 and "missing chunks: 2" in r.stdout


# ---- the images of a run: odd sizes, empty folders, non-RGB modes; the summary line ------------------------------
TRAIN_DIR, TEST_DIR = "training_split/training_images", "test_split/test_images"


def test_an_odd_sized_image_is_refused_up_front_by_name(fresh_subject, tmp_path, capsys):
    from conftest import cli_here

    odd = sorted((fresh_subject / TRAIN_DIR).iterdir())[4]
    Image.open(odd).convert("RGB").resize((500, 500)).save(odd)
    out = tmp_path / "s.zarr"
    r = cli_here(capsys, *_extract_args(fresh_subject, out))
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [(
        f"featstore: error: {fresh_subject / TRAIN_DIR}: 1 of 6 images differ in size from the others (425x425 px): "
        f"{odd.name} (500x500 px); resize or remove them, or pass --image_size S to resize every image to SxS; "
        "nothing was written")]
    assert not out.exists()
    res = extract(fresh_subject, out, backbone="dinov2_q", image_size=224, **TINY)  # the advice works
    assert res.splits[0].shape[1] == 1 + 16 * 16


def test_an_empty_split_is_skipped_and_jpg_images_are_read(fresh_subject, tmp_path, caplog):
    for p in (fresh_subject / TEST_DIR).iterdir():
        p.unlink()
    for p in sorted((fresh_subject / TRAIN_DIR).iterdir())[:2]:
        Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=95)
        p.unlink()
    res = extract(fresh_subject, tmp_path / "s.zarr", backbone="dinov2_q", **TINY)
    assert [(s.path, s.computed) for s in res.splits] == [("dinov2_q_last/01/train", 6)]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert said == [f"{fresh_subject / TEST_DIR}: no images (.png, .jpg or .jpeg files); split 'synt' skipped"]
    for p in (fresh_subject / TRAIN_DIR).iterdir():
        p.unlink()
    with pytest.raises(LayoutError, match=r"no images \(\.png, \.jpg or \.jpeg files\) in "
                                          r"training_split/training_images/ or test_split/test_images/"):
        extract(fresh_subject, tmp_path / "t.zarr", backbone="dinov2_q", **TINY)


def test_non_rgb_images_are_converted_counted_once_and_recorded(fresh_subject, tmp_path, caplog):
    train = sorted((fresh_subject / TRAIN_DIR).iterdir())
    for p, mode in zip(train, ("L", "L", "RGBA")):
        Image.open(p).convert(mode).save(p)
    synt = min((fresh_subject / TEST_DIR).iterdir())
    Image.open(synt).convert("CMYK").save(synt.with_suffix(".jpg"), quality=95)
    synt.unlink()
    caplog.set_level(logging.INFO, logger="featstore")
    extract(fresh_subject, tmp_path / "s.zarr", backbone="dinov2_q", **TINY)
    said = [r.getMessage() for r in caplog.records if "RGB" in r.getMessage()]
    assert said == [("converting 4 of 8 images to RGB (2 greyscale (L), 1 RGBA, 1 CMYK), as the backbone expects; "
                     "recorded as converted_to_rgb in the arrays' provenance")], said
    fs = FeatureStore(tmp_path / "s.zarr")
    tr, sy = (fs.get("dinov2_q_last", "01", s).provenance for s in ("train", "synt"))
    assert (tr["converted_to_rgb"], tr["image_modes"]) == (3, {"L": 2, "RGBA": 1, "RGB": 3})
    assert (sy["converted_to_rgb"], sy["image_modes"]) == (1, {"CMYK": 1, "RGB": 1})


def test_summary_line_gives_the_size_against_the_float32_npy_plainly(subject, tmp_path):
    f32 = extract(subject, tmp_path / "a.zarr", backbone="dinov2_q", dtype="float32", codec="none", **TINY)
    f16 = extract(subject, tmp_path / "b.zarr", backbone="dinov2_q", codec="none", **TINY)
    assert "MB on disk (same size as the float32 .npy)" in f32.splits[0].line(), f32.splits[0].line()
    assert "MB on disk (0.50x the size of the float32 .npy)" in f16.splits[0].line(), f16.splits[0].line()
    assert "smaller" not in f32.splits[0].line()
