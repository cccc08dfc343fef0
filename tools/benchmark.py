#!/usr/bin/env python
"""featstore benchmark: ratios measured side by side in one run, each against the legacy way of doing the same thing.

    python tools/benchmark.py [--n 400] [--startup-n 2000] [--images 128] [--reps 2] [--json out.json] [--dir DIR]
    python tools/benchmark.py --quick --json out.json        # smoke-test sizes, about a minute (6 fresh interpreters)

Rows (names are stable; the JSON is a list of rows with at least name, ratio, target and a boolean meets):
  write                       store writer (float16, fsync on) fed a ViT-B-sized float32 stream vs np.save + fsync
  write-nofsync               the same without fsync vs plain np.save (page cache only on both sides)
  write-lossless              the float32 store writer (fsync on) vs np.save + fsync
  write-bytes, -lossless-bytes bytes of a real extraction (tiny architecture, random weights; float16 / float32) vs
                              the float32 npy of the same values
  extract                     a full `extract` (tiny backbone) vs its forward pass alone over the same images
  read, read-2workers         random-order samples: FeatureDataset vs np.load(mmap_mode="r") of the npy export
  startup-time, -rss, -100    FeatureDataset vs whole-file np.load of the npy at --startup-n samples (fresh processes);
  startup-*-memmap            the same vs np.load(mmap_mode="r")
  stats                       featstore.feature_stats vs a plain full read of the array
  resume                      a real extract SIGKILLed at a random point, then rerun: images recomputed (counted at the
                              backbone) vs images not marked done at the kill, the resumed store vs an uninterrupted
                              run, and the work lost at the kill (images computed but not marked done)
  resume-noop                 a rerun on a finished store vs the full extraction
  layers                      4 layers of both DINOv2 variants (8 arrays) in one run vs one variant at one layer
  layers-rss                  peak RSS (VmHWM) of an --enc_layer all run of both variants vs a single-output run
  train                       transformer brain encoder training steps fed from the store (FeatureDataset + DataLoader
                              workers) vs from an in-RAM tensor of the same data, same batches

Timings are the best of --reps runs, the two sides interleaved (the machine may be shared). Progress goes to
stderr, the table to stdout. Everything is written under a new temporary folder inside --dir (default: the system's
temporary folder, e.g. /tmp; pick a folder on the disk you care about), removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from featstore import table
from featstore.devices import cpu_count

FEATURE, SUBJ, SPLIT = "bench_vit", "01", "train"
T, C, GRID = 962, 768, (31, 31)  # DINOv2 ViT-B/14 at 434 px: CLS + 31 x 31 patches, 768 channels
BATCH = 16  # the CLI's default --batch_size
POOL = 32  # distinct synthetic samples; the stream cycles through them (each chunk is compressed on its own)
HERE = Path(__file__).resolve()


def log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- synthetic ViT-like activations -----------------------------------------------------------------------------
def make_pool(p: int = POOL, seed: int = 0) -> np.ndarray:
    """(p, T, C) float32 with the statistics that matter for storage: per-channel scales drawn log-normally, per-channel
    offsets, three "massive activation" channels (offsets of +-50..150), Student-t (df 5) noise, and a few
    high-norm artefact tokens per sample. Values stay well inside the float16 range, as DINOv2's do."""
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0.0, 0.8, size=C).astype(np.float32)
    offset = (rng.standard_normal(C) * 0.5 * scale).astype(np.float32)
    massive = rng.choice(C, 3, replace=False)
    offset[massive] = rng.choice([-1.0, 1.0], 3) * rng.uniform(50, 150, 3)
    out = np.empty((p, T, C), np.float32)
    df = np.float32(5.0)
    for i in range(p):
        z = rng.standard_normal((T, C), dtype=np.float32)
        g = rng.standard_gamma(df / 2, size=(T, C), dtype=np.float32)  # chi2(df) / 2
        x = z * np.sqrt(df / (2 * g))  # Student-t(df)
        x *= scale
        x += offset
        x[rng.choice(np.arange(1, T), 4, replace=False)] *= 4  # artefact tokens
        out[i] = x
    return out


def stream(pool: np.ndarray, n: int, batch: int = BATCH):
    """Batches of float32 rows, as a backbone would hand them over: views of the pool, no generation cost."""
    p = len(pool)
    for a in range(0, n, batch):
        b = min(a + batch, n)
        s = a % p
        yield a, (pool[s : s + (b - a)] if s + (b - a) <= p else np.take(pool, range(a, b), axis=0, mode="wrap"))


def _meta(n: int) -> dict[str, Any]:
    return {"token_layout": {"cls_index": 0, "grid": list(GRID), "n_tokens": T},
            "image_names": [f"img{i:05d}.png" for i in range(n)]}


def featstore_write(root: Path, pool: np.ndarray, n: int, dtype: str = "float16", durable: bool = True) -> tuple[float, int]:
    """What extract does after the forward pass: torch `.to(dtype)`, inf check, ChunkAssembler -> BackgroundWriter ->
    FeatureArray.write_chunks. Returns (seconds, bytes of the array on disk)."""
    import torch

    from featstore.extraction import ExtractConfig
    from featstore.extraction.run import has_inf
    from featstore.extraction.writer import BackgroundWriter, ChunkAssembler
    from featstore.storage import ArraySpec, FeatureStore

    fs = FeatureStore(root, mode="a")
    fa, _ = fs.prepare(FEATURE, SUBJ, SPLIT, ArraySpec((n, T, C), 1, dtype), meta=_meta(n), fingerprint={})
    tdtype = getattr(torch, dtype)
    t0 = time.perf_counter()
    assembler = ChunkAssembler(fa, list(range(fa.nchunks)))
    writer = BackgroundWriter(durable, ExtractConfig.queue_mb << 20)  # extract's writer and its default queue bound
    try:
        for _, rows32 in stream(pool, n):
            with torch.inference_mode():
                y = torch.from_numpy(rows32).to(tdtype)
                if tdtype == torch.float16 and has_inf(y):  # extract's float16 overflow check
                    raise RuntimeError("synthetic data overflowed float16")
                rows = y.cpu().numpy()
            for first, data in assembler.add(rows):
                writer.put(fa, first, data)
    finally:
        writer.close()
    writer.check()
    seconds = time.perf_counter() - t0
    return seconds, fa.nbytes_stored()


