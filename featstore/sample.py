"""Synthetic Algonauts 2023 subjects with a planted, checkable image -> fMRI signal.

The real NSD/Algonauts data is tens of GB behind a data-use agreement, so the demo notebook, the test suite and
the benchmarks use :func:`make_sample_subject` instead: a subject folder with the same file layout and names,
structured images that a vision backbone tells apart, and fMRI whose dependence on the images is known exactly,
so an encoding model fitted on extracted features can be checked to recover it.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from .devices import cpu_count
from .errors import BadArgumentError
from .layout import FMRI_DIR, HEMIS, ROI_CLASSES, ROI_DIR, SPLIT_DIRS, fmri_path, roi_mapping_path, roi_mask_path
from .sample_images import IMAGE_SIZE, N_DESCRIPTORS, image_descriptors, write_images

__all__ = [
    "IMAGE_SIZE",
    "N_DESCRIPTORS",
    "ROI_CLASSES",
    "ROI_MAPPINGS",
    "ROI_NAMES",
    "SNR",
    "image_descriptors",
    "make_sample_subject",
    "planted_fmri",
    "planted_weights",
    "sample_rois",
]

logger = logging.getLogger(__name__)

N_NSD_IMAGES = 73000
ROI_MAPPINGS = {  # the Algonauts 2023 roi_masks/mapping_{class}.npy label sets, in the challenge's class order
    "prf-visualrois": {0: "Unknown", 1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"},
    "floc-bodies": {0: "Unknown", 1: "EBA", 2: "FBA-1", 3: "FBA-2", 4: "mTL-bodies"},
    "floc-faces": {0: "Unknown", 1: "OFA", 2: "FFA-1", 3: "FFA-2", 4: "mTL-faces", 5: "aTL-faces"},
    "floc-places": {0: "Unknown", 1: "OPA", 2: "PPA", 3: "RSC"},
    "floc-words": {0: "Unknown", 1: "OWFA", 2: "VWFA-1", 3: "VWFA-2", 4: "mfs-words", 5: "mTL-words"},
    "streams": {0: "Unknown", 1: "early", 2: "midventral", 3: "midlateral", 4: "midparietal", 5: "ventral",
                6: "lateral", 7: "parietal"},
}
assert tuple(ROI_MAPPINGS) == ROI_CLASSES  # the layout's classes, in its order
ROI_NAMES = ROI_MAPPINGS["prf-visualrois"]
SNR = 1.0  # per-vertex variance of the planted signal over that of the noise


# ----------------------------------------------------------------------------------------------- ROIs and the rule

_PRF, _BODIES, _FACES, _PLACES, _WORDS, _STREAMS = ROI_CLASSES
# The synthetic cortex of a hemisphere: contiguous runs of vertices, in this order, each with its ROI memberships
# ({class: label}; absent = 0). ROIs of different classes overlap, as in the real masks: floc ROIs pairwise, and hV4
# with EBA and OFA (a vertex in three ROIs of the rois_all readout); the last run is in no ROI at all.
_SEGMENTS: tuple[dict[str, int], ...] = (
    *({_PRF: k, _STREAMS: 1} for k in range(1, 7)),  # V1v .. V3d, the early stream
    {_PRF: 7, _STREAMS: 2}, {_PRF: 7, _BODIES: 1, _FACES: 1, _STREAMS: 2},  # hV4, hV4+EBA+OFA
    {_STREAMS: 2}, {_STREAMS: 3}, {_STREAMS: 4},  # mid streams
    {_BODIES: 1, _STREAMS: 6}, {_BODIES: 1, _FACES: 1, _STREAMS: 6}, {_FACES: 1, _STREAMS: 6},  # EBA, EBA+OFA, OFA
    {_FACES: 2, _STREAMS: 5}, {_FACES: 2, _BODIES: 2, _STREAMS: 5}, {_BODIES: 2, _STREAMS: 5},  # FFA-1, +FBA-1
    {_FACES: 3, _STREAMS: 5}, {_FACES: 3, _WORDS: 2, _STREAMS: 5}, {_WORDS: 2, _STREAMS: 5},  # FFA-2, +VWFA-1
    {_WORDS: 3, _STREAMS: 5}, {_BODIES: 3, _STREAMS: 5}, {_FACES: 4, _STREAMS: 5}, {_FACES: 5, _STREAMS: 5},
    {_BODIES: 4, _STREAMS: 6}, {_WORDS: 1, _STREAMS: 6}, {_WORDS: 4, _STREAMS: 5}, {_WORDS: 5, _STREAMS: 6},
    {_PLACES: 1, _STREAMS: 7}, {_PLACES: 2, _STREAMS: 5}, {_PLACES: 3, _STREAMS: 7},
    {_STREAMS: 5}, {_STREAMS: 6}, {_STREAMS: 7},
    {},
)
_REST_SHARE = 0.25  # expected share of vertices in no ROI
_LOCAL = np.arange(3, 19)  # descriptor columns of the 4x4 luminance map
_GLOBAL = np.array([0, 1, 2, 19])  # mean R, G, B and edge energy
_RF_SIGMA = {1: 0.35, 2: 0.35, 3: 0.6, 4: 0.6, 5: 0.9, 6: 0.9, 7: 1.5}  # prf label -> receptive field, in blocks
_BROAD_SIGMA = 1.5  # hV4 and the mid streams


def sample_rois(n_vertices: int, seed: int, subj: str, hemi: str) -> dict[str, np.ndarray]:
    """The ROI labels of a synthetic hemisphere: {class: int32 (n_vertices,)} for the six Algonauts ROI classes.

    Contiguous runs of vertices (see ``_SEGMENTS``) with sizes from ``np.random.default_rng([seed, int(subj),
    2 + hemi_id])``: every run gets at least one vertex when there are enough, about a quarter are in no ROI.
    """
    hemi_id = _hemi_id(hemi)
    rng = np.random.default_rng([seed, int(subj), 2 + hemi_id])
    k = len(_SEGMENTS)
    p = np.concatenate([(1 - _REST_SHARE) * rng.dirichlet(np.full(k - 1, 4.0)), [_REST_SHARE]])
    sizes = np.ones(k, dtype=np.int64) + rng.multinomial(n_vertices - k, p) if n_vertices >= k else rng.multinomial(
        n_vertices, p
    )
    run = np.repeat(np.arange(k), sizes)
    return {c: np.array([seg.get(c, 0) for seg in _SEGMENTS], dtype=np.int32)[run] for c in ROI_CLASSES}


def _tuning(seed: int, cls: str, label: int) -> np.ndarray:
    """Unit weights over the global descriptors shared by all vertices of one ROI, in both hemispheres and
    every subject of a seed: category selectivity belongs to the area, not to the vertex."""
    t = np.random.default_rng([seed, 100 + ROI_CLASSES.index(cls), label]).standard_normal(len(_GLOBAL))
    return t / np.linalg.norm(t)


def planted_weights(n_vertices: int, seed: int, subj: str, hemi: str) -> np.ndarray:
    """W (N_DESCRIPTORS, n_vertices) of the planted rule: how each vertex depends on the descriptors, by ROI.

    - prf-visualrois V1-V3: local content only, a Gaussian receptive field over the 4x4 luminance map (sigma
      0.35 / 0.6 / 0.9 blocks for V1 / V2 / V3) minus the map's mean (centre-surround, so the image's overall
      brightness does not drive it), centred in the area's quadrant: ventral areas (V1v, ...) see the upper half,
      dorsal ones the lower half, the left hemisphere the right half of the image and vice versa.
    - hV4 and the mid streams: a broad receptive field (sigma 1.5) in the hemifield plus 0.7 x the ROI's tuning.
    - floc ROIs (also where they overlap hV4): global content only (mean R, G, B, edge energy): the sum of the
      tunings of the vertex's floc ROIs (each a unit vector shared by the ROI, see ``_tuning``) plus 0.3 x
      per-vertex N(0, 1) jitter.
    - ventral / lateral / parietal stream vertices outside the floc ROIs: the stream's tuning plus the same jitter.
    - vertices in no ROI: N(0, 1) weights on all 20 descriptors.
    Per-vertex draws come from ``np.random.default_rng([seed, int(subj), hemi_id, 0])``.
    """
    rois = sample_rois(n_vertices, seed, subj, hemi)
    rng = np.random.default_rng([seed, int(subj), _hemi_id(hemi), 0])
    centre = rng.uniform(0.0, 1.0, size=(2, n_vertices))
    jitter = 0.3 * rng.standard_normal((len(_GLOBAL), n_vertices))
    rest = rng.standard_normal((N_DESCRIPTORS, n_vertices))
    w = np.zeros((N_DESCRIPTORS, n_vertices))
    col0 = 2.0 if hemi == "lh" else 0.0  # left hemisphere: right visual field (block columns 2-3)
    blocks = np.arange(4) + 0.5
    prf, streams = rois[_PRF], rois[_STREAMS]
    floc_classes = (_BODIES, _FACES, _PLACES, _WORDS)
    for v in range(n_vertices):
        label, stream = int(prf[v]), int(streams[v])
        floc = [(c, int(rois[c][v])) for c in floc_classes if rois[c][v]]
        if (label or stream in (2, 3, 4)) and not floc:  # retinotopic: a receptive field over the luminance map
            sigma = _RF_SIGMA.get(label, _BROAD_SIGMA)
            row0, rows = ((0.0, 2.0) if label % 2 else (2.0, 2.0)) if 1 <= label <= 6 else (0.0, 4.0)
            r, c = row0 + rows * centre[0, v], col0 + 2.0 * centre[1, v]
            rf = np.exp(-((blocks[:, None] - r) ** 2 + (blocks[None, :] - c) ** 2) / (2 * sigma**2)).ravel()
            rf /= rf.sum()
            if 1 <= label <= 6:  # centre-surround: luminance in the field relative to the whole image
                rf -= 1.0 / rf.size
            w[_LOCAL, v] = rf / np.linalg.norm(rf)
            if label == 7 or not label:
                w[_GLOBAL, v] = 0.7 * (_tuning(seed, _PRF, 7) if label else _tuning(seed, _STREAMS, stream))
        elif floc:
            w[_GLOBAL, v] = sum(_tuning(seed, c, k) for c, k in floc) + jitter[:, v]
        elif stream:
            w[_GLOBAL, v] = _tuning(seed, _STREAMS, stream) + jitter[:, v]
        else:
            w[:, v] = rest[:, v]
    return w


def _hemi_id(hemi: str) -> int:
    if hemi not in HEMIS:
        raise BadArgumentError(f"hemi must be 'lh' or 'rh', got {hemi!r}")
    return HEMIS.index(hemi)


def planted_fmri(
    descriptors: np.ndarray, n_vertices: int, seed: int, subj: str, hemi: str
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the generative rule to descriptors; returns (fmri float32 (n, n_vertices), noiseless signal float64).

    Z = descriptors z-scored per column over the given images (population std; a constant column becomes 0);
    W = :func:`planted_weights` (ROI-structured); S = Z @ W with each column scaled to unit std (a zero column
    stays 0); fmri = S + E, E ~ N(0, 1 / SNR) from ``np.random.default_rng([seed, int(subj), hemi_id, 1])``.
    Given the descriptors of all training images of a subject, in index order, this reproduces its
    ``{hemi}_training_fmri.npy`` exactly.
    """
    hemi_id = _hemi_id(hemi)
    d = np.asarray(descriptors, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1:
        raise BadArgumentError(f"descriptors must be a 2-D (n_images, n_descriptors) array, got shape {d.shape}")
    if d.shape[1] != N_DESCRIPTORS:
        raise BadArgumentError(f"descriptors must have {N_DESCRIPTORS} columns, got {d.shape[1]}")
    std = d.std(axis=0)
    z = np.where(std > 1e-12, (d - d.mean(axis=0)) / np.where(std > 1e-12, std, 1.0), 0.0)
    s = z @ planted_weights(n_vertices, seed, subj, hemi)
    s_std = s.std(axis=0)
    s = np.where(s_std > 1e-12, s / np.where(s_std > 1e-12, s_std, 1.0), 0.0)
    noise = np.random.default_rng([seed, int(subj), hemi_id, 1]).standard_normal(s.shape) / math.sqrt(SNR)
    return (s + noise).astype(np.float32), s


# ----------------------------------------------------------------------------------------------- subject


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise BadArgumentError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def make_sample_subject(
    root: str | os.PathLike,
    subj: str = "01",
    n_train: int = 16,
    n_test: int = 4,
    seed: int = 0,
    n_vertices: tuple[int, int] = (200, 180),
    *,
    overwrite: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a synthetic subject ``ROOT/subj{subj}`` in the Algonauts 2023 layout and return that folder.

    Layout::

        subjXX/training_split/training_images/train-0001_nsd-00013.png ...   (n_train, 425x425 RGB)
        subjXX/training_split/training_fmri/{lh,rh}_training_fmri.npy        (float32 (n_train, n_vertices[h]))
        subjXX/test_split/test_images/test-0001_nsd-00845.png ...            (n_test; no test_split if 0)
        subjXX/roi_masks/{lh,rh}.{class}_challenge_space.npy                 (int32 (n_vertices[h],) labels)
        subjXX/roi_masks/mapping_{class}.npy                                 (dict label -> name, pickled)

    for the six Algonauts ROI classes (``ROI_MAPPINGS``: prf-visualrois, floc-bodies, floc-faces, floc-places,
    floc-words, streams; label 0 is "Unknown").

    NSD ids: n_train + n_test distinct ids in 0..72999 from ``np.random.default_rng([seed, int(subj), 0])``,
    the first n_train sorted ascending for train, the rest sorted for test; name index i (1-based) goes with
    the i-th id, so sorting names by string gives index order. The image of an NSD id depends only on
    (seed, nsd id), as in NSD, where subjects share images. Each image: a linear colour gradient, usually a
    sinusoidal grating (soft round window or global), 2-7 filled ellipses/rectangles/triangles, and
    Gaussian noise of std 2 grey levels in 2x2-pixel blocks.

    Planted signal (see :func:`image_descriptors` and :func:`planted_fmri`): per hemisphere,
    fmri = unit-variance(zscore(D) @ W) + N(0, 1) noise, where D are the 20 descriptors (mean RGB,
    4x4 luminance map, edge energy) of the training images (their PNG pixels), z-scored over the training
    set, and W (:func:`planted_weights`) depends on the vertex's ROIs (:func:`sample_rois`): early visual ROIs
    respond to local luminance in a receptive field, floc ROIs and the higher streams to global content with
    a tuning shared by the ROI, vertices in no ROI to a random mix. SNR = 1, so an encoder that learned the
    rule perfectly reaches a correlation of 1/sqrt(2) ~ 0.71 with the data at every vertex.

    An existing non-empty subject folder is an error unless ``overwrite=True``, which first removes its
    training_split, test_split and roi_masks. ``workers`` processes render and encode the images when there are
    48 or more (default: CPU count, at most 8; 1 keeps everything in this process); the output does not depend on it.
    """
    if not isinstance(subj, str) or not re.fullmatch(r"[0-9]{2}", subj):
        raise BadArgumentError(f"subj must be two digits like '01', got {subj!r}")
    n_train = _check_int("n_train", n_train, 1)
    n_test = _check_int("n_test", n_test, 0)
    seed = _check_int("seed", seed, 0)
    if n_train > 9999 or n_test > 9999:
        raise BadArgumentError(f"n_train and n_test must be <= 9999 (4-digit names), got {n_train} and {n_test}")
    if n_train + n_test > N_NSD_IMAGES:
        raise BadArgumentError(f"n_train + n_test must be <= {N_NSD_IMAGES} NSD images, got {n_train + n_test}")
    if not isinstance(n_vertices, (tuple, list)) or len(n_vertices) != 2:
        raise BadArgumentError(f"n_vertices must be a pair (lh, rh) of integers >= 1, got {n_vertices!r}")
    n_vertices = (_check_int("n_vertices[0]", n_vertices[0], 1), _check_int("n_vertices[1]", n_vertices[1], 1))
    if workers is None:
        workers = min(cpu_count(), 8)
    workers = _check_int("workers", workers, 1)

    t0 = time.perf_counter()
    try:
        root = Path(root)
    except TypeError:
        raise BadArgumentError(f"root must be a path, got {root!r}") from None
    subject = root / f"subj{subj}"
    for folder in (root, subject):
        if folder.exists() and not folder.is_dir():
            raise BadArgumentError(f"{folder} exists and is not a folder")
    if subject.exists() and any(subject.iterdir()):
        if not overwrite:
            raise BadArgumentError(f"{subject} already exists and is not empty; pass overwrite=True to replace it")
        for part in (SPLIT_DIRS["train"].parts[0], SPLIT_DIRS["synt"].parts[0], ROI_DIR):
            shutil.rmtree(subject / part, ignore_errors=True)

    ids = np.random.default_rng([seed, int(subj), 0]).choice(N_NSD_IMAGES, n_train + n_test, replace=False)
    train_ids, test_ids = np.sort(ids[:n_train]), np.sort(ids[n_train:])
    train_dir, test_dir = subject / SPLIT_DIRS["train"], subject / SPLIT_DIRS["synt"]
    fmri_dir, roi_dir = subject / FMRI_DIR, subject / ROI_DIR
    for d in (train_dir, fmri_dir, roi_dir) + ((test_dir,) if n_test else ()):
        d.mkdir(parents=True, exist_ok=True)

    jobs = [(str(train_dir / f"train-{i:04d}_nsd-{nsd:05d}.png"), int(nsd)) for i, nsd in enumerate(train_ids, 1)]
    jobs += [(str(test_dir / f"test-{i:04d}_nsd-{nsd:05d}.png"), int(nsd)) for i, nsd in enumerate(test_ids, 1)]
    train_desc = write_images(jobs, seed, workers)[:n_train]

    for hemi_id, (hemi, nv) in enumerate(zip(HEMIS, n_vertices)):
        fmri, _ = planted_fmri(train_desc, nv, seed, subj, hemi)
        np.save(fmri_path(subject, hemi), fmri)
        for cls, labels in sample_rois(nv, seed, subj, hemi).items():
            np.save(roi_mask_path(subject, hemi, cls), labels)
    for cls, mapping in ROI_MAPPINGS.items():
        np.save(roi_mapping_path(subject, cls), dict(mapping), allow_pickle=True)

    logger.info(
        "wrote sample subject %s: %d train + %d test images, %d/%d vertices, seed %d, in %.2f s",
        subject, n_train, n_test, n_vertices[0], n_vertices[1], seed, time.perf_counter() - t0,
    )
    return subject
