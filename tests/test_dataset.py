"""FeatureDataset and train_val_split on real Zarr stores on disk, read through a real torch DataLoader."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import TINY
from torch.utils.data import DataLoader

from featstore import FeatureDataset, FeatureStore, export_npy, extract, make_sample_subject, train_val_split
from featstore.errors import (
    BadArgumentError,
    CorruptChunkError,
    IncompleteArrayError,
    LayoutError,
    NotFoundInStoreError,
    StoreError,
)
from featstore.storage import ArraySpec, _zarr_compat

DINO = ("dinov2_q_last", (31, 31), 8)  # feature, real grid, small C
CLIP = ("clip_vit_512", (16, 16), 12)


def names(n: int, tag: str = "") -> list[str]:
    return [f"{tag}img{i:05d}.png" for i in range(n)]


def make_array(
    root: Path | FeatureStore,
    feature: str,
    n: int,
    grid: tuple[int, int],
    c: int,
    *,
    split: str = "train",
    chunk: int = 3,
    dtype: str = "float16",
    seed: int = 0,
    image_names: list[str] | None = None,
    write: bool = True,
) -> np.ndarray:
    """Create {feature}/01/{split} (N, 1+H*W, C) with random values; returns the values as stored."""
    fs = root if isinstance(root, FeatureStore) else FeatureStore(root, "a")
    t = 1 + grid[0] * grid[1]
    meta = {
        "token_layout": {"cls_index": 0, "grid": list(grid), "n_tokens": t},
        "image_names": image_names if image_names is not None else names(n),
    }
    fa, _ = fs.prepare(feature, "01", split, ArraySpec((n, t, c), chunk, dtype), meta=meta,
                       fingerprint={"test": feature})
    data = (np.random.default_rng(seed).standard_normal((n, t, c)) * 3).astype(dtype)
    if write:
        fa.write_chunks(0, data, durable=False)
    return data


def legacy_item(x: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """The legacy dataset's `torch.reshape(img[1:, :], (31, 31, 768)).permute(2, 0, 1)`."""
    img = torch.tensor(x)
    return torch.reshape(img[1:, :], (*grid, img.shape[1])).permute(2, 0, 1)


def write_images(subject: Path, image_names: list[str], split: str = "train") -> None:
    """The split's image folder with these names (empty files: the Dataset compares names only)."""
    d = subject / ("training_split/training_images" if split == "train" else "test_split/test_images")
    d.mkdir(parents=True, exist_ok=True)
    for name in image_names:
        (d / name).touch()


def write_fmri(subject: Path, n: int, vertices=(7, 5), rows: int | None = None) -> dict[str, np.ndarray]:
    """A subject folder for a store of n train images names(n): the image names and fMRI of (rows or n) rows."""
    write_images(subject, names(n))
    d = subject / "training_split" / "training_fmri"
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for hemi, v in zip(("lh", "rh"), vertices):
        out[hemi] = np.random.default_rng(len(hemi) + v).standard_normal((rows or n, v)).astype(np.float32)
        np.save(d / f"{hemi}_training_fmri.npy", out[hemi])
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """dinov2_q_last (f16, chunk 3, N=7: last chunk partial) and clip_vit_512 (f32, chunk 1) for train and synt."""
    root = tmp_path_factory.mktemp("st") / "st"
    fs = FeatureStore(root, "a")
    n, n_synt = 7, 4
    out = {"root": root, "n": n}
    out["dino"] = make_array(fs, DINO[0], n, DINO[1], DINO[2], chunk=3, seed=1)
    out["clip"] = make_array(fs, CLIP[0], n, CLIP[1], CLIP[2], chunk=1, dtype="float32", seed=2)
    synt = {"split": "synt", "image_names": names(n_synt, "t")}
    out["dino_synt"] = make_array(fs, DINO[0], n_synt, DINO[1], DINO[2], seed=3, **synt)
    out["clip_synt"] = make_array(fs, CLIP[0], n_synt, CLIP[1], CLIP[2], seed=4, **synt)
    out["npy"] = tmp_path_factory.mktemp("npy")
    export_npy(root, out["npy"], progress=False)
    return out