def npy_save(path: Path, full: np.ndarray) -> tuple[float, int]:
    t0 = time.perf_counter()
    np.save(path, full)
    seconds = time.perf_counter() - t0
    return seconds, path.stat().st_size


def fsync_file(path: Path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def warm(paths) -> None:
    """Read files once so that the timed reads find them in the page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


# ---- rows ---------------------------------------------------------------------------------------------------------
def row(name: str, ratio: float | None, target: str, meets: bool, featstore: str, baseline: str, notes: str = "",
        **extra) -> dict[str, Any]:
    return {"name": name, "ratio": None if ratio is None else float(ratio), "target": target, "meets": bool(meets),
            "featstore": featstore, "baseline": baseline, "notes": notes, **extra}


def unavailable(name: str, target: str, reason: str) -> dict[str, Any]:
    return row(name, None, target, False, f"unavailable ({reason})", "-", f"unavailable ({reason})")


def gbs(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


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


def rows_write(ctx) -> list[dict]:
    """The store writer fed a ViT-B-sized float32 stream vs np.save of the same array, like for like: the durable write
    (fsync) vs np.save + fsync, the page-cache write vs plain np.save; best of reps, interleaved. Bytes are measured
    on real backbone output."""
    from featstore.storage import DEFAULT_CODEC

    n, reps, d = ctx.n, ctx.reps, ctx.dir
    full = np.empty((n, T, C), np.float32)
    for a, rows in stream(ctx.pool, n):
        full[a : a + len(rows)] = rows
    raw = full.nbytes
    configs = {
        "np.save": lambda: npy_save(d / "w.npy", full),
        "float16": lambda: featstore_write(d / "w16.zarr", ctx.pool, n, "float16", True),
        "float16-nofsync": lambda: featstore_write(d / "w16n.zarr", ctx.pool, n, "float16", False),
        "float32": lambda: featstore_write(d / "w32.zarr", ctx.pool, n, "float32", True),
    }
    best: dict[str, float] = {}
    for r in range(reps):
        for key, fn in configs.items():
            log(f"write: {key} ({n} x {T} x {C}, rep {r + 1}/{reps})")
            s, _ = fn()
            if key == "np.save":  # the same file, then made durable: np.save alone, and np.save + fsync
                best["np.save+fsync"] = min(best.get("np.save+fsync", np.inf), s + fsync_file(d / "w.npy"))
            best[key] = min(best.get(key, np.inf), s)
            for p in (d / "w.npy", d / "w16.zarr", d / "w16n.zarr", d / "w32.zarr"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    nbytes = backbone_bytes(ctx)
    ns, nsf = best["np.save"], best["np.save+fsync"]
    base, base_sync = f"np.save {gbs(raw, ns)}", f"np.save + fsync {gbs(raw, nsf)}"
    how = (f"input {raw / 1e9:.2f} GB float32 (synthetic ViT-B-like activations), N={n} chunks of 1 sample, codec "
           f"{DEFAULT_CODEC!r}; featstore side = torch .to(dtype) + ChunkAssembler + BackgroundWriter + write_chunks")
    tiny = "x".join(map(str, ctx.backbone_shape))
    out = []
    s16 = best["float16"]
    out.append(row("write", nsf / s16, ">= 1.0x np.save + fsync throughput", nsf / s16 >= 1.0,
                   f"{gbs(raw, s16)} (float16, fsync)", base_sync,
                   f"{how}; both sides durable (fsync of every chunk file and folder; np.save + one fsync of the "
                   f"file); against plain np.save, which only fills the page cache: {ns / s16:.3g}x",
                   featstore_gbs=raw / s16 / 1e9, baseline_gbs=raw / nsf / 1e9))
    b16, npy16, c16 = nbytes["float16"]
    out.append(row("write-bytes", b16 / npy16, "<= 0.5x npy bytes (codec output)", c16 <= 0.5,
                   f"{b16 / 1e6:.1f} MB (float16)", f"npy {npy16 / 1e6:.1f} MB (float32)",
                   f"{b16 / npy16:.5f}x, on backbone output: extract() of the {ctx.images} images (tiny architecture, "
                   f"random weights, dinov2_q, {tiny}) with codec {DEFAULT_CODEC!r} vs np.save of the same values as "
                   "float32; bytes on disk of the whole array (chunk files, zarr.json, done markers); the target is "
                   f"read on the codec's output, {c16:.5f}x the float32 data (the 4-byte crc32c per chunk, the same "
                   "whatever the codec, and the metadata aside)", featstore_bytes=b16, baseline_bytes=npy16,
                   codec_ratio=c16))
    s = best["float16-nofsync"]
    out.append(row("write-nofsync", ns / s, ">= 1.0x np.save throughput", ns / s >= 1.0,
                   f"{gbs(raw, s)} (float16, --no_fsync)", base,
                   "as write, neither side fsyncs (featstore: --no_fsync, done markers without fsync)",
                   featstore_gbs=raw / s / 1e9, baseline_gbs=raw / ns / 1e9))
    s32 = best["float32"]
    out.append(row("write-lossless", nsf / s32, ">= 1.0x np.save + fsync throughput", nsf / s32 >= 1.0,
                   f"{gbs(raw, s32)} (float32, fsync)", base_sync, "--dtype float32 (bit-exact copy of the input); "
                   "both sides durable", featstore_gbs=raw / s32 / 1e9, baseline_gbs=raw / nsf / 1e9))
    b32, npy32, c32 = nbytes["float32"]
    out.append(row("write-lossless-bytes", b32 / npy32, "<= 1.0x npy bytes (codec output)", c32 <= 1.0,
                   f"{b32 / 1e6:.1f} MB (float32)", f"npy {npy32 / 1e6:.1f} MB (float32)",
                   f"as write-bytes, extracted with --dtype float32; codec output {c32:.5f}x the float32 data",
                   featstore_bytes=b32, baseline_bytes=npy32, codec_ratio=c32))
    return out


def ensure_read_store(ctx) -> tuple[Path, Path]:
    """The float16 store of N samples and its legacy npy export (written once, shared by the read and stats rows)."""
    store, npy_dir = ctx.dir / "read.zarr", ctx.dir / "npy"
    if not store.exists():
        from featstore.export import export_npy

        log(f"read/stats: writing a {ctx.n}-sample float16 store and its npy export")
        featstore_write(store, ctx.pool, ctx.n, "float16", durable=False)
        export_npy(store, npy_dir, feature=FEATURE, subj=SUBJ, split=SPLIT, progress=False)
    return store, npy_dir / FEATURE / SUBJ / f"{SPLIT}.npy"


class LegacyNpy:
    """The legacy dataset's feature path: `torch.tensor(fts[idx])`, CLS strip, reshape to (H, W, C), permute."""

    def __init__(self, path: str, grid: tuple[int, int] = GRID):
        self.path, self.grid, self.fts = path, grid, None
        self.n = int(np.load(path, mmap_mode="r").shape[0])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int):
        import torch

        if self.fts is None:
            self.fts = np.load(self.path, mmap_mode="r")
        img = torch.tensor(self.fts[idx])
        return torch.reshape(img[1:, :], (*self.grid, img.shape[-1])).permute(2, 0, 1)

    def __getstate__(self):
        return {**self.__dict__, "fts": None}


