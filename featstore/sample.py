"""Synthetic Algonauts 2023 subjects with a planted, checkable image -> fMRI signal.

The real NSD/Algonauts data is tens of GB behind a data-use agreement, so the demo notebook, the test suite and
the benchmarks use :func:`make_sample_subject` instead: a subject folder with the same file layout and names,
structured images that a vision backbone tells apart, and fMRI whose dependence on the images is known exactly,
so an encoding model fitted on extracted features can be checked to recover it.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import struct
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import BadArgumentError

__all__ = [
    "IMAGE_SIZE",
    "N_DESCRIPTORS",
    "ROI_NAMES",
    "SNR",
    "image_descriptors",
    "make_sample_subject",
    "planted_fmri",
]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 425
N_NSD_IMAGES = 73000
ROI_NAMES = {0: "Unknown", 1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"}
N_DESCRIPTORS = 3 + 16 + 1  # mean RGB, 4x4 luminance map, edge energy
SNR = 1.0  # per-vertex variance of the planted signal over that of the noise
_HEMIS = ("lh", "rh")
_LUMA = np.array([0.299, 0.587, 0.114])
_POOL_MIN_IMAGES = 48  # fewer images than this are written in-process


# ----------------------------------------------------------------------------------------------- descriptors


def image_descriptors(images: np.ndarray) -> np.ndarray:
    """The 20 descriptors the planted fMRI signal is built from, one row per image.

    images: uint8 RGB, (H, W, 3) or (n, H, W, 3). With x = images / 255 and L = x @ [0.299, 0.587, 0.114]:
    columns 0-2 are the mean of R, G, B; columns 3-18 are the mean of L over a 4x4 grid of blocks (rows, then
    columns; block edges as ``np.array_split`` cuts them); column 19 is the edge energy
    mean|dL/dx| + mean|dL/dy| (first differences). L is computed in float32, sums in float64.
    Returns float64 (n, 20).
    """
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise BadArgumentError(f"images must be uint8 (H, W, 3) or (n, H, W, 3), got {arr.dtype} {arr.shape}")
    h, w = arr.shape[1:3]
    if h < 4 or w < 4:
        raise BadArgumentError(f"images must be at least 4x4 pixels, got {h}x{w}")
    rows = np.array([len(b) for b in np.array_split(np.arange(h), 4)])
    cols = np.array([len(b) for b in np.array_split(np.arange(w), 4)])
    r0, c0 = np.concatenate([[0], np.cumsum(rows)[:-1]]), np.concatenate([[0], np.cumsum(cols)[:-1]])
    coef = (_LUMA / 255.0).astype(np.float32)
    out = np.empty((arr.shape[0], N_DESCRIPTORS))
    for i, img in enumerate(arr):
        out[i, 0:3] = img.sum(axis=0, dtype=np.int64).sum(axis=0) / (255.0 * h * w)
        lum = img[..., 0] * coef[0] + img[..., 1] * coef[1] + img[..., 2] * coef[2]
        blocks = np.add.reduceat(np.add.reduceat(lum, r0, axis=0, dtype=np.float64), c0, axis=1)
        out[i, 3:19] = (blocks / np.outer(rows, cols)).ravel()
        out[i, 19] = np.abs(np.diff(lum, axis=1)).mean(dtype=np.float64) + np.abs(np.diff(lum, axis=0)).mean(
            dtype=np.float64
        )
    return out


def planted_fmri(
    descriptors: np.ndarray, n_vertices: int, seed: int, subj: str, hemi: str
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the generative rule to descriptors; returns (fmri float32 (n, n_vertices), noiseless signal float64).

    Z = descriptors z-scored per column over the given images (population std; a constant column becomes 0);
    W ~ N(0, 1) of shape (20, n_vertices) from ``np.random.default_rng([seed, int(subj), hemi_id, 0])``
    (hemi_id 0 = lh, 1 = rh); S = Z @ W with each column scaled to unit std (a zero column stays 0);
    fmri = S + E, E ~ N(0, 1 / SNR) from ``np.random.default_rng([seed, int(subj), hemi_id, 1])``.
    Given the descriptors of all training images of a subject, in index order, this reproduces its
    ``{hemi}_training_fmri.npy`` exactly.
    """
    if hemi not in _HEMIS:
        raise BadArgumentError(f"hemi must be 'lh' or 'rh', got {hemi!r}")
    d = np.asarray(descriptors, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1:
        raise BadArgumentError(f"descriptors must be a 2-D (n_images, n_descriptors) array, got shape {d.shape}")
    std = d.std(axis=0)
    z = np.where(std > 1e-12, (d - d.mean(axis=0)) / np.where(std > 1e-12, std, 1.0), 0.0)
    hemi_id = _HEMIS.index(hemi)
    w = np.random.default_rng([seed, int(subj), hemi_id, 0]).standard_normal((d.shape[1], n_vertices))
    s = z @ w
    s_std = s.std(axis=0)
    s = np.where(s_std > 1e-12, s / np.where(s_std > 1e-12, s_std, 1.0), 0.0)
    noise = np.random.default_rng([seed, int(subj), hemi_id, 1]).standard_normal(s.shape) / math.sqrt(SNR)
    return (s + noise).astype(np.float32), s


# ----------------------------------------------------------------------------------------------- images


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A colour with random hue and varied saturation/brightness, float32 in 0..255."""
    hue = rng.uniform(0, 6)
    sat = rng.uniform(0.2, 1.0)
    val = rng.uniform(0.15, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue) % 6
    rgb = val * (1 - sat * np.clip(np.minimum(k, 4 - k), 0, 1))
    return (rgb * 255).astype(np.float32)


_AXIS = np.arange(IMAGE_SIZE, dtype=np.float32) / np.float32(IMAGE_SIZE)  # pixel coordinate in 0..1
_NOISE_STD = 2.0  # grey levels
_noise_bank: np.ndarray | None = None


def _noise() -> np.ndarray:
    """A fixed int16 field of rounded N(0, 2^2) noise in 2x2 blocks, twice the image side; images use crops.

    Blocks rather than single pixels: deflate codes pixel noise as literals, which would double the PNG
    encoding time, and a backbone that resizes to 224 pixels would not see the difference.
    """
    global _noise_bank
    if _noise_bank is None:
        half = np.random.default_rng(20230101).normal(0.0, _NOISE_STD, size=(IMAGE_SIZE, IMAGE_SIZE))
        _noise_bank = np.rint(half).astype(np.int16).repeat(2, axis=0).repeat(2, axis=1)
    return _noise_bank


def _render(rng: np.random.Generator) -> np.ndarray:
    """One 425x425 RGB uint8 image: colour gradient, usually a grating, 2-7 shapes, mild noise.

    Everything is drawn with separable numpy terms (outer sums/products of per-row and per-column vectors)
    and PIL ImageDraw, which keeps an image to a few milliseconds.
    """
    size = IMAGE_SIZE
    ax = _AXIS
    # background: linear gradient between two colours along a random direction
    theta = rng.uniform(0, 2 * math.pi)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    lo = min(0.0, cos_t) + min(0.0, sin_t)
    span = max(abs(cos_t) + abs(sin_t), 1e-6)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    dc = (c1 - c0) / np.float32(span)
    img = (c0 + ((ax * np.float32(cos_t) - np.float32(lo))[:, None] * dc))[None, :, :] + (
        (ax * np.float32(sin_t))[:, None] * dc
    )[:, None, :]
    # grating: sinusoid of random frequency/orientation/phase, in a soft round window (or over everything)
    if rng.random() < 0.7:
        phi = rng.uniform(0, math.pi)
        k = 2 * math.pi * rng.uniform(2, 24)
        phase = rng.uniform(0, 2 * math.pi)
        if rng.random() < 0.75:
            cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.12, 0.45)
            alpha = np.float32(rng.uniform(0.6, 1.0))
            # mask = alpha * clip(1.5 - d^2 / r^2, 0, 1): zero outside radius r*sqrt(1.5)
            reach = r * math.sqrt(1.5)
            ys = slice(max(0, int((cy - reach) * size)), min(size, int((cy + reach) * size) + 1))
            xs = slice(max(0, int((cx - reach) * size)), min(size, int((cx + reach) * size) + 1))
            dy2 = ((ax[ys] - np.float32(cy)) ** 2) / np.float32(r * r)
            dx2 = ((ax[xs] - np.float32(cx)) ** 2) / np.float32(r * r)
            mask = np.clip(np.float32(1.5) - (dy2[:, None] + dx2[None, :]), 0, 1) * alpha
        else:
            ys = xs = slice(0, size)
            mask = np.float32(rng.uniform(0.3, 0.8))
        ga, gb = _random_colour(rng), _random_colour(rng)
        # sin(a + b) = sin a cos b + cos a sin b, with a along x (phase included) and b along y
        arg_x = np.float32(k * math.cos(phi)) * ax[xs] + np.float32(phase)
        arg_y = np.float32(k * math.sin(phi)) * ax[ys]
        wave = np.float32(0.5) + np.float32(0.5) * (
            np.cos(arg_y)[:, None] * np.sin(arg_x)[None, :] + np.sin(arg_y)[:, None] * np.cos(arg_x)[None, :]
        )
        region = img[ys, xs]
        region += np.asarray(mask)[..., None] * (ga + wave[..., None] * (gb - ga) - region)
    # shapes: ellipses, rectangles and triangles of random colours, sizes and positions
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(2, 8))):
        w, h = rng.uniform(0.08, 0.5, size=2) * size
        x0, y0 = rng.uniform(-0.1 * size, size - 0.5 * w), rng.uniform(-0.1 * size, size - 0.5 * h)
        box = [x0, y0, x0 + w, y0 + h]
        fill = tuple(int(c) for c in _random_colour(rng))
        outline = tuple(int(c) for c in _random_colour(rng)) if rng.random() < 0.4 else None
        width = int(rng.integers(2, 9))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=fill, outline=outline, width=width)
        elif kind == 1:
            draw.rectangle(box, fill=fill, outline=outline, width=width)
        else:
            pts = rng.uniform(0, 1, size=(3, 2)) * [w, h] + [x0, y0]
            draw.polygon([tuple(p) for p in pts.tolist()], fill=fill, outline=outline)
    # mild noise: a random crop of the fixed 2x2-block noise field, the same in the three channels
    oy, ox = rng.integers(0, size + 1, size=2)
    out = np.asarray(pil).astype(np.int16)
    out += _noise()[oy : oy + size, ox : ox + size, None]
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def _png_bytes(pixels: np.ndarray) -> bytes:
    """Encode an RGB uint8 image as an 8-bit truecolour PNG: every row Sub-filtered, zlib level 1.

    About twice as fast as PIL's encoder, whose per-row adaptive filter choice costs as much as the deflate;
    the files are ordinary PNGs (PIL reads them back bit-exact) of about the same size.
    """
    h, w, _ = pixels.shape
    rows = pixels.reshape(h, w * 3)
    filtered = np.empty((h, 1 + w * 3), dtype=np.uint8)
    filtered[:, 0] = 1  # filter type Sub: byte minus the same channel of the pixel to the left, mod 256
    filtered[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, adaptive, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(filtered.tobytes(), 1)) + chunk(
        b"IEND", b""
    )


def _write_image(path: str, seed: int, nsd_id: int) -> np.ndarray:
    """Render the image for (seed, nsd_id), save it as PNG and return its descriptors (20,)."""
    pixels = _render(np.random.default_rng([seed, nsd_id]))
    Path(path).write_bytes(_png_bytes(pixels))
    return image_descriptors(pixels)[0]


def _write_images(jobs: list[tuple[str, int]], seed: int, workers: int) -> np.ndarray:
    """Write all images; returns their descriptors (n, 20) in job order.

    The many small numpy and PIL steps do not speed up in threads (the GIL), so large batches go to worker
    processes: forked on Linux (the children only run numpy, PIL and zlib code that is already imported),
    spawned elsewhere. Small batches stay in-process, where starting processes would cost more than it saves.
    """
    if not jobs:
        return np.empty((0, N_DESCRIPTORS))
    if workers == 1 or len(jobs) < _POOL_MIN_IMAGES:
        return np.stack([_write_image(path, seed, nsd) for path, nsd in jobs])
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    chunk = max(1, min(32, len(jobs) // (4 * workers)))
    paths, ids = zip(*jobs)
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
        return np.stack(list(pool.map(_write_image, paths, [seed] * len(jobs), ids, chunksize=chunk)))


# ----------------------------------------------------------------------------------------------- subject


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise BadArgumentError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _roi_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """Contiguous blocks of labels 0..7 (every label present when n >= 8), about 30 % Unknown."""
    k = len(ROI_NAMES)
    p = np.concatenate([[0.3], 0.7 * rng.dirichlet(np.full(k - 1, 4.0))])
    sizes = np.ones(k, dtype=np.int64) + rng.multinomial(n - k, p) if n >= k else rng.multinomial(n, p)
    return np.repeat(np.arange(k, dtype=np.int32), sizes)


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
        subjXX/roi_masks/{lh,rh}.prf-visualrois_challenge_space.npy          (int32 (n_vertices[h],), 0..7)
        subjXX/roi_masks/mapping_prf-visualrois.npy                         (dict label -> name, pickled)

    NSD ids: n_train + n_test distinct ids in 0..72999 from ``np.random.default_rng([seed, int(subj), 0])``,
    the first n_train sorted ascending for train, the rest sorted for test; name index i (1-based) goes with
    the i-th id, so sorting names by string gives index order. The image of an NSD id depends only on
    (seed, nsd id), as in NSD, where subjects share images. Each image: a linear colour gradient, usually a
    sinusoidal grating (soft round window or global), 2-7 filled ellipses/rectangles/triangles, and
    Gaussian noise of std 2 grey levels in 2x2-pixel blocks.

    Planted signal (see :func:`image_descriptors` and :func:`planted_fmri`): per hemisphere,
    fmri = unit-variance(zscore(D) @ W) + N(0, 1) noise, where D are the 20 descriptors (mean RGB,
    4x4 luminance map, edge energy) of the training images (their PNG pixels), z-scored over the training
    set, and W ~ N(0, 1) is seeded by (seed, subj, hemisphere). SNR = 1, so an encoder that learned
    the rule perfectly reaches a correlation of 1/sqrt(2) ~ 0.71 with the data at every vertex.

    ROI labels: contiguous blocks of 0..7 from ``np.random.default_rng([seed, int(subj), 2 + hemi_id])``;
    every vertex carries signal, whatever its label.

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
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
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
        for part in ("training_split", "test_split", "roi_masks"):
            shutil.rmtree(subject / part, ignore_errors=True)

    ids = np.random.default_rng([seed, int(subj), 0]).choice(N_NSD_IMAGES, n_train + n_test, replace=False)
    train_ids, test_ids = np.sort(ids[:n_train]), np.sort(ids[n_train:])
    train_dir = subject / "training_split" / "training_images"
    fmri_dir = subject / "training_split" / "training_fmri"
    test_dir = subject / "test_split" / "test_images"
    roi_dir = subject / "roi_masks"
    for d in (train_dir, fmri_dir, roi_dir) + ((test_dir,) if n_test else ()):
        d.mkdir(parents=True, exist_ok=True)

    jobs = [(str(train_dir / f"train-{i:04d}_nsd-{nsd:05d}.png"), int(nsd)) for i, nsd in enumerate(train_ids, 1)]
    jobs += [(str(test_dir / f"test-{i:04d}_nsd-{nsd:05d}.png"), int(nsd)) for i, nsd in enumerate(test_ids, 1)]
    train_desc = _write_images(jobs, seed, workers)[:n_train]

    for hemi_id, (hemi, nv) in enumerate(zip(_HEMIS, n_vertices)):
        fmri, _ = planted_fmri(train_desc, nv, seed, subj, hemi)
        np.save(fmri_dir / f"{hemi}_training_fmri.npy", fmri)
        labels = _roi_labels(np.random.default_rng([seed, int(subj), 2 + hemi_id]), nv)
        np.save(roi_dir / f"{hemi}.prf-visualrois_challenge_space.npy", labels)
    np.save(roi_dir / "mapping_prf-visualrois.npy", dict(ROI_NAMES), allow_pickle=True)

    logger.info(
        "wrote sample subject %s: %d train + %d test images, %d/%d vertices, seed %d, in %.2f s",
        subject, n_train, n_test, n_vertices[0], n_vertices[1], seed, time.perf_counter() - t0,
    )
    return subject
