"""stats: featstore.feature_stats vs a plain full read of the array."""
from __future__ import annotations

import time

import numpy as np

from .common import FEATURE, SPLIT, SUBJ, C, T, ensure_read_store, gbs, log, row, unavailable


def rows_stats(ctx) -> list[dict]:
    target = ">= 0.8x plain-read throughput"
    try:
        from featstore.stats import feature_stats
    except Exception as e:  # noqa: BLE001 - dask may be missing
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
    threads = dask_threads()
    return [row("stats", ratio, target, (">=", 0.8), f"{gbs(nbytes, best['stats'])} decoded, {threads} threads",
                f"read {gbs(nbytes, best['read'])}, 1 thread",
                f"feature_stats(save=False) over N={ctx.n} float16 on dask's local scheduler ({threads} threads, "
                f"torch at 1 intra-op thread each) vs FeatureArray.read in ~100 MB blocks in the main thread; "
                f"page cache warm; a ratio of throughputs, so {threads} threads against 1",
                featstore_s=best["stats"], baseline_s=best["read"], featstore_threads=threads, baseline_threads=1)]


def dask_threads() -> int:
    """Threads of dask's local threaded scheduler (what feature_stats uses without --workers/--scheduler)."""
    import dask
    from dask.system import CPU_COUNT

    return int(dask.config.get("num_workers", None) or CPU_COUNT)
