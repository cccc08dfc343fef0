"""startup-time, -rss, -100 and their -memmap twins: FeatureDataset vs the legacy ways to open the npy, each in a
fresh process. The memmap rows count (it opens as fast as anything can); the whole-file np.load rows are
information."""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .common import (
    FEATURE,
    GRID,
    POOL,
    SPLIT,
    SUBJ,
    C,
    T,
    child,
    featstore_write,
    log,
    peak_rss_mb,
    row,
    stream,
    unavailable,
)

NAMES = ("startup-time", "startup-rss", "startup-100", "startup-time-memmap", "startup-rss-memmap",
         "startup-100-memmap")
OPEN_MS = 20  # FeatureDataset() may take this long at any N
TARGETS = (">= 100x faster start-up (informational)", "<= 0.1x peak RSS (informational)", "> 1x (informational)",
           f"<= {OPEN_MS} ms to open, at any N", "<= 1x (informational)", ">= 1x memmap (100 random samples)")
CHECKS = {"legacy": ((">=", 100), ("<=", 0.1), (">", 1)), "memmap": (("<=", OPEN_MS), ("<=", 1), (">=", 1))}
COUNTED = {"legacy": (False, False, False), "memmap": (True, False, True)}
LARGE = 5  # the open is also timed on a store of LARGE x --startup-n samples (of few tokens: cheap to write)


def child_startup(mode: str, a: dict) -> dict:
    """Open the data one way and read 100 random samples as (C, H, W) tensors; times and this process's peak RSS."""
    import torch

    from featstore.dataset import FeatureDataset  # both sides: the same imports before the clock starts

    base_rss = peak_rss_mb()
    t0 = time.perf_counter()
    if mode == "startup-featstore":
        ds = FeatureDataset(a["store"], FEATURE, SUBJ, SPLIT)
        if a.get("open_only"):
            return {"build_s": time.perf_counter() - t0}
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
    return {"build_s": t1 - t0, "first100_s": t2 - t0, "peak_rss_mb": peak_rss_mb(), "import_rss_mb": base_rss}


CHILDREN = {f"startup-{side}": (lambda a, m=f"startup-{side}": child_startup(m, a))
            for side in ("featstore", "legacy", "memmap")}


def _large_store(ctx, n: int) -> Path:
    """A real store of n samples of 1 + 1x1 tokens x 8 channels: what opening it costs grows with n (image names,
    the completion record), not with the bytes of a sample."""
    store = ctx.dir / "startup-large.zarr"
    log(f"startup: writing a {n}-sample store of 2 tokens x 8 channels (the open time at a larger N)")
    pool = np.random.default_rng(1).standard_normal((POOL, 2, 8), dtype=np.float32)
    featstore_write(store, pool, n, "float16", durable=False, grid=(1, 1))
    return store


def _inputs(ctx, n: int):
    store, npy = ctx.dir / "startup.zarr", ctx.dir / "startup.npy"
    log(f"startup: writing a {n}-sample float16 store ({n * T * C * 2 / 1e9:.1f} GB) and a float32 npy "
        f"({n * T * C * 4 / 1e9:.1f} GB) from the synthetic stream")
    featstore_write(store, ctx.pool, n, "float16", durable=False)
    mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, T, C))
    for a, rows in stream(ctx.pool, n):
        mm[a : a + len(rows)] = rows
    mm.flush()
    del mm
    return store, npy


def _measure(ctx, args: dict, large: dict) -> dict[str, dict]:
    res: dict[str, dict] = {}
    reps = min(ctx.reps, 2)
    sides = ("legacy", "memmap", "featstore", "large")

    def run(side: str) -> dict:
        return child("startup-featstore", large) if side == "large" else child(f"startup-{side}", args)

    if ctx.quick:  # smoke-test sizes: the processes at once (their times then share the CPUs)
        log("startup: legacy, memmap, featstore and featstore at a larger N in fresh processes at once (--quick)")
        with ThreadPoolExecutor(len(sides)) as pool:
            res = dict(zip(sides, pool.map(run, sides)))
    for r in range(0 if ctx.quick else reps):
        for side in sides:
            log(f"startup: {side} in a fresh process (rep {r + 1}/{reps})")
            x = run(side)
            old = res.get(side)
            res[side] = x if old is None else {k: min(old[k], x[k]) for k in x}
    return res


