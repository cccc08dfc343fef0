"""write, write-nofsync, write-lossless (the store writer vs np.save) and write-bytes, write-lossless-bytes (bytes of
a real extraction vs its float32 npy)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from .common import (
    BATCH,
    SPLIT,
    SUBJ,
    C,
    T,
    ensure_subject,
    featstore_write,
    fsync_file,
    gbs,
    log,
    npy_save,
    row,
    stream,
)

# bytes allowed beside the values: zarr.json's fixed part, each image name in it, each chunk's crc32c
META_FIXED, META_PER_IMAGE, CRC = 4096, 64, 4


def backbone_bytes(ctx) -> dict[str, dict]:
    """Per dtype: bytes of the array on disk (chunk files, zarr.json, done markers), bytes of the float32 .npy of the
    same values, and the bytes allowed: the values at the stored itemsize plus a 4-byte crc32c per chunk and the
    metadata (a fixed part and one image name each). Measured on a real extraction (tiny architecture, random
    weights, the default codec) of the benchmark's images: what a codec finds depends on the statistics of real
    activations, which synthetic noise does not have."""
    from featstore.extraction import extract
    from featstore.storage import FeatureStore

    subj = ensure_subject(ctx)
    out = {}
    for dtype in ("float16", "float32"):
        store, npy = ctx.dir / f"bytes-{dtype}.zarr", ctx.dir / "bytes.npy"
        log(f"write-bytes: extracting {ctx.images} images with the tiny architecture, {dtype}")
        extract(subj, store, backbone="dinov2_q", arch="tiny", weights="random", device="cpu", dtype=dtype,
                batch_size=BATCH, num_workers=0, durable=False, progress=False)
        ctx.extract_warm = True  # this process has run extract() (imports, allocator, page cache of the images)
        fa = FeatureStore(store).get("dinov2_q_last", SUBJ, SPLIT)
        out[dtype] = array_bytes(fa, dtype, npy)
        ctx.backbone_shape = fa.shape
        shutil.rmtree(store)
    return out


def array_bytes(fa, dtype: str, npy: Path) -> dict:
    """The array's bytes on disk, its values' bytes as a float32 npy (written to `npy`, then removed), and the bytes
    allowed for an array stored as `dtype`."""
    np.save(npy, np.asarray(fa.read(0, fa.shape[0]), dtype=np.float32))
    values = int(np.prod(fa.shape)) * np.dtype(dtype).itemsize
    overhead = CRC * fa.nchunks + META_FIXED + META_PER_IMAGE * fa.shape[0]
    out = {"bytes": fa.nbytes_stored(), "npy": npy.stat().st_size, "allowed": values + overhead, "values": values,
           "overhead": overhead}
    npy.unlink()
    return out


def _best_times(ctx, full: np.ndarray) -> dict[str, float]:
    """Best seconds of each side over the reps, interleaved; np.save's file is then made durable too (np.save
    alone, and np.save + fsync). np.save writes the float32 array, and the float16 array as the legacy code would make
    it from the same float32 stream: each batch converted by torch (`.half()`), kept in a list, concatenated."""
    n, d = ctx.n, ctx.dir
    configs = {
        "np.save16": lambda: _legacy_f16_save(d / "w.npy", ctx.pool, n),
        "float16": lambda: featstore_write(d / "w16.zarr", ctx.pool, n, "float16", True),
        "np.save32": lambda: npy_save(d / "w.npy", full),
        "float16-nofsync": lambda: featstore_write(d / "w16n.zarr", ctx.pool, n, "float16", False),
        "float32": lambda: featstore_write(d / "w32.zarr", ctx.pool, n, "float32", True),
    }
    best: dict[str, float] = {}
    for r in range(ctx.reps):
        for key, fn in configs.items():
            log(f"write: {key} ({n} x {T} x {C}, rep {r + 1}/{ctx.reps})")
            s, _ = fn()
            if key.startswith("np.save"):
                best[key + "+fsync"] = min(best.get(key + "+fsync", np.inf), s + fsync_file(d / "w.npy"))
            best[key] = min(best.get(key, np.inf), s)
            for p in (d / "w.npy", d / "w16.zarr", d / "w16n.zarr", d / "w32.zarr"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    return best


def _legacy_f16_save(path: Path, pool: np.ndarray, n: int) -> tuple[float, int]:
    import torch

    t0 = time.perf_counter()
    batches = [torch.from_numpy(rows).half().numpy() for _, rows in stream(pool, n)]
    _, size = npy_save(path, np.concatenate(batches))
    return time.perf_counter() - t0, size


def bytes_row(name: str, b: dict, dtype: str, notes: str) -> dict:
    """Judged on the measured bytes: the array's bytes on disk over the float32 npy's, against what the values at
    the stored itemsize plus the fixed per-chunk and metadata overhead allow (a codec may only do better)."""
    bound = b["allowed"] / b["npy"]
    return row(name, b["bytes"] / b["npy"], f"<= {bound:g}x npy bytes ({dtype} values + crc32c + metadata)",
               ("<=", bound), f"{b['bytes'] / 1e6:.2f} MB ({dtype})", f"npy {b['npy'] / 1e6:.2f} MB (float32)",
               f"{notes}; allowed {b['allowed']} B = {b['values']} B of {dtype} values + {b['overhead']} B "
               f"({CRC} B crc32c per chunk, {META_FIXED} B + {META_PER_IMAGE} B per image name of metadata); "
               f"measured {b['bytes']} B", featstore_bytes=b["bytes"], baseline_bytes=b["npy"],
               allowed_bytes=b["allowed"])


def rows_write(ctx) -> list[dict]:
    """The store writer fed a ViT-B-sized float32 stream vs np.save of the same bytes, like for like: the float16
    store vs np.save of the float16 array, the float32 store vs np.save of the float32 array; durable (fsync) vs
    np.save + fsync, page cache only vs plain np.save; best of reps, interleaved. Bytes are measured on real
    backbone output."""
    from featstore.storage import DEFAULT_CODEC

    n = ctx.n
    full = np.empty((n, T, C), np.float32)
    for a, rows in stream(ctx.pool, n):
        full[a : a + len(rows)] = rows
    raw = full.nbytes  # the float32 input both stores are fed; throughputs are in input bytes
    best = _best_times(ctx, full)
    nbytes = backbone_bytes(ctx)
    how = (f"input {raw / 1e9:.2f} GB float32 (synthetic ViT-B-like activations), N={n} chunks of 1 sample, codec "
           f"{DEFAULT_CODEC!r}; featstore side = extraction's own write path (write_batches: torch .to(dtype), "
           "float16 check, ChunkAssembler, BackgroundWriter, write_chunks); GB/s of float32 input on every side")
    tiny = "x".join(map(str, ctx.backbone_shape))
    s16, s, s32 = best["float16"], best["float16-nofsync"], best["float32"]
    n16, n16f, n32, n32f = best["np.save16"], best["np.save16+fsync"], best["np.save32"], best["np.save32+fsync"]
    extraction = (f"extract() of the {ctx.images} images (tiny architecture, random weights, dinov2_q, {tiny}) with "
                  f"codec {DEFAULT_CODEC!r} vs np.save of the same values as float32; bytes on disk of the whole "
                  "array (chunk files, zarr.json, done markers)")
    return [
        row("write", n16f / s16, ">= 1.0x np.save + fsync of the float16 array", (">=", 1.0),
            f"{gbs(raw, s16)} (float16, fsync)", f"np.save f16 + fsync {gbs(raw, n16f)}",
            f"{how}; both sides write the same float16 bytes durably (fsync of every chunk file and folder; the "
            f"legacy recipe: each batch .half() by torch, the list concatenated, np.save, one fsync of the file); "
            f"against np.save + fsync of the "
            f"float32 array (twice the bytes, the legacy export): {n32f / s16:.3g}x",
            featstore_gbs=raw / s16 / 1e9, baseline_gbs=raw / n16f / 1e9, float32_npy_ratio=n32f / s16),
        bytes_row("write-bytes", nbytes["float16"], "float16", extraction),
        row("write-nofsync", n16 / s, ">= 1.0x np.save throughput of the float16 array", (">=", 1.0),
            f"{gbs(raw, s)} (float16, --no_fsync)", f"np.save f16 {gbs(raw, n16)}",
            f"as write, neither side fsyncs (featstore: --no_fsync, done markers without fsync); against plain "
            f"np.save of the float32 array: {n32 / s:.3g}x",
            featstore_gbs=raw / s / 1e9, baseline_gbs=raw / n16 / 1e9),
        row("write-lossless", n32f / s32, ">= 1.0x np.save + fsync throughput", (">=", 1.0),
            f"{gbs(raw, s32)} (float32, fsync)", f"np.save + fsync {gbs(raw, n32f)}", "--dtype float32 (bit-exact "
            "copy of the input) vs np.save of the float32 array; both sides durable",
            featstore_gbs=raw / s32 / 1e9, baseline_gbs=raw / n32f / 1e9),
        bytes_row("write-lossless-bytes", nbytes["float32"], "float32", "as write-bytes, --dtype float32"),
    ]
