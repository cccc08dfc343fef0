"""Tests of the synthetic Algonauts subject (featstore.sample)."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from PIL import Image

from featstore import sample
from featstore.errors import BadArgumentError, FeatstoreError
from featstore.sample import ROI_NAMES, image_descriptors, make_sample_subject, planted_fmri

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
    assert sorted(p.name for p in (small / "roi_masks").iterdir()) == [
        "lh.prf-visualrois_challenge_space.npy",
        "mapping_prf-visualrois.npy",
        "rh.prf-visualrois_challenge_space.npy",
    ]


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


def test_roi_masks(small):
    mapping = np.load(small / "roi_masks" / "mapping_prf-visualrois.npy", allow_pickle=True).item()
    assert mapping == ROI_NAMES and mapping[0] == "Unknown" and mapping[7] == "hV4"
    for hemi, nv in (("lh", 200), ("rh", 180)):
        labels = np.load(small / "roi_masks" / f"{hemi}.prf-visualrois_challenge_space.npy")
        assert labels.shape == (nv,) and np.issubdtype(labels.dtype, np.integer)
        assert set(np.unique(labels).tolist()) == set(range(8))


def test_deterministic_for_a_seed(small, tmp_path):
    again = make_sample_subject(tmp_path / "a")
    other = make_sample_subject(tmp_path / "b", seed=1)
    rel_files = sorted(p.relative_to(small) for p in small.rglob("*") if p.is_file())
    assert rel_files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in rel_files:
        assert (small / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert _images(small / "training_split" / "training_images") != _images(other / "training_split" / "training_images")
    for hemi in ("lh", "rh"):
        a = np.load(small / "training_split" / "training_fmri" / f"{hemi}_training_fmri.npy")
        b = np.load(other / "training_split" / "training_fmri" / f"{hemi}_training_fmri.npy")
        assert not np.allclose(a, b)
    pa = _pixels(small / "training_split" / "training_images")
    pb = _pixels(other / "training_split" / "training_images")
    assert np.abs(pa.astype(int) - pb.astype(int)).mean() > 20


def test_image_depends_on_seed_and_nsd_id_only(small, tmp_path):
    # as in NSD, subjects that share an nsd id share the image; the fmri depends on the subject too
    folder = small / "training_split" / "training_images"
    for name in _images(folder)[:4]:
        nsd = int(TRAIN_RE.fullmatch(name).group(2))
        expected = sample._render(np.random.default_rng([0, nsd]))
        np.testing.assert_array_equal(np.asarray(Image.open(folder / name)), expected)
    other = make_sample_subject(tmp_path, subj="03", n_train=4, n_test=0)
    assert _images(other / "training_split" / "training_images") != _images(folder)[:4]


def test_workers_do_not_change_output(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "_POOL_MIN_IMAGES", 2)
    one = make_sample_subject(tmp_path / "one", n_train=6, n_test=2, workers=1)
    two = make_sample_subject(tmp_path / "two", n_train=6, n_test=2, workers=2)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) == 6 + 2 + 5
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
    labels = np.load(subject / "roi_masks" / "rh.prf-visualrois_challenge_space.npy")
    assert labels.shape == (3,) and labels.min() >= 0 and labels.max() <= 7


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