def _time_items(ds, order) -> float:
    t0 = time.perf_counter()
    for i in order:
        x = ds[int(i)]
    assert x.shape == (C, *GRID), x.shape
    return time.perf_counter() - t0


def _time_loader(ds, order, workers: int) -> float:
    """Seconds per sample in steady state: the clock starts when the first batch arrives (worker start-up excluded)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=BATCH, sampler=[int(i) for i in order], num_workers=workers)
    it = iter(loader)
    first = next(it)
    t0 = time.perf_counter()
    n = 0
    for x in it:
        n += len(x)
    assert first.shape[1:] == (C, *GRID), first.shape
    return (time.perf_counter() - t0) / max(n, 1)


def rows_read(ctx) -> list[dict]:
    targets = (">= 0.5x memmap throughput", ">= 1.0x memmap throughput")
    try:
        from featstore.dataset import FeatureDataset
    except Exception as e:  # noqa: BLE001 - dataset.py may not be written yet
        return [unavailable("read", targets[0], f"featstore.dataset: {e}"),
                unavailable("read-2workers", targets[1], f"featstore.dataset: {e}")]
    store, npy = ensure_read_store(ctx)
    warm([npy, *sorted(p for p in (store / FEATURE / SUBJ / SPLIT / "c").rglob("*") if p.is_file())])
    order = np.random.default_rng(1).permutation(ctx.n)
    out = []
    for name, workers, target, thr in (("read", 0, targets[0], 0.5), ("read-2workers", 2, targets[1], 1.0)):
        best = {"featstore": np.inf, "memmap": np.inf}
        reps = 2 * ctx.reps  # passes are short and very sensitive to other load on the machine
        for r in range(reps):
            for side in ("featstore", "memmap"):
                log(f"{name}: {side}, {ctx.n} random samples (rep {r + 1}/{reps})")
                ds = FeatureDataset(store, FEATURE, SUBJ, SPLIT) if side == "featstore" else LegacyNpy(str(npy))
                s = _time_items(ds, order) / len(order) if workers == 0 else _time_loader(ds, order, workers)
                best[side] = min(best[side], s)
        fs_rate, mm_rate = 1 / best["featstore"], 1 / best["memmap"]
        how = ("single process, a new dataset object per pass (memmap: a new mapping, its page faults included)"
               if workers == 0 else f"DataLoader(num_workers=2, batch_size={BATCH}), steady state after the first batch")
        out.append(row(name, fs_rate / mm_rate, target, fs_rate / mm_rate >= thr, f"{fs_rate:.0f} samples/s",
                       f"memmap {mm_rate:.0f} samples/s",
                       f"{how}; page cache warm (both files read once before); float32 (768, 31, 31) per sample",
                       featstore_rate=fs_rate, baseline_rate=mm_rate))
    return out


def rows_stats(ctx) -> list[dict]:
    target = ">= 0.8x plain-read throughput"
    try:
        from featstore.stats import feature_stats
    except Exception as e:  # noqa: BLE001 - stats.py may not be written yet
        return [unavailable("stats", target, f"featstore.stats: {e}")]
    from featstore.storage import FeatureStore

    store, _ = ensure_read_store(ctx)
    fa = FeatureStore(store).get(FEATURE, SUBJ, SPLIT)
    step = max(1, (100 << 20) // (T * C * 2))

    def plain():
        for a in range(0, ctx.n, step):
            fa.read(a, min(a + step, ctx.n))

    best = {"stats": np.inf, "read": np.inf}
    for r in range(ctx.reps):
        for side, fn in (("read", plain), ("stats", lambda: feature_stats(store, FEATURE, SUBJ, SPLIT, save=False))):
            log(f"stats: {side} (rep {r + 1}/{ctx.reps})")
            t0 = time.perf_counter()
            fn()
            best[side] = min(best[side], time.perf_counter() - t0)
    nbytes = ctx.n * T * C * 2
    ratio = best["read"] / best["stats"]
    return [row("stats", ratio, target, ratio >= 0.8, f"{gbs(nbytes, best['stats'])} decoded", f"read {gbs(nbytes, best['read'])}",
                f"feature_stats(save=False) over N={ctx.n} float16 vs FeatureArray.read in ~100 MB blocks; page cache warm",
                featstore_s=best["stats"], baseline_s=best["read"])]


# ---- rows that run in fresh processes -----------------------------------------------------------------------------
def child(mode: str, args: dict) -> dict:
    """Run `mode` in a fresh interpreter (this file with --child) and return the JSON it prints last."""
    cmd = [sys.executable, str(HERE), "--child", mode, json.dumps(args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.get("timeout", 1800))
    if r.returncode != 0:
        raise RuntimeError(f"child {mode} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:] or r.stdout}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def start_early(ctx, groups: list[str]) -> None:
    """--quick only: the fresh-interpreter children whose inputs exist from the start run at once, beside the groups
    that run in this process (most of such a child is interpreter start-up, on one core). Full runs keep every
    measurement on a quiet machine. (--quick runs the extract row's child in this process: it measures nothing that
    needs a fresh one, and an interpreter start costs more than the row.)"""
    ctx.early = {}
    if not ctx.quick or "layers" not in groups:
        return
    subj = ensure_subject(ctx)
    log("--quick: starting the layers-rss child processes now, beside the other groups")
    ctx.early_pool = ThreadPoolExecutor(2)
    if "layers" in groups:
        for side in RSS_SIDES:
            ctx.early[f"rss-{side}"] = ctx.early_pool.submit(child, "extract-rss", _rss_args(ctx, subj, side))


def early(ctx, key: str) -> dict | None:
    """The result of a child started by start_early, or None (then the caller runs it now)."""
    fut = getattr(ctx, "early", {}).pop(key, None)
    return None if fut is None else fut.result()


def _peak_rss_mb() -> float:
    """Peak RSS of this process image. VmHWM, not getrusage: Linux carries ru_maxrss over fork + exec, so a child
    would report the benchmark's own peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)