def rows_startup(ctx) -> list[dict]:
    """FeatureDataset vs the two legacy ways to open the npy: a whole-file np.load, and np.load(mmap_mode="r"), which
    starts as fast as anything can; each in a fresh process, after the same imports, interleaved."""
    try:
        import featstore.dataset  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the dataset's imports may be missing
        return [unavailable(k, t, f"featstore.dataset: {e}") for k, t in zip(NAMES, TARGETS)]
    n, n_large = ctx.startup_n, LARGE * ctx.startup_n
    store, npy = _inputs(ctx, n)
    large = _large_store(ctx, n_large)
    res = _measure(ctx, {"store": str(store), "npy": str(npy), "n": n},
                   {"store": str(large), "n": n_large, "open_only": True})
    for p in (store, large):
        shutil.rmtree(p)
    npy.unlink()
    fs, open_large = res["featstore"], res["large"]["build_s"]
    cache = "npy in the page cache (just written: the legacy ways' best case)"
    out = []
    for suffix, side, label, (t_time, t_rss, t_100) in (("", "legacy", "np.load", TARGETS[:3]),
                                                         ("-memmap", "memmap", "memmap", TARGETS[3:])):
        lg = res[side]
        c_time, c_rss, c_100 = CHECKS[side]
        k_time, k_rss, k_100 = COUNTED[side]
        speed, first = lg["build_s"] / fs["build_s"], lg["first100_s"] / fs["first100_s"]
        rss = fs["peak_rss_mb"] / lg["peak_rss_mb"]
        at_large = f"; at N={n_large} (2 tokens x 8 channels a sample) FeatureDataset() took {open_large * 1e3:.1f} ms"
        if side == "memmap":  # judged on the absolute open time, the slower of both sizes
            on_time = {"on": max(fs["build_s"], open_large) * 1e3, "featstore_large_s": open_large}
            time_notes = (f"judged on the absolute time of FeatureDataset() at N={n} and at N={n_large}, the slower "
                          f"({on_time['on']:.1f} ms); the ratio is memmap's open over featstore's{at_large}")
        else:
            on_time, time_notes = {}, ""
        out += [
            row(f"startup-time{suffix}", speed, t_time, c_time,
                f"FeatureDataset() {fs['build_s'] * 1e3:.1f} ms"
                + (f" ({open_large * 1e3:.1f} ms at N={n_large})" if on_time else ""),
                f"{label} {lg['build_s'] * 1e3:.1f} ms",
                f"N={n}, fresh process each, after the same imports; {cache}{'; ' if time_notes else ''}{time_notes}",
                featstore_s=fs["build_s"], baseline_s=lg["build_s"], counted=k_time, **on_time),
            row(f"startup-rss{suffix}", rss, t_rss, c_rss,
                f"{fs['peak_rss_mb']:.0f} MB", f"{label} {lg['peak_rss_mb']:.0f} MB",
                "peak RSS (VmHWM) of the whole process after reading 100 samples; a memmap's touched pages count "
                f"(imports alone: {fs['import_rss_mb']:.0f} MB)", featstore_mb=fs["peak_rss_mb"],
                baseline_mb=lg["peak_rss_mb"], counted=k_rss),
            row(f"startup-100{suffix}", first, t_100, c_100, f"{fs['first100_s']:.2f} s",
                f"{label} {lg['first100_s']:.2f} s",
                "start-up plus 100 random samples as (768, 31, 31) float32 tensors",
                featstore_s=fs["first100_s"], baseline_s=lg["first100_s"], counted=k_100),
        ]
    return out
