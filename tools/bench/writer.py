"""write-24: the writer's throughput with 24 arrays (an `--enc_layer all` run of both DINOv2 ViT-B variants) vs one
array of the same bytes, both through extraction's own write path, and both against the disk's sequential write
speed measured in the same run."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from .common import C, T, featstore_write, gbs, log, row

ARRAYS = 24  # 12 blocks x 2 variants
BLOCK = 64 << 20  # bytes per write() of the sequential baseline


def samples_per_array(n: int) -> int:
    """16 at the default --n 400 (0.57 GB of float16 in all), 2 with --quick."""
    return max(2, min(16, n // 25))


def disk_write(path: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` to one new file in large writes, then fsync it and its folder: what the disk gives
    a single sequential writer through the page cache, the same route the chunk files take."""
    buf = np.random.default_rng(1).integers(0, 256, min(BLOCK, nbytes), dtype=np.uint8)  # incompressible
    view = memoryview(buf)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, view[: min(left, len(view))])
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return time.perf_counter() - t0


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def rows_writer(ctx) -> list[dict]:
    """24 arrays of `per` samples vs one array of 24 x `per` samples (the same float16 bytes), float16, fsync on,
    each batch of 16 full-size rows (962 x 768) feeding every array as one forward pass feeds every layer; and one
    file of the same bytes written sequentially. Best of --reps, the three interleaved."""
    per = samples_per_array(ctx.n)
    raw = ARRAYS * per * T * C * 2
    sides = {
        "many": lambda: featstore_write(ctx.dir / "w24.zarr", ctx.pool, per, "float16", True, arrays=ARRAYS)[0],
        "one": lambda: featstore_write(ctx.dir / "w1.zarr", ctx.pool, ARRAYS * per, "float16", True)[0],
        "disk": lambda: disk_write(ctx.dir / "disk.bin", raw),
    }
    best = dict.fromkeys(sides, np.inf)
    for r in range(ctx.reps):
        for side, fn in sides.items():
            s = fn()
            best[side] = min(best[side], s)
            log(f"write-24: {side}, {raw / 1e9:.2f} GB of float16 in {s:.2f} s, rep {r + 1}/{ctx.reps}")
            for p in ("w24.zarr", "w1.zarr", "disk.bin"):
                _remove(ctx.dir / p)
    many, one, disk = (raw / best[s] / 1e9 for s in ("many", "one", "disk"))
    return [
        row("write-24", many / one, ">= 0.8x the 1-array throughput", (">=", 0.8),
            f"{gbs(raw, best['many'])} ({ARRAYS} arrays)", f"{gbs(raw, best['one'])} (1 array)",
            f"{raw / 1e9:.2f} GB of float16 either way: {ARRAYS} arrays x {per} samples vs 1 array x {ARRAYS * per} "
            f"samples, {T} x {C} rows (DINOv2 ViT-B/14 at 434 px, as --enc_layer all of both variants), chunks of 1 "
            "sample, fsync on, fed float32 batches of 16 through extraction's own write path (write_batches); the "
            f"disk's sequential write in the same run (one file, {BLOCK >> 20} MB writes, fsync) "
            f"{disk:.2f} GB/s: {ARRAYS} arrays at {many / disk:.2f}x of it, 1 array at {one / disk:.2f}x",
            featstore_gbs=many, baseline_gbs=one, disk_gbs=disk, bytes=raw, arrays=ARRAYS, samples=per),
    ]