def _tiny_depth(depth: int | None) -> None:
    """A tiny DINOv2 with `depth` blocks (the test architecture has 3; the layers row asks for L = 4)."""
    if depth:
        from featstore.backbones import dinov2

        dinov2.TINY = {**dinov2.TINY, "depth": int(depth)}


def run_extract_child(mode: str, a: dict) -> dict:
    """Child modes that run extract() as `featstore extract` does (2 loader workers, float16, fsync, default codec)."""
    from featstore import get_backbone
    from featstore.extraction import extract

    opts = {"device": "cpu", "batch_size": a.get("batch", BATCH), "num_workers": a.get("workers", 2), "progress": False}
    _tiny_depth(a.get("depth"))
    if mode == "resume-run":  # counts the images each forward pass computed, in a file that survives a SIGKILL
        bb = get_backbone("dinov2_q", arch="tiny", weights="random", seed=0)
        forward = bb.forward_features
        with open(a["counter"], "a") as counter:
            def counted(x):
                ys = forward(x)
                counter.write(f"{len(x)}\n")
                counter.flush()
                return ys

            bb.forward_features = counted
            t0 = time.perf_counter()
            res = extract(a["subj"], a["store"], backbone=bb, **opts)
            out = {"seconds": time.perf_counter() - t0, "computed": sum(x.computed for x in res.splits)}
        if a.get("noop"):  # then a rerun on the finished store, in the same warm process (saves an interpreter)
            t0 = time.perf_counter()
            res = extract(a["subj"], a["store"], backbone=bb, **opts)
            out["noop"] = {"seconds": time.perf_counter() - t0, "computed": sum(x.computed for x in res.splits)}
        return out
    if mode == "extract-rss":  # one run, then this process's own peak RSS (VmHWM)
        t0 = time.perf_counter()
        res = extract(a["subj"], a["store"], backbone=a["backbone"], enc_layer=a["enc_layer"], arch=a["arch"],
                      weights="random", **opts)
        return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb(), "arrays": len(res.splits),
                "bytes": sum(s.bytes_on_disk for s in res.splits)}
    raise SystemExit(f"unknown child mode {mode}")


def run_child(mode: str, a: dict) -> dict:
    import torch

    from featstore import get_backbone
    from featstore.extraction import extract

    if mode in ("startup-featstore", "startup-legacy", "startup-memmap"):
        from featstore.dataset import FeatureDataset  # both sides: the same imports before the clock starts

        base_rss = _peak_rss_mb()
        t0 = time.perf_counter()
        if mode == "startup-featstore":
            ds = FeatureDataset(a["store"], FEATURE, SUBJ, SPLIT)
            get = ds.__getitem__
        else:  # the legacy ways: the whole array in memory, or mapped (pages read on first touch)
            fts = np.load(a["npy"], mmap_mode="r" if mode == "startup-memmap" else None)

            def get(idx):
                img = torch.tensor(fts[idx])
                return torch.reshape(img[1:, :], (*GRID, img.shape[-1])).permute(2, 0, 1)

        t1 = time.perf_counter()
        for i in np.random.default_rng(2).choice(a["n"], min(100, a["n"]), replace=False):
            x = get(int(i))
        assert x.shape == (C, *GRID)
        t2 = time.perf_counter()
        return {"build_s": t1 - t0, "first100_s": t2 - t0, "peak_rss_mb": _peak_rss_mb(), "import_rss_mb": base_rss}
    if mode in ("resume-run", "extract-rss"):
        return run_extract_child(mode, a)
    bb = get_backbone("dinov2_q", arch="tiny", weights="random", seed=0)
    from PIL import Image

    from featstore.layout import read_subject

    paths = read_subject(Path(a["subj"])).images["train"]
    if mode == "extract":  # forward only (torch's default threads, and 1 thread), then the full extract
        xs = []
        for p in paths:
            with Image.open(p) as im:
                xs.append(bb.preprocess(im))
        batches = [torch.stack(xs[i : i + a["batch"]]) for i in range(0, len(xs), a["batch"])]
        default_threads = torch.get_num_threads()
        out = {"forward": {}}
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                bb(batches[0])  # warm-up
                t0 = time.perf_counter()
                for x in batches:
                    bb(x)
                out["forward"][threads] = time.perf_counter() - t0
        torch.set_num_threads(default_threads)
        t0 = time.perf_counter()
        res = extract(a["subj"], a["store"], backbone=bb, device="cpu", batch_size=a["batch"],
                      num_workers=a["workers"], progress=False)
        out["seconds"] = time.perf_counter() - t0
        out["computed"] = sum(x.computed for x in res.splits)
        return out
    raise SystemExit(f"unknown child mode {mode}")


def ensure_subject(ctx) -> Path:
    subj = ctx.dir / "images" / f"subj{SUBJ}"
    if not subj.exists():
        from featstore.sample import make_sample_subject

        log(f"extract/resume: writing {ctx.images} synthetic 425 px images")
        make_sample_subject(ctx.dir / "images", subj=SUBJ, n_train=ctx.images, n_test=0, seed=0)
    return subj


def _extract_args(subj: Path, store: Path) -> dict:
    return {"subj": str(subj), "store": str(store), "batch": BATCH, "workers": 2}


