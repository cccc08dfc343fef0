"""Tests of the synthetic Algonauts subject (featstore.sample)."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from PIL import Image

from featstore import sample_images
from featstore.errors import BadArgumentError, FeatstoreError
from featstore.sample import (
    ROI_CLASSES,
    ROI_MAPPINGS,
    ROI_NAMES,
    image_descriptors,
    make_sample_subject,
    planted_fmri,
    planted_weights,
    sample_rois,
)

TRAIN_RE = re.compile(r"train-(\d{4})_nsd-(\d{5})\.png")
TEST_RE = re.compile(r"test-(\d{4})_nsd-(\d{5})\.png")


def _images(folder):
    return sorted(p.name for p in folder.iterdir())


def _pixels(folder):
    return np.stack([np.asarray(Image.open(folder / name)) for name in _images(folder)])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_sample_subject(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return make_sample_subject(tmp_path_factory.mktemp("big"), subj="02", n_train=64, n_test=0, seed=3)


def test_layout_and_counts(small, tmp_path):
    assert small.name == "subj01"
    train = small / "training_split" / "training_images"
    test = small / "test_split" / "test_images"
    assert sorted(p.name for p in small.iterdir()) == ["roi_masks", "test_split", "training_split"]
    assert len(_images(train)) == 16 and len(_images(test)) == 4
    assert sorted(p.name for p in (small / "training_split" / "training_fmri").iterdir()) == [
        "lh_training_fmri.npy",
        "rh_training_fmri.npy",
    ]
    assert sorted(p.name for p in (small / "roi_masks").iterdir()) == sorted(
        [f"{h}.{c}_challenge_space.npy" for h in ("lh", "rh") for c in ROI_CLASSES] + [f"mapping_{c}.npy" for c in ROI_CLASSES]
    )


def test_images_are_425_rgb(small):
    for folder in (small / "training_split" / "training_images", small / "test_split" / "test_images"):
        for name in _images(folder):
            with Image.open(folder / name) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (425, 425)


def test_names_sorted_match_indices(small):
    for folder, pattern in (
        (small / "training_split" / "training_images", TRAIN_RE),
        (small / "test_split" / "test_images", TEST_RE),
    ):
        matches = [pattern.fullmatch(name) for name in _images(folder)]
        assert all(matches)
        assert [int(m.group(1)) for m in matches] == list(range(1, len(matches) + 1))
        ids = [int(m.group(2)) for m in matches]
        assert ids == sorted(ids) and len(set(ids)) == len(ids) and max(ids) < 73000
    train_ids = {TRAIN_RE.fullmatch(n).group(2) for n in _images(small / "training_split" / "training_images")}
    test_ids = {TEST_RE.fullmatch(n).group(2) for n in _images(small / "test_split" / "test_images")}
    assert not train_ids & test_ids


def test_fmri_shapes_and_dtype(small):
    for hemi, nv in (("lh", 200), ("rh", 180)):
        fmri = np.load(small / "training_split" / "training_fmri" / f"{hemi}_training_fmri.npy")
        assert fmri.dtype == np.float32 and fmri.shape == (16, nv)
        assert np.isfinite(fmri).all() and fmri.std() > 0.5


ALGONAUTS_ROIS = {  # the Algonauts 2023 mapping_*.npy label sets, as the challenge ships them
    "prf-visualrois": "V1v V1d V2v V2d V3v V3d hV4",
    "floc-bodies": "EBA FBA-1 FBA-2 mTL-bodies",
    "floc-faces": "OFA FFA-1 FFA-2 mTL-faces aTL-faces",
    "floc-places": "OPA PPA RSC",
    "floc-words": "OWFA VWFA-1 VWFA-2 mfs-words mTL-words",
    "streams": "early midventral midlateral midparietal ventral lateral parietal",
}


def test_roi_masks(small):
    assert ROI_CLASSES == tuple(ALGONAUTS_ROIS) and ROI_NAMES == ROI_MAPPINGS["prf-visualrois"]
    floc = np.zeros(200, int)
    for cls, names in ALGONAUTS_ROIS.items():
        mapping = np.load(small / "roi_masks" / f"mapping_{cls}.npy", allow_pickle=True).item()
        assert mapping == {0: "Unknown", **dict(enumerate(names.split(), 1))} == ROI_MAPPINGS[cls]
        for hemi, nv in (("lh", 200), ("rh", 180)):
            labels = np.load(small / "roi_masks" / f"{hemi}.{cls}_challenge_space.npy")
            assert labels.shape == (nv,) and labels.dtype == np.int32
            assert set(np.unique(labels).tolist()) == set(mapping)  # every ROI present, and vertices in none
            np.testing.assert_array_equal(labels, sample_rois(nv, 0, "01", hemi)[cls])
            if hemi == "lh" and cls.startswith("floc"):
                floc += labels > 0
    assert floc.max() == 2  # some floc ROIs overlap, as in the real masks
    lh = sample_rois(200, 0, "01", "lh")
    early = (lh["prf-visualrois"] >= 1) & (lh["prf-visualrois"] <= 6)
    assert (lh["streams"][early] == 1).all() and not (floc[early]).any()  # V1-V3 lie in the early stream


def _r2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Share of each column of y explained by a least-squares fit on x (with intercept)."""
    x = np.c_[x, np.ones(len(x))]
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    return 1 - (y - x @ beta).var(0) / y.var(0)