# ---- contents -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feature, grid, c", [DINO, CLIP])
@pytest.mark.parametrize("split", ["train", "synt"])
def test_items_equal_legacy_reshape_of_npy_export(store, feature, grid, c, split):
    legacy = np.load(store["npy"] / feature / "01" / f"{split}.npy", mmap_mode="r")
    ds = FeatureDataset(store["root"], feature=feature, subj="01", split=split)
    assert len(ds) == legacy.shape[0] and ds.grid == grid and ds.channels == c
    for i in range(len(ds)):
        img = ds[i]
        assert img.dtype == torch.float32 and img.shape == (c, *grid)
        assert torch.equal(img, legacy_item(legacy[i], grid))
    assert torch.equal(ds[-1], ds[len(ds) - 1])


def test_grid_comes_from_the_array_attributes(tmp_path):
    data = make_array(tmp_path / "st", "dinov2_layer3", 4, (3, 5), 6, chunk=2, dtype="float32")
    ds = FeatureDataset(tmp_path / "st", feature="dinov2_layer3")
    assert ds[2].shape == (6, 3, 5)
    assert torch.equal(ds[2], legacy_item(data[2], (3, 5)))


def test_indices_select_and_order_samples(store):
    ds = FeatureDataset(store["root"], indices=[5, 0, 6])
    full = FeatureDataset(store["root"])
    assert len(ds) == 3
    for i, j in enumerate([5, 0, 6]):
        assert torch.equal(ds[i], full[j])


def test_fast_local_read_equals_zarr_read_and_checks_the_checksum(store, tmp_path):
    """FeatureArray.read_sample decodes the chunk file itself where zarr offers the fast path; it must equal zarr's own
    read, partial chunk too. On the public path (older zarr, FEATSTORE_CHUNKIO=public) the checksum check still holds."""
    fa = FeatureStore(store["root"]).get(DINO[0], "01", "train")
    assert (fa._steps is not None) == _zarr_compat.fast_enabled()  # the path this environment selects is the one in use
    for j in range(store["n"]):
        np.testing.assert_array_equal(fa.read_sample(j), fa.zarr[j])
    # a flipped byte in a chunk file is caught by the crc32c codec, as zarr's path would
    fs = FeatureStore(tmp_path / "st", "a")
    make_array(fs, DINO[0], 2, DINO[1], DINO[2], chunk=1)
    chunk_file = tmp_path / "st" / DINO[0] / "01" / "train" / "c" / "1" / "0" / "0"
    raw = bytearray(chunk_file.read_bytes())
    raw[100] ^= 0xFF
    chunk_file.write_bytes(bytes(raw))
    ds = FeatureDataset(tmp_path / "st")
    intact = fs.get(DINO[0], "01", "train").zarr[0]  # zarr's own read of the chunk left alone
    np.testing.assert_array_equal(ds[0].numpy(), np.moveaxis(intact[1:].astype(np.float32), -1, 0).reshape(ds[0].shape))
    with pytest.raises(ValueError, match="chunk 1 is corrupt.*checksum"):
        ds[1]


# ---- fMRI targets -----------------------------------------------------------------------------------------------
def test_fmri_targets_follow_the_sample_rows(store, tmp_path):
    fmri = write_fmri(tmp_path / "subj01", store["n"])
    ds = FeatureDataset(store["root"], data_dir=tmp_path / "subj01", indices=[4, 1])
    img, y = ds[0]
    assert set(y) == {"lh_f", "rh_f"}
    assert torch.equal(img, FeatureDataset(store["root"])[4])
    for hemi in ("lh", "rh"):
        assert y[f"{hemi}_f"].dtype == torch.float32
        assert torch.equal(y[f"{hemi}_f"], torch.from_numpy(fmri[hemi][4]))
    assert torch.equal(ds[1][1]["rh_f"], torch.from_numpy(fmri["rh"][1]))