def rows_extract(ctx) -> list[dict]:
    subj = ensure_subject(ctx)
    n = ctx.images
    warm(sorted((subj / "training_split" / "training_images").iterdir()))
    fwd: dict[int, float] = {}
    ext = np.inf
    store = ctx.dir / "extract.zarr"
    reps = min(ctx.reps, 2)  # each rep is a fresh interpreter (torch + timm imports)
    for r in range(reps):
        res = early(ctx, "extract") if r == 0 else None
        if res is None:
            log(f"extract: forward only, then a full extract with the defaults, {n} images (rep {r + 1}/{reps})"
                f"{' in this process (--quick)' if ctx.quick else ''}")
            shutil.rmtree(store, ignore_errors=True)
            res = (run_child if ctx.quick else child)("extract", _extract_args(subj, store))
        assert res["computed"] == n, res
        for k, v in res["forward"].items():
            fwd[int(k)] = min(fwd.get(int(k), np.inf), v)
        ext = min(ext, res["seconds"])
    shutil.rmtree(store, ignore_errors=True)
    ctx.extract_s = ext
    f = min(fwd.values())
    ratio = ext / f
    per = ", ".join(f"{k} thread{'s' if k > 1 else ''} {v:.2f} s" for k, v in sorted(fwd.items()))
    return [row("extract", ratio, "<= 1.1x forward-only time", ratio <= 1.1, f"{ext:.2f} s ({n / ext:.0f} img/s)",
                f"forward {f:.2f} s ({n / f:.0f} img/s)",
                f"{n} images 425 px -> 434 px, dinov2_q tiny random weights, batch {BATCH}, CPU; extract() with its "
                f"defaults (DataLoader 2 workers, torch's default threads, float16, fsync) in-process after imports; "
                f"forward-only over preloaded tensors, the faster thread count ({per})", featstore_s=ext, baseline_s=f)]


def rows_startup(ctx) -> list[dict]:
    """FeatureDataset vs the two legacy ways to open the npy: a whole-file np.load, and np.load(mmap_mode="r"), which
    starts as fast as anything can; each in a fresh process, after the same imports, interleaved."""
    names = ("startup-time", "startup-rss", "startup-100", "startup-time-memmap", "startup-rss-memmap",
             "startup-100-memmap")
    targets = (">= 100x faster start-up", "<= 0.1x peak RSS", "> 1x (informational)", ">= 1x (informational)",
               "<= 1x (informational)", "> 1x (informational)")
    try:
        import featstore.dataset  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return [unavailable(k, t, f"featstore.dataset: {e}") for k, t in zip(names, targets)]
    n = ctx.startup_n
    store, npy = ctx.dir / "startup.zarr", ctx.dir / "startup.npy"
    log(f"startup: writing a {n}-sample float16 store ({n * T * C * 2 / 1e9:.1f} GB) and a float32 npy "
        f"({n * T * C * 4 / 1e9:.1f} GB) from the synthetic stream")
    featstore_write(store, ctx.pool, n, "float16", durable=False)
    mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, T, C))
    for a, rows in stream(ctx.pool, n):
        mm[a : a + len(rows)] = rows
    mm.flush()
    del mm
    res: dict[str, dict] = {}
    reps = min(ctx.reps, 2)
    sides = ("legacy", "memmap", "featstore")
    args = {"store": str(store), "npy": str(npy), "n": n}
    if ctx.quick:  # smoke-test sizes: the three processes at once (their times then share the CPUs)
        log("startup: legacy, memmap and featstore in three fresh processes at once (--quick)")
        with ThreadPoolExecutor(3) as pool:
            res = dict(zip(sides, pool.map(lambda side: child(f"startup-{side}", args), sides)))
    for r in range(0 if ctx.quick else reps):
        for side in sides:
            log(f"startup: {side} in a fresh process (rep {r + 1}/{reps})")
            x = child(f"startup-{side}", args)
            old = res.get(side)
            res[side] = x if old is None else {k: min(old[k], x[k]) for k in x}
    shutil.rmtree(store)
    npy.unlink()
    fs = res["featstore"]
    cache = "npy in the page cache (just written: the legacy ways' best case)"
    out = []
    for suffix, side, label, (t_time, t_rss, t_100) in (("", "legacy", "np.load", targets[:3]),
                                                         ("-memmap", "memmap", "memmap", targets[3:])):
        lg = res[side]
        speed, first = lg["build_s"] / fs["build_s"], lg["first100_s"] / fs["first100_s"]
        rss = fs["peak_rss_mb"] / lg["peak_rss_mb"]
        out += [
            row(f"startup-time{suffix}", speed, t_time, speed >= (100 if side == "legacy" else 1),
                f"FeatureDataset() {fs['build_s'] * 1e3:.1f} ms", f"{label} {lg['build_s'] * 1e3:.1f} ms",
                f"N={n}, fresh process each, after the same imports; {cache}", featstore_s=fs["build_s"],
                baseline_s=lg["build_s"]),
            row(f"startup-rss{suffix}", rss, t_rss, rss <= (0.1 if side == "legacy" else 1),
                f"{fs['peak_rss_mb']:.0f} MB", f"{label} {lg['peak_rss_mb']:.0f} MB",
                "peak RSS (VmHWM) of the whole process after reading 100 samples; a memmap's touched pages count "
                f"(imports alone: {fs['import_rss_mb']:.0f} MB)", featstore_mb=fs["peak_rss_mb"],
                baseline_mb=lg["peak_rss_mb"]),
            row(f"startup-100{suffix}", first, t_100, first > 1, f"{fs['first100_s']:.2f} s",
                f"{label} {lg['first100_s']:.2f} s",
                "start-up plus 100 random samples as (768, 31, 31) float32 tensors; no target in the issue",
                featstore_s=fs["first100_s"], baseline_s=lg["first100_s"]),
        ]
    return out


