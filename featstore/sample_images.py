"""The sample subject's images: structured scenes a vision backbone tells apart, their PNG files, and the
descriptors (mean colour, a 4x4 luminance map, edge energy) the planted fMRI of sample.py is made from."""
from __future__ import annotations

import math
import multiprocessing as mp
import struct
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import BadArgumentError

IMAGE_SIZE = 425
_LUMA = np.array([0.299, 0.587, 0.114])
N_DESCRIPTORS = 3 + 16 + 1  # mean RGB, 4x4 luminance map, edge energy
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

    Not PIL's encoder, on purpose: PIL's per-row adaptive filter choice makes it ~1.9x slower here (220 sample
    images: 7.2 s vs 3.8 s), and the committed format-0 fixture's image identity (names and file sizes) was taken
    from files written by this encoder. The files are ordinary PNGs (PIL reads them back bit-exact).
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


def write_images(jobs: list[tuple[str, int]], seed: int, workers: int) -> np.ndarray:
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