def test_planted_signal_differs_by_roi(big):
    """Early visual ROIs follow local content, floc ROIs global content, with a tuning shared by each ROI."""
    desc = image_descriptors(_pixels(big / "training_split" / "training_images"))
    local, global_ = list(range(3, 19)), [0, 1, 2, 19]  # 4x4 luminance map; mean RGB and edge energy
    for hemi, nv in (("lh", 200), ("rh", 180)):
        rois = sample_rois(nv, 3, "02", hemi)
        _, signal = planted_fmri(desc, nv, seed=3, subj="02", hemi=hemi)
        prf = rois["prf-visualrois"]
        early = (prf >= 1) & (prf <= 6)
        floc = np.any([rois[c] > 0 for c in ROI_CLASSES[1:5]], axis=0)
        r2_global, r2_local = _r2(desc[:, global_], signal), _r2(desc[:, local], signal)
        assert r2_local[early].min() > 0.999 and r2_global[early].max() < 0.25
        assert r2_global[floc].min() > 0.999 and r2_local[floc].mean() < 0.8
        w = planted_weights(nv, 3, "02", hemi)
        assert not w[np.ix_(global_, np.flatnonzero(early))].any() and not w[np.ix_(local, np.flatnonzero(floc))].any()
        np.testing.assert_allclose(w[local][:, early].sum(0), 0, atol=1e-12)  # centre-surround: not overall brightness
        # retinotopy: the centre of each V1 field lies in the area's quadrant (lh sees the right half of the image)
        for label, rows in ((1, (0, 1)), (2, (2, 3))):
            peak = np.argmax(w[local][:, prf == label], axis=0)
            assert set(peak // 4) <= set(rows) and set(peak % 4) <= ({2, 3} if hemi == "lh" else {0, 1})
        # vertices of one floc ROI share a tuning: their signals correlate within the ROI, not across ROIs
        n_floc = np.sum([rois[c] > 0 for c in ROI_CLASSES[1:5]], axis=0)
        roi_id = np.full(nv, -1)
        for k, cls in enumerate(ROI_CLASSES[1:5]):
            only = (rois[cls] > 0) & (n_floc == 1)
            roi_id[only] = 10 * k + rois[cls][only]
        ids = roi_id[roi_id >= 0]
        corr = np.corrcoef(signal[:, roi_id >= 0].T)
        same, other = ids[:, None] == ids[None], ~np.eye(len(ids), dtype=bool)
        assert corr[same & other].mean() > 0.6 and abs(corr[~same].mean()) < 0.15


def test_workers_do_not_change_output(tmp_path, monkeypatch):
    monkeypatch.setattr(sample_images, "_POOL_MIN_IMAGES", 2)
    one = make_sample_subject(tmp_path / "one", n_train=6, n_test=2, workers=1)
    two = make_sample_subject(tmp_path / "two", n_train=6, n_test=2, workers=2)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) == 6 + 2 + 2 + 2 * 6 + 6  # images, fMRI, ROI masks per hemisphere, ROI mappings
    for rel in files:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel


def test_no_test_split_when_n_test_is_zero(big):
    assert not (big / "test_split").exists()
    assert len(_images(big / "training_split" / "training_images")) == 64


def test_images_differ_and_are_structured(big):
    pixels = _pixels(big / "training_split" / "training_images")
    coarse = pixels[:, ::5, ::5].astype(np.float64)  # 85x85 grid is plenty for these statistics
    # across images: each pixel varies a lot from image to image
    assert coarse.std(axis=0).mean() > 40
    # no two images are near copies (RMS difference in grey levels)
    flat = coarse.reshape(len(coarse), -1)
    sq = (flat**2).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * flat @ flat.T, 0) / flat.shape[1])
    assert dist[~np.eye(len(flat), dtype=bool)].min() > 10
    # within an image: structure, not noise (neighbouring pixels strongly correlated)
    for img in pixels[:8].astype(np.float64).mean(axis=-1):
        r = np.corrcoef(img[:, :-1].ravel(), img[:, 1:].ravel())[0, 1]
        assert r > 0.8
    # the descriptors behind the planted signal vary between images
    assert (image_descriptors(pixels).std(axis=0) > 1e-3).all()


def test_generative_rule_reproduces_fmri_from_pngs(big):
    desc = image_descriptors(_pixels(big / "training_split" / "training_images"))
    for hemi, nv in (("lh", 200), ("rh", 180)):
        saved = np.load(big / "training_split" / "training_fmri" / f"{hemi}_training_fmri.npy")
        fmri, signal = planted_fmri(desc, nv, seed=3, subj="02", hemi=hemi)
        np.testing.assert_array_equal(saved, fmri)
        np.testing.assert_allclose(signal.std(axis=0), 1.0, rtol=1e-9)
        noise = saved - signal
        assert 0.8 < noise.std() < 1.2  # SNR about 1


def _ridge_heldout_r(x_train, y_train, x_test, y_test, lam=1.0):
    mu, sd = x_train.mean(0), x_train.std(0)
    xt, xv = (x_train - mu) / sd, (x_test - mu) / sd
    ym = y_train.mean(0)
    beta = np.linalg.solve(xt.T @ xt + lam * np.eye(xt.shape[1]), xt.T @ (y_train - ym))
    pred = xv @ beta + ym
    pc, yc = pred - pred.mean(0), y_test - y_test.mean(0)
    return (pc * yc).sum(0) / np.sqrt((pc**2).sum(0) * (yc**2).sum(0))