def rows_resume(ctx) -> list[dict]:
    """A real extract process SIGKILLed at a random point, then rerun. What the rerun recomputes is counted at the
    backbone (not taken from extract's own summary) and compared with the images not marked done at the kill: more
    would mean finished work is done again. The resumed store must equal an uninterrupted run. The work lost at the
    kill (images computed but not yet marked done) is reported."""
    from featstore.extraction import extract
    from featstore.storage import FeatureStore

    subj = ensure_subject(ctx)
    n = ctx.images
    store, ref = ctx.dir / "resume.zarr", ctx.dir / "resume-ref.zarr"
    counts = (ctx.dir / "resume-killed.count", ctx.dir / "resume-rerun.count")
    for p in (store, ref):
        shutil.rmtree(p, ignore_errors=True)
    for p in counts:
        p.unlink(missing_ok=True)
    feature = "dinov2_q_last"

    def done() -> np.ndarray | None:
        try:
            return FeatureStore(store).get(feature, SUBJ, SPLIT).done_mask()
        except Exception:  # noqa: BLE001 - not created yet
            return None

    def forwarded(path: Path) -> int:
        return sum(int(x) for x in path.read_text().split()) if path.exists() else 0

    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    k, delay = int(rng.integers(1, max(n - BATCH, 1) + 1)), float(rng.uniform(0, 0.02))
    log(f"resume: extract on {n} images in a subprocess, SIGKILL {delay * 1e3:.0f} ms after {k} images were computed "
        f"(random point, seed {seed})")
    args = {"subj": str(subj), "store": str(store), "counter": str(counts[0])}
    with open(ctx.dir / "resume-killed.err", "w") as err:
        p = subprocess.Popen([sys.executable, str(HERE), "--child", "resume-run", json.dumps(args)],
                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None and forwarded(counts[0]) < k:
            time.sleep(0.002)
        time.sleep(delay)
        finished = p.poll() is not None
        if not finished:
            os.killpg(p.pid, signal.SIGKILL)  # the loader workers too
        p.wait()
    if p.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"the extract to kill failed: {(ctx.dir / 'resume-killed.err').read_text()[-500:]}")
    m = done()
    at_kill = int(m.sum()) if m is not None else 0
    computed_at_kill = forwarded(counts[0])
    lost = computed_at_kill - at_kill
    log("resume: rerunning the same extract (in this process), then once more on the finished store")
    rerun = run_extract_child("resume-run", {**args, "counter": str(counts[1]), "noop": True})  # in this process
    recomputed = forwarded(counts[1])
    noop = rerun["noop"]
    assert noop["computed"] == 0, noop
    log("resume: an uninterrupted extract for reference")
    extract(subj, ref, backbone="dinov2_q", arch="tiny", weights="random", device="cpu", batch_size=BATCH,
            num_workers=0, durable=False, progress=False)
    ctx.extract_warm = True
    a, b = FeatureStore(store).get(feature, SUBJ, SPLIT), FeatureStore(ref).get(feature, SUBJ, SPLIT)
    same = a.is_complete() and np.array_equal(a.read(0, n), b.read(0, n), equal_nan=True)
    full = getattr(ctx, "extract_s", None)
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(ref, ignore_errors=True)
    todo = n - at_kill  # chunks of one sample
    ratio = recomputed / todo if todo else (0.0 if recomputed == 0 else float("inf"))
    ok = recomputed <= todo and same
    out = [row("resume", ratio, "<= 1.0x the images not marked done (nothing done is recomputed), same store",
               ok, f"{recomputed} images recomputed, {lost} lost", f"{todo} not marked done at the kill",
               f"SIGKILL (process group) at a random point (seed {seed}): {delay * 1e3:.0f} ms after the backbone "
               f"had computed >= {k} of {n} images{' (the run had finished first)' if finished else ''}; at the kill "
               f"{computed_at_kill} images were computed and {at_kill} marked done, so {lost} computed images were "
               f"lost (the writer's backlog; at most a batch of {BATCH} plus the queue); the rerun recomputed "
               f"{recomputed} (counted at the backbone; extract reported {rerun['computed']}), and the resumed store "
               f"{'equals' if same else 'DIFFERS from'} an uninterrupted run; rerun {rerun['seconds']:.1f} s",
               recomputed=recomputed, done_at_kill=at_kill, computed_at_kill=computed_at_kill, lost=lost,
               identical=bool(same), killed=not finished, n=n, seed=seed)]
    if full:
        out.append(row("resume-noop", noop["seconds"] / full, "<= 0.05x the full extraction", noop["seconds"] / full <= 0.05,
                       f"{noop['seconds'] * 1e3:.0f} ms to find nothing to do", f"full extract {full:.2f} s",
                       "extract() on the finished store, in-process after imports and backbone build",
                       featstore_s=noop["seconds"], baseline_s=full))
    else:
        out.append(row("resume-noop", None, "<= 0.05x the full extraction", False,
                       f"{noop['seconds'] * 1e3:.0f} ms to find nothing to do", "full extract time unavailable",
                       "the extract row did not run", featstore_s=noop["seconds"]))
    return out


# ---- many outputs from one forward pass (issue 12) ----------------------------------------------------------------
LAYERS_DEPTH = 4  # a tiny DINOv2 with 4 blocks, so that L = 4 layers of both variants make 8 arrays


def _layers_times(subj: Path, root: Path, reps: int, warmed: bool) -> dict:
    """Best seconds of extract() for one output and for 4 layers x 2 variants, same images and model, interleaved,
    in this process (no interpreter start on either side); one untimed run first unless `warmed`."""
    from featstore import get_backbone
    from featstore.backbones import dinov2
    from featstore.extraction import extract

    tiny = dinov2.TINY
    dinov2.TINY = {**tiny, "depth": LAYERS_DEPTH}
    try:
        bbs = {"one": get_backbone("dinov2_q", layer=-1, arch="tiny", weights="random", seed=0),
               "many": get_backbone("dinov2_q,dinov2", layer=f"0:{LAYERS_DEPTH}", arch="tiny", weights="random",
                                    seed=0)}
    finally:
        dinov2.TINY = tiny
    best = dict.fromkeys(bbs, np.inf)
    for r in range(0 if warmed else -1, reps):  # round -1 warms up (imports, allocator, page cache), not timed
        for side, bb in bbs.items():
            if r < 0 and side == "one":
                continue
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.perf_counter()
            extract(subj, root, backbone=bb, device="cpu", batch_size=BATCH, progress=False)
            if r >= 0:
                best[side] = min(best[side], time.perf_counter() - t0)
    shutil.rmtree(root, ignore_errors=True)
    return {**best, "arrays": len(bbs["many"].outputs)}


RSS_SIDES = {"one": ("dinov2_q", -1), "all": ("dinov2_q,dinov2", "all")}  # side: backbone, --enc_layer


def _rss_args(ctx, subj: Path, side: str) -> dict:
    backbone, layers = RSS_SIDES[side]
    return {"subj": str(subj), "store": str(ctx.dir / f"rss-{side}.zarr"), "backbone": backbone, "enc_layer": layers,
            "arch": "tiny", "depth": LAYERS_DEPTH}