def test_fmri_row_count_mismatch_is_a_clear_error(store, tmp_path):
    write_fmri(tmp_path / "subj01", store["n"], rows=store["n"] + 1)
    with pytest.raises(BadArgumentError, match=r"lh_training_fmri\.npy has shape \(8, 7\), expected \(7, "):
        FeatureDataset(store["root"], data_dir=tmp_path / "subj01")


def test_missing_fmri_file_names_the_file(store, tmp_path):
    write_fmri(tmp_path / "subj01", store["n"])
    (tmp_path / "subj01" / "training_split" / "training_fmri" / "rh_training_fmri.npy").unlink()
    with pytest.raises(LayoutError, match="rh_training_fmri.npy"):
        FeatureDataset(store["root"], data_dir=tmp_path / "subj01")


def test_synt_and_test_with_data_dir_give_images_without_fmri(store, tmp_path):
    write_fmri(tmp_path / "subj01", store["n"])
    with pytest.raises(LayoutError, match=r"no test_split/test_images/ to match the images of dinov2_q_last/01/synt"):
        FeatureDataset(store["root"], split="synt", data_dir=tmp_path / "subj01")
    write_images(tmp_path / "subj01", names(4, "t"), split="synt")
    plain = FeatureDataset(store["root"], split="synt")
    for split in ("synt", "test"):
        ds = FeatureDataset(store["root"], split=split, data_dir=tmp_path / "subj01")
        assert ds.split == "synt" and len(ds) == 4 and ds.n_vertices == {}
        for i in range(len(ds)):
            item = ds[i]
            assert isinstance(item, torch.Tensor) and torch.equal(item, plain[i])
        with pytest.raises(BadArgumentError, match="no fMRI targets"):
            ds.targets(0)


def test_split_test_is_the_synt_split(store):
    legacy = np.load(store["npy"] / DINO[0] / "01" / "synt.npy")
    ds = FeatureDataset(store["root"], split="test")
    assert ds.split == "synt" and len(ds) == len(legacy) and "dinov2_q_last/01/synt" in repr(ds)
    for i in range(len(ds)):
        assert torch.equal(ds[i], legacy_item(legacy[i], DINO[1]))


def test_data_dir_of_another_subject_is_refused_in_one_line(subject, tmp_path):
    """Real stores and subjects: subj02 has as many images as subj01 (other NSD ids), and must not be paired."""
    other = make_sample_subject(tmp_path / "other", subj="02", n_train=6, n_test=2, seed=0)
    extract(subject, tmp_path / "st.zarr", backbone="dinov2_q", batch_size=8, durable=False, **TINY)
    ds = FeatureDataset(tmp_path / "st.zarr", data_dir=subject)
    assert ds.n_vertices == {"lh": 200, "rh": 180} and len(ds) == 6
    for split in ("train", "test"):
        with pytest.raises(BadArgumentError) as info:
            FeatureDataset(tmp_path / "st.zarr", split=split, data_dir=other)
        msg = str(info.value)
        assert "\n" not in msg and "holds other images than dinov2_q_last/01/" in msg and "index 0 stored" in msg
    os.rename(other / "training_split" / "training_images", tmp_path / "moved")
    with pytest.raises(LayoutError, match="no training_split/training_images/"):
        FeatureDataset(tmp_path / "st.zarr", data_dir=other)


def test_targets_of_an_item_without_its_features(store, tmp_path):
    fmri = write_fmri(tmp_path / "subj01", store["n"])
    ds = FeatureDataset(store["root"], data_dir=tmp_path / "subj01", indices=[3, 5])
    y = ds.targets(1)
    assert torch.equal(y["rh_f"], torch.from_numpy(fmri["rh"][5])) and ds.n_vertices == {"lh": 7, "rh": 5}
    assert torch.equal(ds[1][1]["lh_f"], y["lh_f"])