def test_planted_signal_is_recoverable(big):
    desc = image_descriptors(_pixels(big / "training_split" / "training_images"))
    rng = np.random.default_rng(0)
    for hemi in ("lh", "rh"):
        y = np.load(big / "training_split" / "training_fmri" / f"{hemi}_training_fmri.npy").astype(np.float64)
        r = _ridge_heldout_r(desc[:48], y[:48], desc[48:], y[48:])
        shuffled = np.mean(
            [_ridge_heldout_r(desc[:48], y[rng.permutation(48)], desc[48:], y[48:]).mean() for _ in range(5)]
        )
        # ceiling 1/sqrt(2) ~ 0.71 (SNR 1); chance ~0, give or take ~0.1 for a mean over vertices that share
        # the same 20 predictors and 16 held-out images
        assert r.mean() > 0.4, r.mean()
        assert abs(shuffled) < 0.2, shuffled
        assert (r > 0).mean() > 0.9


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subj": "1"},
        {"subj": "001"},
        {"subj": "ab"},
        {"subj": 1},
        {"n_train": 0},
        {"n_train": -3},
        {"n_train": 2.0},
        {"n_train": True},
        {"n_train": 10000},
        {"n_test": -1},
        {"seed": -1},
        {"seed": "0"},
        {"n_vertices": (0, 5)},
        {"n_vertices": (5,)},
        {"n_vertices": 5},
        {"workers": 0},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(BadArgumentError) as info:
        make_sample_subject(tmp_path, **kwargs)
    assert isinstance(info.value, (FeatstoreError, ValueError))
    assert str(info.value) and "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing written


def test_root_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BadArgumentError):
        make_sample_subject(f)


def test_existing_subject_needs_overwrite(tmp_path):
    first = make_sample_subject(tmp_path, n_train=5, n_test=2, n_vertices=(10, 10))
    with pytest.raises(BadArgumentError, match="overwrite"):
        make_sample_subject(tmp_path, n_train=3, n_test=0, n_vertices=(10, 10))
    again = make_sample_subject(tmp_path, n_train=3, n_test=0, n_vertices=(10, 10), overwrite=True)
    assert again == first
    assert len(_images(again / "training_split" / "training_images")) == 3
    assert not (again / "test_split").exists()
    assert np.load(again / "training_split" / "training_fmri" / "lh_training_fmri.npy").shape == (3, 10)


def test_logs_and_does_not_print(tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="featstore.sample"):
        make_sample_subject(tmp_path, n_train=2, n_test=1, n_vertices=(4, 4))
    assert any("subj01" in rec.getMessage() for rec in caplog.records)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_single_image_and_tiny_vertex_counts(tmp_path):
    subject = make_sample_subject(tmp_path, n_train=1, n_test=0, n_vertices=(1, 3))
    fmri = np.load(subject / "training_split" / "training_fmri" / "lh_training_fmri.npy")
    assert fmri.shape == (1, 1) and np.isfinite(fmri).all()
    for cls in ROI_CLASSES:
        labels = np.load(subject / "roi_masks" / f"rh.{cls}_challenge_space.npy")
        assert labels.shape == (3,) and labels.min() >= 0 and labels.max() <= max(ROI_MAPPINGS[cls])


def test_image_descriptors_match_definition():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, size=(37, 41, 3), dtype=np.uint8)
    x = img / 255.0
    lum = x @ np.array([0.299, 0.587, 0.114])
    blocks = [b.mean() for band in np.array_split(lum, 4, axis=0) for b in np.array_split(band, 4, axis=1)]
    edge = np.abs(np.diff(lum, axis=1)).mean() + np.abs(np.diff(lum, axis=0)).mean()
    expected = np.concatenate([x.mean(axis=(0, 1)), blocks, [edge]])
    np.testing.assert_allclose(image_descriptors(img)[0], expected, atol=1e-6)
    assert image_descriptors(np.stack([img, img])).shape == (2, 20)
    with pytest.raises(BadArgumentError):
        image_descriptors(img.astype(np.float32))


def test_planted_fmri_arguments():
    desc = np.random.default_rng(0).normal(size=(6, 20))
    fmri, signal = planted_fmri(desc, 7, seed=0, subj="01", hemi="rh")
    assert fmri.shape == signal.shape == (6, 7) and fmri.dtype == np.float32
    with pytest.raises(BadArgumentError):
        planted_fmri(desc, 7, seed=0, subj="01", hemi="left")
    with pytest.raises(BadArgumentError):
        planted_fmri(desc[0], 7, seed=0, subj="01", hemi="lh")