def rows_layers(ctx) -> list[dict]:
    """L = 4 layers of both DINOv2 variants (8 arrays) in one run vs one variant at one layer, same images and model,
    interleaved; and the peak RSS of an `--enc_layer all` run of both variants vs a single-output run,
    each in a fresh process (VmHWM, so the parent's peak is not inherited)."""
    subj = ensure_subject(ctx)
    n = ctx.images
    warm(sorted((subj / "training_split" / "training_images").iterdir()))
    log(f"layers: 8 arrays vs 1, {n} images, tiny architecture with {LAYERS_DEPTH} blocks, best of {ctx.reps}")
    t = _layers_times(subj, ctx.dir / "layers.zarr", ctx.reps, getattr(ctx, "extract_warm", False))
    ratio = t["many"] / t["one"]
    log("layers: peak RSS of dinov2_q --enc_layer -1 and of dinov2_q,dinov2 --enc_layer all, two fresh processes at "
        "once (a peak does not depend on the other's CPU share; each interpreter start costs ~5 s)")
    with ThreadPoolExecutor(2) as pool:
        def run(side: str) -> dict:
            return early(ctx, f"rss-{side}") or child("extract-rss", _rss_args(ctx, subj, side))

        runs = {side: pool.submit(run, side) for side in RSS_SIDES}
        rss = {side: f.result() for side, f in runs.items()}
    for side in rss:
        shutil.rmtree(ctx.dir / f"rss-{side}.zarr", ignore_errors=True)
    r_all, r_one = rss["all"]["peak_rss_mb"], rss["one"]["peak_rss_mb"]
    from featstore.extraction import ExtractConfig

    queue_mb = ExtractConfig.queue_mb  # the writer may hold this many MB of computed rows, however many arrays
    return [
        row("layers", ratio, "<= 1.5x the single-output time", ratio <= 1.5,
            f"{t['many']:.2f} s ({t['arrays']} arrays)", f"{t['one']:.2f} s (1 array)",
            f"{n} images, dinov2_q,dinov2 --enc_layer 0:{LAYERS_DEPTH} vs dinov2_q --enc_layer -1, tiny ViT with "
            f"{LAYERS_DEPTH} blocks (width 48), random weights, extract() defaults (2 loader workers, float16, fsync); "
            "one forward pass per batch either way, 8x the bytes written", featstore_s=t["many"], baseline_s=t["one"]),
        row("layers-rss", r_all / r_one, f"<= the 1-output peak + {queue_mb} MB (the queue bound)",
            r_all <= r_one + queue_mb, f"{r_all:.0f} MB ({rss['all']['arrays']} arrays)",
            f"{r_one:.0f} MB (1 array)",
            f"peak RSS (VmHWM) of the main process of a fresh extract (the 2 loader workers are processes of their "
            f"own), {n} images, --enc_layer all of both variants vs one output; tiny architecture as in layers",
            featstore_mb=r_all, baseline_mb=r_one),
    ]


# ---- training -----------------------------------------------------------------------------------------------------
TRAIN_VERTICES = (1000, 1000)  # per hemisphere; few, so that the readout does not hide the loader
TRAIN_MODEL = {"hidden_dim": 32, "nheads": 2, "dim_feedforward": 64, "dropout": 0.0}  # tiny: the loader shows


def _train_subject(ctx) -> Path:
    """A subject folder for the read store: its image names (empty files: the Dataset checks names only) and random
    fMRI rows."""
    subj = ctx.dir / "train-subj"
    if not subj.exists():
        images, fmri = subj / "training_split" / "training_images", subj / "training_split" / "training_fmri"
        images.mkdir(parents=True)
        fmri.mkdir(parents=True)
        for name in _meta(ctx.n)["image_names"]:
            (images / name).touch()
        rng = np.random.default_rng(0)
        for hemi, v in zip(("lh", "rh"), TRAIN_VERTICES):
            np.save(fmri / f"{hemi}_training_fmri.npy", rng.standard_normal((ctx.n, v), dtype=np.float32))
    return subj


