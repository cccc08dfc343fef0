"""write, write-nofsync, write-lossless (the store writer vs np.save) and write-bytes, write-lossless-bytes (bytes of
a real extraction vs its float32 npy)."""
from __future__ import annotations

import shutil

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


def backbone_bytes(ctx) -> dict[str, tuple[int, int, float]]:
    """{dtype: (bytes of the array on disk, bytes of the float32 .npy of the same values, the codec's output over the
    raw float32 data)} for a real extraction (tiny architecture, random weights, the default codec) of the benchmark's
    images: what a codec finds depends on the statistics of real activations, which synthetic noise does not have.
    The codec ratio leaves out the 4-byte crc32c of each chunk (there whatever the codec) and all metadata."""
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
        np.save(npy, np.asarray(fa.read(0, fa.shape[0]), dtype=np.float32))
        chunks = sum(p.stat().st_size for p in (store / fa.path / "c").rglob("*") if p.is_file())
        data = int(np.prod(fa.shape)) * 4
        out[dtype] = (fa.nbytes_stored(), npy.stat().st_size, (chunks - 4 * fa.nchunks) / data)
        ctx.backbone_shape = fa.shape
        npy.unlink()
        shutil.rmtree(store)
    return out


def _best_times(ctx, full: np.ndarray) -> dict[str, float]:
    """Best seconds of each side over the reps, interleaved; np.save's file is then made durable too (np.save
    alone, and np.save + fsync)."""
    n, d = ctx.n, ctx.dir
    configs = {
        "np.save": lambda: npy_save(d / "w.npy", full),
        "float16": lambda: featstore_write(d / "w16.zarr", ctx.pool, n, "float16", True),
        "float16-nofsync": lambda: featstore_write(d / "w16n.zarr", ctx.pool, n, "float16", False),
        "float32": lambda: featstore_write(d / "w32.zarr", ctx.pool, n, "float32", True),
    }
    best: dict[str, float] = {}
    for r in range(ctx.reps):
        for key, fn in configs.items():
            log(f"write: {key} ({n} x {T} x {C}, rep {r + 1}/{ctx.reps})")
            s, _ = fn()
            if key == "np.save":
                best["np.save+fsync"] = min(best.get("np.save+fsync", np.inf), s + fsync_file(d / "w.npy"))
            best[key] = min(best.get(key, np.inf), s)
            for p in (d / "w.npy", d / "w16.zarr", d / "w16n.zarr", d / "w32.zarr"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    return best


def rows_write(ctx) -> list[dict]:
    """The store writer fed a ViT-B-sized float32 stream vs np.save of the same array, like for like: the durable write
    (fsync) vs np.save + fsync, the page-cache write vs plain np.save; best of reps, interleaved. Bytes are measured
    on real backbone output."""
    from featstore.storage import DEFAULT_CODEC

    n = ctx.n
    full = np.empty((n, T, C), np.float32)
    for a, rows in stream(ctx.pool, n):
        full[a : a + len(rows)] = rows
    raw = full.nbytes
    best = _best_times(ctx, full)
    nbytes = backbone_bytes(ctx)
    ns, nsf = best["np.save"], best["np.save+fsync"]
    base, base_sync = f"np.save {gbs(raw, ns)}", f"np.save + fsync {gbs(raw, nsf)}"
    how = (f"input {raw / 1e9:.2f} GB float32 (synthetic ViT-B-like activations), N={n} chunks of 1 sample, codec "
           f"{DEFAULT_CODEC!r}; featstore side = extraction's own write path (write_batches: torch .to(dtype), "
           "float16 check, ChunkAssembler, BackgroundWriter, write_chunks)")
    tiny = "x".join(map(str, ctx.backbone_shape))
    s16, s, s32 = best["float16"], best["float16-nofsync"], best["float32"]
    b16, npy16, c16 = nbytes["float16"]
    b32, npy32, c32 = nbytes["float32"]
    return [
        row("write", nsf / s16, ">= 1.0x np.save + fsync throughput", (">=", 1.0),
            f"{gbs(raw, s16)} (float16, fsync)", base_sync,
            f"{how}; both sides durable (fsync of every chunk file and folder; np.save + one fsync of the "
            f"file); against plain np.save, which only fills the page cache: {ns / s16:.3g}x",
            featstore_gbs=raw / s16 / 1e9, baseline_gbs=raw / nsf / 1e9),
        row("write-bytes", b16 / npy16, "<= 0.5x npy bytes (codec output)", ("<=", 0.5),
            f"{b16 / 1e6:.1f} MB (float16)", f"npy {npy16 / 1e6:.1f} MB (float32)",
            f"{b16 / npy16:.5f}x, on backbone output: extract() of the {ctx.images} images (tiny architecture, "
            f"random weights, dinov2_q, {tiny}) with codec {DEFAULT_CODEC!r} vs np.save of the same values as "
            "float32; bytes on disk of the whole array (chunk files, zarr.json, done markers); the target is "
            f"read on the codec's output, {c16:.5f}x the float32 data (the 4-byte crc32c per chunk, the same "
            "whatever the codec, and the metadata aside)", on=c16, featstore_bytes=b16, baseline_bytes=npy16,
            codec_ratio=c16),
        row("write-nofsync", ns / s, ">= 1.0x np.save throughput", (">=", 1.0),
            f"{gbs(raw, s)} (float16, --no_fsync)", base,
            "as write, neither side fsyncs (featstore: --no_fsync, done markers without fsync)",
            featstore_gbs=raw / s / 1e9, baseline_gbs=raw / ns / 1e9),
        row("write-lossless", nsf / s32, ">= 1.0x np.save + fsync throughput", (">=", 1.0),
            f"{gbs(raw, s32)} (float32, fsync)", base_sync, "--dtype float32 (bit-exact copy of the input); "
            "both sides durable", featstore_gbs=raw / s32 / 1e9, baseline_gbs=raw / nsf / 1e9),
        row("write-lossless-bytes", b32 / npy32, "<= 1.0x npy bytes (codec output)", ("<=", 1.0),
            f"{b32 / 1e6:.1f} MB (float32)", f"npy {npy32 / 1e6:.1f} MB (float32)",
            f"as write-bytes, extracted with --dtype float32; codec output {c32:.5f}x the float32 data",
            on=c32, featstore_bytes=b32, baseline_bytes=npy32, codec_ratio=c32),
    ]