def test_legacy_target_format_batches_like_the_older_training_code(store, tmp_path):
    """The older code's loop, verbatim: default collate, then `targets = [dict(zip(targets, t)) for t in
    zip(*targets.values())]` and `targets[0]["lh_f"]` as the (B, V) batch."""
    fmri = write_fmri(tmp_path / "subj01", store["n"])
    write_images(tmp_path / "subj01", names(4, "t"), split="synt")
    ds = FeatureDataset(store["root"], data_dir=tmp_path / "subj01", target_format="legacy", indices=[6, 2, 4, 0])
    img, y = ds[0]
    assert torch.equal(img, FeatureDataset(store["root"])[6])
    assert set(y) == {"lh_f", "rh_f"} and isinstance(y["lh_f"], list) and len(y["lh_f"]) == 1
    assert isinstance(y["lh_f"][0], np.ndarray) and y["lh_f"][0].dtype == np.float32
    np.testing.assert_array_equal(y["rh_f"][0], fmri["rh"][6])
    seen = 0
    for imgs, targets in DataLoader(ds, batch_size=3, num_workers=0):
        assert isinstance(targets, dict) and isinstance(targets["lh_f"], list) and len(targets["lh_f"]) == 1
        targets = [dict(zip(targets, t)) for t in zip(*targets.values())]
        lh_f, rh_f = targets[0]["lh_f"], targets[0]["rh_f"]
        b = imgs.shape[0]
        assert imgs.shape == (b, DINO[2], 31, 31) and imgs.dtype == torch.float32
        assert lh_f.shape == (b, 7) and rh_f.shape == (b, 5) and lh_f.dtype == torch.float32
        rows = [6, 2, 4, 0][seen : seen + b]
        np.testing.assert_array_equal(lh_f.numpy(), fmri["lh"][rows])
        seen += b
    assert seen == 4
    test = FeatureDataset(store["root"], split="test", data_dir=tmp_path / "subj01", target_format="legacy")
    batch = next(iter(DataLoader(test, batch_size=4)))
    assert isinstance(batch, torch.Tensor) and batch.shape == (4, DINO[2], 31, 31)  # a bare img per test item
    with pytest.raises(BadArgumentError, match="target_format='old'"):
        FeatureDataset(store["root"], target_format="old")


# ---- CLIP CLS channels --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "synt"])
def test_cat_clip_appends_the_clip_cls_over_the_grid(store, split):
    dino = np.load(store["npy"] / DINO[0] / "01" / f"{split}.npy")
    clip = np.load(store["npy"] / CLIP[0] / "01" / f"{split}.npy")
    ds = FeatureDataset(store["root"], split=split, cat_clip=True)
    h, w = DINO[1]
    assert ds.channels == DINO[2] + CLIP[2]
    for i in range(len(ds)):
        img = legacy_item(dino[i], DINO[1])
        cls = torch.tensor(clip[i, 0])
        expected = torch.cat([img, cls[:, None, None].expand(-1, h, w)], 0)
        assert torch.equal(ds[i], expected)


def test_cat_clip_needs_a_matching_clip_array(tmp_path):
    make_array(tmp_path / "a", DINO[0], 4, DINO[1], DINO[2])
    with pytest.raises(NotFoundInStoreError, match="needs clip_vit_512/01/train.*contains: dinov2_q_last"):
        FeatureDataset(tmp_path / "a", cat_clip=True)
    make_array(tmp_path / "a", CLIP[0], 5, CLIP[1], CLIP[2])
    with pytest.raises(BadArgumentError, match="has 5 images but dinov2_q_last/01/train has 4"):
        FeatureDataset(tmp_path / "a", cat_clip=True)
    make_array(tmp_path / "b", DINO[0], 4, DINO[1], DINO[2])
    make_array(tmp_path / "b", CLIP[0], 4, CLIP[1], CLIP[2], image_names=names(4)[:3] + ["other.png"])
    with pytest.raises(BadArgumentError, match="different images.*index 3"):
        FeatureDataset(tmp_path / "b", cat_clip=True)