def _train_pass(batches, readout, seed: int) -> tuple[float, int]:
    """Seconds and samples of featstore.encoding's training steps after the first batch (warm-up, worker start)."""
    import torch

    from featstore.encoding import EncoderConfig, TransformerBrainEncoder, train_one_epoch

    torch.manual_seed(seed)
    model = TransformerBrainEncoder(C, readout, EncoderConfig(**TRAIN_MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    it = iter(batches)
    train_one_epoch(model, [next(it)], opt, torch.device("cpu"))
    stats = train_one_epoch(model, it, opt, torch.device("cpu"))
    return stats.seconds, stats.samples


def rows_train(ctx) -> list[dict]:
    """The transformer brain encoder's training step fed from the store through FeatureDataset + 2 DataLoader workers
    vs fed from an in-RAM float32 tensor of the same samples; same batches, same model init, CPU."""
    target = ">= 0.9x in-RAM training throughput"
    try:
        import torch
        from torch.utils.data import DataLoader

        from featstore.dataset import FeatureDataset
        from featstore.encoding import SubjectRois, channels_last_collate, make_readout
        from featstore.sample import ROI_MAPPINGS, sample_rois
    except Exception as e:  # noqa: BLE001 - the encoding package may not be installed
        return [unavailable("train", target, f"featstore.encoding: {e}")]
    store, _ = ensure_read_store(ctx)
    n, subj = ctx.n, _train_subject(ctx)
    nv = dict(zip(("lh", "rh"), TRAIN_VERTICES))
    rois = SubjectRois({h: sample_rois(nv[h], 0, SUBJ, h) for h in nv}, {c: dict(m) for c, m in ROI_MAPPINGS.items()})
    readout = make_readout("rois_all", nv, rois)
    ds = FeatureDataset(store, FEATURE, SUBJ, SPLIT, data_dir=subj)
    log(f"train: an in-RAM float32 copy of the {n} samples ({n * C * GRID[0] * GRID[1] * 4 / 1e9:.2f} GB)")
    ram = channels_last_collate([ds[i][0] for i in range(n)])  # the batches' layout, so both sides compute alike
    targets = {f"{h}_f": torch.from_numpy(np.load(subj / "training_split" / "training_fmri" / f"{h}_training_fmri.npy"))
               for h in nv}
    order = [int(i) for i in np.random.default_rng(3).permutation(n)]

    def ram_batches():
        for a in range(0, n, BATCH):
            idx = torch.tensor(order[a : a + BATCH])
            yield ram[idx], {k: v[idx] for k, v in targets.items()}

    best = {"store": np.inf, "ram": np.inf}
    for r in range(ctx.reps):
        for side in ("store", "ram"):
            log(f"train: {side}, {n} samples in batches of {BATCH} (rep {r + 1}/{ctx.reps})")
            batches = (DataLoader(ds, batch_size=BATCH, sampler=order, num_workers=2,
                                  collate_fn=channels_last_collate) if side == "store" else ram_batches())
            s, k = _train_pass(batches, readout, seed=r)
            best[side] = min(best[side], s / max(k, 1))
    fs_rate, ram_rate = 1 / best["store"], 1 / best["ram"]
    ratio = fs_rate / ram_rate
    params = sum(p.numel() for p in _model_params(readout))
    return [row("train", ratio, target, ratio >= 0.9, f"{fs_rate:.0f} samples/s", f"in-RAM {ram_rate:.0f} samples/s",
                f"TransformerBrainEncoder (hidden 32, 2 heads, rois_all readout, {readout.num_queries} queries, "
                f"{TRAIN_VERTICES[0]}+{TRAIN_VERTICES[1]} vertices, {params} parameters) on (768, 31, 31) float32 "
                f"inputs, AdamW + clipping, torch's default threads; store side: FeatureDataset(data_dir=...) + "
                f"DataLoader(num_workers=2, batch_size={BATCH}, channels-last collate, as train_encoder); in-RAM "
                "side: index a preloaded channels-last tensor; steady state after the first batch", featstore_rate=fs_rate, baseline_rate=ram_rate)]


def _model_params(readout):
    from featstore.encoding import EncoderConfig, TransformerBrainEncoder

    return TransformerBrainEncoder(C, readout, EncoderConfig(**TRAIN_MODEL)).parameters()


# ---- driver -------------------------------------------------------------------------------------------------------
GROUPS: list[tuple[str, tuple[str, ...], Callable]] = [
    ("write", ("write", "write-bytes", "write-nofsync", "write-lossless", "write-lossless-bytes"), rows_write),
    ("extract", ("extract",), rows_extract),
    ("read", ("read", "read-2workers"), rows_read),
    ("startup", ("startup-time", "startup-rss", "startup-100", "startup-time-memmap", "startup-rss-memmap",
                 "startup-100-memmap"), rows_startup),
    ("stats", ("stats",), rows_stats),
    ("resume", ("resume", "resume-noop"), rows_resume),
    ("layers", ("layers", "layers-rss"), rows_layers),
    ("train", ("train",), rows_train),
]
ROW_NAMES = [name for _, names, _ in GROUPS for name in names]


def format_table(rows: list[dict], header: str) -> str:
    cols = [("row", "name"), ("featstore", "featstore"), ("baseline", "baseline"), ("ratio", "ratio"),
            ("target", "target"), ("met", "meets")]
    cells = []
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.4g}x"
        cells.append([r["name"], r["featstore"], r["baseline"], ratio, r["target"], "yes" if r["meets"] else "NO"])
    out = [header, table.format_table(cells, [h for h, _ in cols]), ""]
    out += [f"{r['name']}: {r['notes']}" for r in rows if r.get("notes")]
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400, help="samples for the write, read and stats rows (default 400)")
    p.add_argument("--startup-n", type=int, default=2000, help="samples for the start-up rows (default 2000)")
    p.add_argument("--images", type=int, default=128,
                   help="images for the write-bytes, extract, resume and layers rows (default 128)")
    p.add_argument("--reps", type=int, default=2, help="repetitions; the best of each side is kept (default 2)")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes: --n 24 --startup-n 48 --images 24 --reps 1")
    p.add_argument("--only", default=None, help=f"comma-separated groups: {','.join(g for g, _, _ in GROUPS)}")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument("--dir", default=None, help="make the working folder in DIR (default: the system's temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the working folder instead of removing it at the end")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    ctx = p.parse_args(argv)
    if ctx.child:
        print(json.dumps(run_child(ctx.child[0], json.loads(ctx.child[1]))))
        return 0
    if ctx.quick:
        ctx.n, ctx.startup_n, ctx.images, ctx.reps = 24, 48, 24, 1  # 24 images: 2 batches, the resume kill lands mid-run
    if min(ctx.n, ctx.startup_n, ctx.images, ctx.reps) < 1:
        p.error("--n, --startup-n, --images and --reps must be >= 1")
    groups = [g for g, _, _ in GROUPS] if ctx.only is None else ctx.only.split(",")
    unknown = set(groups) - {g for g, _, _ in GROUPS}
    if unknown:
        p.error(f"--only: unknown groups {', '.join(sorted(unknown))}")
    if ctx.dir is not None:
        Path(ctx.dir).mkdir(parents=True, exist_ok=True)
    ctx.dir = Path(tempfile.mkdtemp(prefix="featstore-bench-", dir=ctx.dir or tempfile.gettempdir()))
    t_start = time.perf_counter()
    log(f"working in {ctx.dir}; generating {POOL} synthetic {T} x {C} samples")
    ctx.pool = make_pool()
    rows: list[dict] = []
    try:
        start_early(ctx, groups)
        for g, names, fn in GROUPS:
            if g not in groups:
                continue
            try:
                got = fn(ctx)
            except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
                log(f"{g}: FAILED: {type(e).__name__}: {e}")
                got = [row(nm, None, "-", False, f"failed ({type(e).__name__}: {e})", "-", f"failed: {e}") for nm in names]
            rows.extend(got)
    finally:
        if getattr(ctx, "early_pool", None) is not None:
            ctx.early_pool.shutdown(wait=True)
        if ctx.keep:
            log(f"kept {ctx.dir}")
        else:
            shutil.rmtree(ctx.dir, ignore_errors=True)
    cpus = cpu_count()
    header = (f"featstore benchmark: N={ctx.n} (write/read/stats), {ctx.startup_n} (start-up), {ctx.images} images "
              f"(write-bytes/extract/resume/layers); {cpus} CPUs; best of {ctx.reps}; {time.perf_counter() - t_start:.0f} s")
    print(format_table(rows, header))
    if ctx.json:
        Path(ctx.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
