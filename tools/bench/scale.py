"""scale-cold, scale-warm: a full subject (9,841 x 962 x 768) read in one random-order epoch, FeatureDataset float16
items from the store vs the legacy recipe's items from a memmap of the float32 npy; the page cache dropped (cold) and
filled (warm). Only with `benchmark.py --scale`: it needs ~45 GB of disk."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import FEATURE, SPLIT, SUBJ, C, T, featstore_write, log, row, stream, warm
from .read import LegacyNpy

FULL_N = 9841  # subj01's training images
MARGIN = 1.03  # codec framing, coordinates, the completion record


def need_gb(n: int) -> float:
    """Disk the scale rows take: the float16 store and the float32 npy of n samples."""
    return n * T * C * (2 + 4) * MARGIN / 1e9


def check_space(ctx) -> str | None:
    """The one-line refusal when --dir lacks the space (None when it has it); before anything is written."""
    where = Path(ctx.dir or tempfile.gettempdir())
    probe = where
    while not probe.exists():  # --dir may not exist yet: its nearest existing parent is on the same disk
        probe = probe.parent
    need = ctx.scale_need_gb if ctx.scale_need_gb is not None else need_gb(ctx.scale_n)
    free = shutil.disk_usage(probe).free / 1e9
    if free < need:
        return f"--scale needs ~{need:.0f} GB free in {where}, {where} has {free:.1f} GB"
    return None


def write_npy(path: Path, pool: np.ndarray, n: int) -> None:
    """The legacy float32 npy of the same stream, written through a memory map block by block (never in RAM whole)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, T, C))
    for a, rows in stream(pool, n, 256):
        out[a : a + len(rows)] = rows
    out.flush()
    del out


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]


def drop_cache(paths: list[Path], how: str) -> str:
    """Evict the files from the page cache before a cold pass; returns how (said in the row's notes). `auto`:
    /proc/sys/vm/drop_caches when this process may write it (root on the host), else posix_fadvise(DONTNEED) per
    file (drops the clean, unmapped pages of those files only)."""
    os.sync()  # dirty pages cannot be dropped
    if how in ("auto", "drop"):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "page cache dropped via /proc/sys/vm/drop_caches"
        except OSError as e:
            if how == "drop":
                raise
            reason = f"drop_caches not allowed ({type(e).__name__}: {e.strerror or e})"
    else:
        reason = "drop_caches not used (--scale-evict fadvise)"
    if not hasattr(os, "posix_fadvise"):
        return f"{reason}; no posix_fadvise on this system: the cold pass may find the files cached"
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return f"{reason}; evicted with posix_fadvise(POSIX_FADV_DONTNEED) per file"


def resident(paths: list[Path], most: int = 64) -> float | None:
    """Fraction of the files' pages in the page cache (mincore on a read-only shared mapping made by libc's mmap: a
    private writable one of a 29 GB file exceeds the commit limit; up to `most` files, evenly spaced), to check that a
    cold pass starts cold; None where mincore is not available."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                  ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    pick = paths[:: max(1, len(paths) // most)]
    total = hit = 0
    for p in pick:
        size = p.stat().st_size
        if size == 0:
            continue
        with open(p, "rb") as f:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = np.zeros(-(-size // page), dtype=np.uint8)
            if libc.mincore(addr, size, vec.ctypes.data) != 0:
                return None
            total += len(vec)
            hit += int(np.count_nonzero(vec & 1))
        finally:
            libc.munmap(addr, size)
    return hit / total if total else None


def _dataset(store: Path):
    from featstore.dataset import FeatureDataset

    try:
        return FeatureDataset(store, FEATURE, SUBJ, SPLIT, dtype="float16"), "float16 items"
    except TypeError:  # a featstore without FeatureDataset(dtype=...)
        return FeatureDataset(store, FEATURE, SUBJ, SPLIT), "float32 items (no FeatureDataset(dtype=...) here)"


def _epoch(ds, order: np.ndarray) -> float:
    t0 = time.perf_counter()
    for i in order:
        x = ds[int(i)]
    assert x.shape[0] == C, x.shape
    return time.perf_counter() - t0


def rows_scale(ctx) -> list[dict]:
    n = ctx.scale_n
    store, npy = ctx.dir / "scale.zarr", ctx.dir / "scale-npy" / f"{SPLIT}.npy"
    npy.parent.mkdir(parents=True, exist_ok=True)
    log(f"scale: writing a {n}-sample float16 store ({n * T * C * 2 / 1e9:.1f} GB raw) through extraction's write path")
    featstore_write(store, ctx.pool, n, "float16", durable=False)
    log(f"scale: writing the float32 npy ({n * T * C * 4 / 1e9:.1f} GB) through a memory map")
    write_npy(npy, ctx.pool, n)
    files = {"store": _files(store / FEATURE / SUBJ / SPLIT / "c"), "memmap": [npy]}
    sizes = {k: sum(p.stat().st_size for p in v) for k, v in files.items()}
    order = np.random.default_rng(7).permutation(n)
    ds, kind = _dataset(store)
    sides = {"store": lambda: ds, "memmap": lambda: LegacyNpy(str(npy))}
    best = {(mode, side): np.inf for mode in ("cold", "warm") for side in sides}
    how, left = "", {}
    for r in range(ctx.reps):
        for mode in ("cold", "warm"):
            for side, make in sides.items():
                if mode == "cold":
                    how = drop_cache(files[side], ctx.scale_evict)
                    left[side] = resident(files[side])
                else:
                    warm(files[side])
                log(f"scale-{mode}: {side}, one random-order epoch of {n} samples (rep {r + 1}/{ctx.reps})")
                best[mode, side] = min(best[mode, side], _epoch(make(), order))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 if hasattr(os, "sysconf") else float("nan")
    out = []
    for mode, target, bound in (("cold", ">= 1.9x memmap throughput", 1.9), ("warm", ">= 4x memmap throughput", 4.0)):
        s, m = best[mode, "store"], best[mode, "memmap"]
        checked = ", ".join(f"{k} {v:.0%}" for k, v in left.items() if v is not None) or "not checked (no mincore)"
        cache = (f"{how}; pages resident after it (mincore): {checked}" if mode == "cold" else
                 f"each side's files read once just before its pass ({ram:.0f} GB RAM: the npy's "
                 f"{sizes['memmap'] / 1e9:.1f} GB {'fit' if sizes['memmap'] < 0.8e9 * ram else 'do not all fit'})")
        out.append(row(f"scale-{mode}", m / s, target, (">=", bound), f"{s:.1f} s ({n / s:.0f} samples/s)",
                       f"memmap {m:.1f} s ({n / m:.0f} samples/s)",
                       f"{n} x {T} x {C}, one random-order epoch, single process, best of {ctx.reps}; store: "
                       f"FeatureDataset {kind} ({sizes['store'] / 1e9:.2f} GB on disk, default codec); memmap: the "
                       f"legacy item (torch.tensor of np.load(mmap_mode='r')[i], CLS strip, reshape, permute) of the "
                       f"float32 npy ({sizes['memmap'] / 1e9:.2f} GB); {cache}",
                       featstore_s=s, baseline_s=m, n=n, evict=how if mode == "cold" else "warm",
                       resident_after_evict=left if mode == "cold" else None))
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(npy.parent, ignore_errors=True)
    return out