# ---- normalisation ------------------------------------------------------------------------------------------------
def _save_stats(fs: FeatureStore, feature: str, part: str, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean, std = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    std[0] = 0.0  # a dead channel: centred, not divided by zero
    fs.save_stats(fs.get(feature, "01", "train"), {f"{part}_mean": mean, f"{part}_std": std}, {})
    return mean, np.where(std > 0, std, 1.0)


def test_normalize_channel_uses_the_train_statistics(tmp_path):
    fs = FeatureStore(tmp_path / "st", "a")
    train = make_array(fs, DINO[0], 4, DINO[1], DINO[2])
    synt = make_array(fs, DINO[0], 2, DINO[1], DINO[2], split="synt", seed=9, image_names=names(2, "t"))
    hint = r"run `featstore stats \S+ --feature dinov2_q_last --subj 01 --split train` first"
    with pytest.raises(NotFoundInStoreError, match=hint):
        FeatureDataset(tmp_path / "st", normalize="channel")
    with pytest.raises(BadArgumentError, match="normalize='zscore'"):
        FeatureDataset(tmp_path / "st", normalize="zscore")
    mean, std = _save_stats(fs, DINO[0], "patch", DINO[2], 0)
    for split, data in (("train", train), ("synt", synt)):
        ds = FeatureDataset(tmp_path / "st", split=split, normalize="channel")
        for i in range(len(ds)):
            raw = legacy_item(data[i], DINO[1]).double()
            expected = (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
            torch.testing.assert_close(ds[i], expected.float(), rtol=1e-5, atol=1e-5)


def test_normalize_with_cat_clip_scales_clip_channels_by_clip_cls_statistics(tmp_path):
    fs = FeatureStore(tmp_path / "st", "a")
    make_array(fs, DINO[0], 3, DINO[1], DINO[2])
    clip = make_array(fs, CLIP[0], 3, CLIP[1], CLIP[2])
    _save_stats(fs, DINO[0], "patch", DINO[2], 0)
    with pytest.raises(NotFoundInStoreError, match="--feature clip_vit_512"):
        FeatureDataset(tmp_path / "st", cat_clip=True, normalize="channel")
    mean, std = _save_stats(fs, CLIP[0], "cls", CLIP[2], 1)
    ds = FeatureDataset(tmp_path / "st", cat_clip=True, normalize="channel")
    plain = FeatureDataset(tmp_path / "st", normalize="channel")
    for i in range(3):
        img = ds[i]
        assert torch.equal(img[: DINO[2]], plain[i])
        expected = (clip[i, 0].astype(np.float64) - mean) / std
        torch.testing.assert_close(img[DINO[2] :, 4, 7], torch.tensor(expected, dtype=torch.float32))


# ---- float16 delivery -----------------------------------------------------------------------------------------------
def _assert_half_of_float32(f16: FeatureDataset, f32: FeatureDataset) -> None:
    """Every float16 item is the float32 item rounded once, bit for bit, in the same (H, W, C) buffer layout."""
    assert len(f16) == len(f32) and f16.dtype == "float16"
    for i in range(len(f32)):
        a, b = f16[i], f32[i]
        assert a.dtype == torch.float16 and b.dtype == torch.float32 and a.shape == b.shape
        assert a.stride() == b.stride()  # a (C, H, W) view of an (H, W, C) buffer, as the float32 item
        assert torch.equal(a, b.half())


@pytest.mark.parametrize("feature", [DINO[0], CLIP[0]])  # stored float16 / stored float32 (rounded once)
def test_float16_items_are_float32_items_rounded_once(store, feature):
    kw = {"feature": feature, "split": "train"}
    _assert_half_of_float32(FeatureDataset(store["root"], dtype="float16", **kw), FeatureDataset(store["root"], **kw))


def test_float16_items_are_the_stored_values_unconverted(store):
    ds = FeatureDataset(store["root"], dtype="float16")
    for i in range(len(ds)):
        expected = legacy_item(store["dino"][i], DINO[1])  # the stored float16 values, never through float32
        assert expected.dtype == torch.float16 and torch.equal(ds[i], expected)
    assert "dtype='float16'" in repr(ds)


def test_float16_with_normalize_and_cat_clip_rounds_the_float32_item_once(tmp_path):
    fs = FeatureStore(tmp_path / "st", "a")
    make_array(fs, DINO[0], 3, DINO[1], DINO[2])
    make_array(fs, CLIP[0], 3, CLIP[1], CLIP[2], dtype="float32")
    _save_stats(fs, DINO[0], "patch", DINO[2], 0)
    _save_stats(fs, CLIP[0], "cls", CLIP[2], 1)
    for kw in ({"normalize": "channel"}, {"cat_clip": True}, {"cat_clip": True, "normalize": "channel"}):
        f16 = FeatureDataset(tmp_path / "st", dtype="float16", **kw)
        _assert_half_of_float32(f16, FeatureDataset(tmp_path / "st", **kw))
        assert not torch.equal(f16[0].float(), FeatureDataset(tmp_path / "st", **kw)[0])  # really rounded


def test_float16_items_with_fmri_targets_in_workers(store, tmp_path):
    """Features float16, targets float32 as before, through DataLoader workers and channels_last_collate."""
    from featstore.encoding import channels_last_collate

    fmri = write_fmri(tmp_path / "subj01", store["n"])
    f16 = FeatureDataset(store["root"], data_dir=tmp_path / "subj01", dtype="float16")
    f32 = FeatureDataset(store["root"], data_dir=tmp_path / "subj01")
    loader = DataLoader(f16, batch_size=4, num_workers=2, collate_fn=channels_last_collate)
    seen = 0
    for x, y in loader:
        b = len(x)
        assert x.dtype == torch.float16 and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, torch.stack([f32[seen + k][0] for k in range(b)]).half())
        for h in ("lh", "rh"):
            assert y[f"{h}_f"].dtype == torch.float32
            assert torch.equal(y[f"{h}_f"], torch.from_numpy(fmri[h][seen : seen + b]))
        seen += b
    assert seen == store["n"]


@pytest.mark.parametrize("codec, pack", [("none", 1), ("lz4", 1), ("none", 2)])
def test_float16_items_on_every_read_path(tmp_path, codec, pack):
    """A plain chunk is read straight into the item's buffer (its own, writeable: changing it changes no other read),
    a compressed or packed one decoded then copied; all give the stored values. A truncated plain chunk is corrupt."""
    fs = FeatureStore(tmp_path / "st", "a")
    t, n = 1 + DINO[1][0] * DINO[1][1], 4
    meta = {"token_layout": {"cls_index": 0, "grid": list(DINO[1]), "n_tokens": t}, "image_names": names(n)}
    fa, _ = fs.prepare(DINO[0], "01", "train", ArraySpec((n, t, DINO[2]), 1, "float16", codec, pack), meta=meta,
                       fingerprint={})
    data = (np.random.default_rng(0).standard_normal((n, t, DINO[2])) * 3).astype(np.float16)
    fa.write_chunks(0, data, durable=False)
    fa = fs.get(DINO[0], "01", "train")
    plain = codec == "none" and pack == 1 and _zarr_compat.fast_enabled()
    assert (fa._raw_reader is not None) == plain
    ds = FeatureDataset(tmp_path / "st", dtype="float16")
    for i in range(n):
        item = ds[i]
        assert torch.equal(item, legacy_item(data[i], DINO[1]))
        assert torch.equal(item, FeatureDataset(tmp_path / "st")[i].half())
        item.zero_()  # an item is the caller's own
        assert torch.equal(ds[i], legacy_item(data[i], DINO[1]))
    if plain:
        chunk_file = tmp_path / "st" / DINO[0] / "01" / "train" / "c" / "2" / "0" / "0"
        chunk_file.write_bytes(chunk_file.read_bytes()[:-10])
        with pytest.raises(CorruptChunkError, match=r"chunk 2 is corrupt \(\d+ bytes, expected \d+\)"):
            ds[2]


def test_bad_dtype_names_the_argument(store):
    with pytest.raises(BadArgumentError, match=r"^dtype 'bfloat16': choose one of 'float32', 'float16'$") as e:
        FeatureDataset(store["root"], dtype="bfloat16")
    assert e.value.param == "dtype"


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_index_out_of_range_and_bad_indices(store):
    ds = FeatureDataset(store["root"], indices=[1, 2])
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(IndexError):
        ds[-3]
    with pytest.raises(BadArgumentError, match="7 is out of range for dinov2_q_last/01/train with 7 samples"):
        FeatureDataset(store["root"], indices=[0, 7])
    with pytest.raises(BadArgumentError, match="integers"):
        FeatureDataset(store["root"], indices=[0.5])


def test_missing_array_names_what_the_store_contains(store):
    with pytest.raises(NotFoundInStoreError, match="no array dinov2_q_last/02/train; it contains: clip_vit_512/01"):
        FeatureDataset(store["root"], subj="02")


def test_incomplete_array_serves_finished_chunks_and_refuses_the_rest(tmp_path):
    fs = FeatureStore(tmp_path / "st", "a")
    data = make_array(fs, DINO[0], 6, DINO[1], DINO[2], chunk=2, write=False)
    fa = fs.get(DINO[0], "01", "train")
    fa.write_chunks(0, data[:2], durable=False)
    fa.write_chunks(2, data[4:], durable=False)  # chunk 1 (samples 2, 3) never written
    ds = FeatureDataset(tmp_path / "st")
    assert torch.equal(ds[5], legacy_item(data[5], DINO[1]))
    with pytest.raises(IncompleteArrayError, match="sample 3 is in chunk 1, which is not written yet .2/3 chunks done"):
        ds[3]
    finished = FeatureDataset(tmp_path / "st", indices=[0, 1, 4, 5])
    assert [torch.equal(finished[i], legacy_item(data[j], DINO[1])) for i, j in enumerate([0, 1, 4, 5])] == [True] * 4


# ---- processes ----------------------------------------------------------------------------------------------------
def test_pickle_carries_no_store_handles(store, tmp_path):
    write_fmri(tmp_path / "subj01", store["n"])
    ds = FeatureDataset(store["root"], data_dir=tmp_path / "subj01", cat_clip=True)
    ds[0]  # opens arrays and memmaps in this process
    blob = pickle.dumps(ds)
    assert b"zarr" not in blob and b"memmap" not in blob
    copy = pickle.loads(blob)
    assert copy._fa is None and copy._mm is None
    assert torch.equal(copy[3][0], ds[3][0])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers(store, tmp_path, method):
    write_fmri(tmp_path / "subj01", store["n"])
    ds = FeatureDataset(store["root"], data_dir=tmp_path / "subj01", cat_clip=True, indices=[6, 0, 3, 2, 5, 1, 4])
    direct = [ds[i] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True,
                        multiprocessing_context=method)
    for _ in range(2):  # the second epoch reuses the persistent workers and their open handles
        seen = 0
        for img, y in loader:
            b = img.shape[0]
            assert torch.equal(img, torch.stack([direct[seen + k][0] for k in range(b)]))
            for key in ("lh_f", "rh_f"):
                assert torch.equal(y[key], torch.stack([direct[seen + k][1][key] for k in range(b)]))
            seen += b
        assert seen == len(ds)


# ---- construction cost --------------------------------------------------------------------------------------------
class CountingStore(zarr.storage.WrapperStore):
    """Counts every store call the dataset makes while it is built."""

    def __init__(self, store):
        super().__init__(store)
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def get(self, key, prototype, byte_range=None):
        self._count("get")
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        self._count("get_partial_values")
        return await super().get_partial_values(prototype, key_ranges)

    async def exists(self, key):
        self._count("exists")
        return await super().exists(key)

    def list(self):
        self._count("list")
        return super().list()

    def list_prefix(self, prefix):
        self._count("list_prefix")
        return super().list_prefix(prefix)

    def list_dir(self, prefix):
        self._count("list_dir")
        return super().list_dir(prefix)


def test_construction_reads_metadata_only_whatever_n(tmp_path):
    counts, sizes = {}, {}
    for n in (10, 10_000):
        root = tmp_path / f"n{n}"
        data = make_array(root, "tiny", n, (2, 2), 2, chunk=1, dtype="float32", write=False)
        fa = FeatureStore(root, "a").get("tiny", "01", "train")
        fa.write_chunks(n - 1, data[n - 1 :], durable=False)
        # the other chunks: only their completion markers (empty files, layout in store.py's docstring); writing
        # 10,000 real chunks takes longer than this whole test file may, and construction must not read them anyway
        for i in range(n - 1):
            (root / fa.record.prefix / str(i)).touch()
        assert fa.is_complete()
        counting = CountingStore(zarr.storage.LocalStore(root, read_only=True))
        ds = FeatureDataset(FeatureStore(counting), feature="tiny")
        counts[n], sizes[n] = dict(counting.calls), len(pickle.dumps(ds))
        assert len(ds) == n and counting.calls == counts[n]  # nothing read after construction so far
        expected = legacy_item(data[n - 1], (2, 2))
        assert torch.equal(ds[n - 1], expected)  # zarr's own read path (wrapped store) ...
        assert torch.equal(FeatureDataset(root, feature="tiny")[n - 1], expected)  # ... and the local fast path
    assert counts[10] == counts[10_000]
    assert counts[10].get("list_dir", 0) <= 1  # the completion record: one listing (a local folder: by os.listdir)
    assert abs(sizes[10] - sizes[10_000]) < 64  # the dataset holds nothing that grows with N


# ---- splits -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 10, 101, 8859, 9841])
@pytest.mark.parametrize("seed", [0, 5, 42])
def test_train_val_split_reproduces_the_legacy_split(n, seed):
    state = np.random.get_state()
    train, val = train_val_split(n, seed=seed)
    assert np.array_equal(np.random.get_state()[1], state[1])  # numpy's global generator is left alone
    idxs = np.arange(n)
    np.random.seed(seed)
    np.random.shuffle(idxs)
    num_train = int(np.round(n / 100 * 90))
    np.random.set_state(state)
    assert np.array_equal(train, idxs[:num_train]) and np.array_equal(val, idxs[num_train:])
    assert train.dtype.kind == "i"


def test_train_val_split_fractions_and_default_seed():
    a, b = train_val_split(1000)
    assert np.array_equal(a, train_val_split(1000, seed=5)[0])  # the Algonauts tutorial's seed
    assert len(b) == 100
    for frac in (0.0, 0.25, 0.5):
        tr, va = train_val_split(1000, val_fraction=frac, seed=1)
        assert len(va) == round(1000 * frac) and sorted(np.concatenate([tr, va])) == list(range(1000))
    with pytest.raises(BadArgumentError):
        train_val_split(10, val_fraction=1.0)


def test_worker_refuses_an_array_rewritten_after_construction(tmp_path):
    make_array(tmp_path / "st", DINO[0], 3, DINO[1], DINO[2])
    copy = pickle.loads(pickle.dumps(FeatureDataset(tmp_path / "st")))  # as a worker receives it
    fs = FeatureStore(tmp_path / "st", "a")
    fs.prepare(DINO[0], "01", "train", ArraySpec((3, 962, DINO[2]), 3, "float16"), overwrite=True,
               meta={"token_layout": {"cls_index": 0, "grid": list(DINO[1])}, "image_names": names(3)},
               fingerprint={"test": DINO[0], "changed": True})  # overwrite starts over only a changed configuration
    with pytest.raises(StoreError, match="rewritten after this FeatureDataset was built"):
        copy[0]
