"""startup-time, -rss, -100 and their -memmap twins: FeatureDataset vs the legacy ways to open the npy, each in a
fresh process."""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .common import FEATURE, GRID, SPLIT, SUBJ, C, T, child, featstore_write, log, peak_rss_mb, row, stream, unavailable

NAMES = ("startup-time", "startup-rss", "startup-100", "startup-time-memmap", "startup-rss-memmap",
         "startup-100-memmap")
TARGETS = (">= 100x faster start-up", "<= 0.1x peak RSS", "> 1x (informational)", ">= 1x (informational)",
           "<= 1x (informational)", "> 1x (informational)")
CHECKS = {"legacy": ((">=", 100), ("<=", 0.1), (">", 1)), "memmap": ((">=", 1), ("<=", 1), (">", 1))}


def child_startup(mode: str, a: dict) -> dict:
    """Open the data one way and read 100 random samples as (C, H, W) tensors; times and this process's peak RSS."""
    import torch

    from featstore.dataset import FeatureDataset  # both sides: the same imports before the clock starts

    base_rss = peak_rss_mb()
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
    return {"build_s": t1 - t0, "first100_s": t2 - t0, "peak_rss_mb": peak_rss_mb(), "import_rss_mb": base_rss}


CHILDREN = {f"startup-{side}": (lambda a, m=f"startup-{side}": child_startup(m, a))
            for side in ("featstore", "legacy", "memmap")}


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


def _measure(ctx, args: dict) -> dict[str, dict]:
    res: dict[str, dict] = {}
    reps = min(ctx.reps, 2)
    sides = ("legacy", "memmap", "featstore")
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
    return res


def rows_startup(ctx) -> list[dict]:
    """FeatureDataset vs the two legacy ways to open the npy: a whole-file np.load, and np.load(mmap_mode="r"), which
    starts as fast as anything can; each in a fresh process, after the same imports, interleaved."""
    try:
        import featstore.dataset  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the dataset's imports may be missing
        return [unavailable(k, t, f"featstore.dataset: {e}") for k, t in zip(NAMES, TARGETS)]
    n = ctx.startup_n
    store, npy = _inputs(ctx, n)
    res = _measure(ctx, {"store": str(store), "npy": str(npy), "n": n})
    shutil.rmtree(store)
    npy.unlink()
    fs = res["featstore"]
    cache = "npy in the page cache (just written: the legacy ways' best case)"
    out = []
    for suffix, side, label, (t_time, t_rss, t_100) in (("", "legacy", "np.load", TARGETS[:3]),
                                                         ("-memmap", "memmap", "memmap", TARGETS[3:])):
        lg = res[side]
        c_time, c_rss, c_100 = CHECKS[side]
        speed, first = lg["build_s"] / fs["build_s"], lg["first100_s"] / fs["first100_s"]
        rss = fs["peak_rss_mb"] / lg["peak_rss_mb"]
        out += [
            row(f"startup-time{suffix}", speed, t_time, c_time,
                f"FeatureDataset() {fs['build_s'] * 1e3:.1f} ms", f"{label} {lg['build_s'] * 1e3:.1f} ms",
                f"N={n}, fresh process each, after the same imports; {cache}", featstore_s=fs["build_s"],
                baseline_s=lg["build_s"]),
            row(f"startup-rss{suffix}", rss, t_rss, c_rss,
                f"{fs['peak_rss_mb']:.0f} MB", f"{label} {lg['peak_rss_mb']:.0f} MB",
                "peak RSS (VmHWM) of the whole process after reading 100 samples; a memmap's touched pages count "
                f"(imports alone: {fs['import_rss_mb']:.0f} MB)", featstore_mb=fs["peak_rss_mb"],
                baseline_mb=lg["peak_rss_mb"]),
            row(f"startup-100{suffix}", first, t_100, c_100, f"{fs['first100_s']:.2f} s",
                f"{label} {lg['first100_s']:.2f} s",
                "start-up plus 100 random samples as (768, 31, 31) float32 tensors; no target in the issue",
                featstore_s=fs["first100_s"], baseline_s=lg["first100_s"]),
        ]
    return out
