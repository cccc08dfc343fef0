"""Statistics of one stored feature array, in one dask pass over its chunks.

What is computed (`feature_stats`), separately for the CLS token and for the patch tokens (every other token):
- per-channel mean, population std (ddof=0), min and max over (image, token). Values are converted exactly to
  float64 (float16 through torch's vectorised float16 -> float32 -> float64 casts; float32, inf/nan and
  dask.distributed workers, which are not made to load torch, through numpy's) and summed in float64 after subtracting a per-channel shift (image 0's patch mean rounded to the stored
  dtype): var = S2/n - (S1/n)**2 of the shifted values, so channels with a large constant offset (ViTs' "massive
  activations") keep full precision. Float32 stores agree with numpy float64 to ~1e-15 relative.
- the L2 norm of every token (float64), kept as an (N, T) array (1/192 of a float16 array's size): the mean norm
  per grid position (`token_norm`, [H, W]), the mean CLS norm (`cls_norm`), and the outlier rule below.
- outlier tokens (DINOv2's high-norm artefact tokens): a patch token is an outlier when its norm exceeds
  ``median + z * 1.4826 * MAD`` of all patch-token norms of the array (z = 6 by default), i.e. a robust z-score
  above 6, which a Gaussian reaches once in 10^9. Median and MAD are exact (taken from the kept norms). Reported:
  threshold, count, share of patch tokens, share of images with at least one, share per grid position.
- value histogram: values are counted by their float16 bit pattern (65536 bins, fixed before the pass; exact for
  float16 stores, float32 stores are counted at float16 resolution, beyond its range as +-inf). As those counts are
  exact (a bincount of the raw 16-bit patterns), the reported 256 uniform bins take their range after the pass: [q(1e-4), q(1 - 1e-4)] of the counted
  values, so a few extreme values do not squeeze the bulk into one bin; values outside go to `below`/`above`.
  Counting costs as much as everything else together, so it counts every k-th image (0, k, 2k, ...), with
  k = max(1, N // 256): all images of an array below 512 images, at least 256 images otherwise (`hist_every=1`:
  all). The 65536 counts are kept too (`f16_counts`) for other binnings.
- optional PCA of the centred (N*(T-1), C) patch-token matrix with dask's out-of-core `svd_compressed`
  (randomized, 2 power iterations). It needs the mean, so it comes after the pass and reads the array 2 + 2 * 2
  more times; it keeps an (N*(T-1), K+10) float64 matrix in (cluster) memory.

Scheduling: tasks of whole storage chunks along the image axis, ~100 MB each (config `stats.task_mb`; full T and
C), fewer rows where that makes under MIN_TASKS tasks; the local threaded scheduler (torch at one intra-op thread
meanwhile), a `distributed.LocalCluster` (`workers=N`) or an existing cluster
(`scheduler=ADDRESS`), set up by featstore._dask. Peak memory is a few tasks plus the (N, T) norms. Inside a task the work runs on cache-sized float64 slices of 32768 values.
The per-block kernels are shipped by value, so workers need numpy, dask and zarr, not featstore (nor torch,
which speeds float16 up in the process that has loaded it: the local pass).
"""
from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from .. import _dask
from ..config import config as settings
from ..devices import one_torch_thread
from ..errors import BadArgumentError
from ..storage import FeatureArray, FeatureStore
from .config import StatsConfig
from .kernels import kernels
from .persist import HIST_QUANTILES, open_for_saving, save_stats

HIST_BINS = 256
HIST_IMAGES = 256  # the histogram counts every k-th image, k = max(1, N // 256): all images of a small array
PCA_OVERSAMPLES = 10
MIN_TASKS = 8  # the pass makes at least this many tasks where the array has that many storage units
_MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian times this is its sigma


# ---- the pass ---------------------------------------------------------------------------------------------------
def _one_pass(x: da.Array, cls_index: int, shift_patch, shift_cls, hist_every: int, client, progress: bool, desc: str):
    """The single pass: per-block partials, an 8-ary tree merge, and the per-block norms, computed together."""
    from .._progress import tqdm

    block_stats, merge, _ = kernels()
    prefix = f"featstats-{uuid.uuid4().hex[:8]}-block-"
    sp, sc = dask.delayed(shift_patch), dask.delayed(shift_cls)
    starts = np.cumsum((0,) + x.chunks[0][:-1])
    parts = [
        dask.delayed(block_stats, nout=2, pure=False)(
            b, int(s), cls_index, sp, sc, hist_every, dask_key_name=f"{prefix}{i}"
        )
        for i, (b, s) in enumerate(zip(x.to_delayed().ravel(), starts))
    ]
    level = [p[0] for p in parts]
    while len(level) > 1:
        level = [dask.delayed(merge, pure=False)(*level[j : j + 8]) for j in range(0, len(level), 8)]
    norms = [p[1] for p in parts]
    # the kernels' float16 fast path uses torch where this process has loaded it (one_torch_thread loads it), at one
    # intra-op thread: dask's local threads are the parallelism (distributed workers start with OMP_NUM_THREADS=1)
    threads = one_torch_thread() if client is None else contextlib.nullcontext()
    with tqdm(total=len(parts), desc=desc, unit="task", disable=None if progress else True) as bar, threads:
        total, *blocks = _dask.compute([level[0], *norms], client, bar, prefix)
    return total, np.concatenate(blocks, axis=0)


def _balanced_rows(fa: FeatureArray, rows: int) -> int:
    """Rows per task, lowered so that a small array still makes MIN_TASKS tasks (whole storage units): 3 tasks of
    100 MB on 2 threads leave one thread idle for a third of the pass."""
    units = -(-fa.shape[0] // fa.chunk_len)
    return min(rows, fa.chunk_len * max(1, -(-units // MIN_TASKS)))


def _finish(acc: dict, shift: np.ndarray) -> dict[str, np.ndarray]:
    n = max(acc["n"], 1)
    d = acc["sum"] / n
    with np.errstate(invalid="ignore"):  # inf - inf: a channel with inf values gets a nan std, as in numpy
        var = np.maximum(acc["sumsq"] / n - d * d, 0.0)
    return {"mean": shift + d, "std": np.sqrt(var), "min": acc["min"], "max": acc["max"], "count": int(acc["n"])}


def _f16_values() -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)


def histogram_from_f16_counts(counts: np.ndarray, bins: int = HIST_BINS, q=HIST_QUANTILES) -> dict[str, Any]:
    """256 uniform bins over [q_lo, q_hi] quantiles of the values, from the exact 65536-bin float16 histogram.
    Bin rule as numpy's: [e_i, e_i+1), the last bin closed; values outside go to `below`/`above`."""
    counts = np.asarray(counts, dtype=np.int64)
    v = _f16_values()
    nan = np.isnan(v)
    finite = ~nan & np.isfinite(v)
    order = np.argsort(np.where(nan, np.inf, v), kind="stable")
    order = order[~nan[order]]
    cum = np.cumsum(counts[order])
    total = int(cum[-1]) if cum.size else 0
    if total == 0:
        lo, hi = -1.0, 1.0
    else:
        lo = float(v[order[np.searchsorted(cum, q[0] * total, side="left")]])
        hi = float(v[order[min(np.searchsorted(cum, q[1] * total, side="left"), cum.size - 1)]])
        fin = v[finite & (counts > 0)]
        lo = max(lo, float(fin.min())) if fin.size else lo  # quantiles that land on +-inf fall back to finite ends
        hi = min(hi, float(fin.max())) if fin.size else hi
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    inside = finite & (v >= lo) & (v <= hi)
    idx = np.minimum(np.searchsorted(edges, v[inside], side="right") - 1, bins - 1)
    binned = np.bincount(idx, weights=counts[inside], minlength=bins).astype(np.int64)
    return {
        "counts": binned,
        "edges": edges,
        "below": int(counts[~nan & (v < lo)].sum()),
        "above": int(counts[~nan & (v > hi)].sum()),
        "nan": int(counts[nan].sum()),
        "f16_counts": counts,
    }


def _outliers(norms: np.ndarray, patch: np.ndarray, grid: tuple[int, int], z: float) -> dict[str, Any]:
    pn = norms[:, patch]
    if pn.size == 0:
        return {"rule": "no patch tokens", "count": 0, "share": 0.0}
    med = float(np.median(pn))
    mad = float(np.median(np.abs(pn - med)))
    thr = med + z * _MAD_TO_SIGMA * mad
    out = pn > thr
    return {
        "rule": f"patch-token norm > median + {z:g} * 1.4826 * MAD of all patch-token norms",
        "z": float(z),
        "median": med,
        "mad": mad,
        "threshold": thr,
        "count": int(out.sum()),
        "share": float(out.mean()),
        "image_share": float(out.any(axis=1).mean()),
        "position_share": _as_grid(out.mean(axis=0), grid),
    }


def _as_grid(per_position: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    return per_position.reshape(grid) if int(np.prod(grid)) == per_position.size else per_position


def _pca(fa: FeatureArray, mean: np.ndarray, total_var: float, cfg: StatsConfig, client):
    """Top-k principal axes of the centred patch tokens; explained variance with the population convention (/M)."""
    N, T, C = fa.shape
    ci = fa.cls_index
    x = _dask.blocks_of(fa, _dask.task_rows(fa, 8, cfg.task_mb))
    if ci == 0:
        p = x[:, 1:, :]
    elif ci == T - 1:
        p = x[:, :-1, :]
    else:
        p = da.concatenate([x[:, :ci], x[:, ci + 1 :]], axis=1).rechunk({1: -1})
    m = p.reshape(N * (T - 1), C)
    _, _, centre = kernels()
    xc = m.map_blocks(centre, mean=mean, dtype=np.float64)
    _, s, v = da.linalg.svd_compressed(
        xc, cfg.pca, n_power_iter=cfg.pca_power_iter, n_oversamples=PCA_OVERSAMPLES, seed=0, compute=True
    )
    s, v = dask.compute(s, v) if client is None else client.gather(client.compute([s, v]))
    ev = s.astype(np.float64) ** 2 / (N * (T - 1))
    return {
        "components": np.asarray(v, dtype=np.float64),
        "explained_variance": ev,
        "explained_variance_ratio": ev / total_var if total_var > 0 else np.zeros_like(ev),
        "singular_values": np.asarray(s, dtype=np.float64),
        "n_power_iter": cfg.pca_power_iter,
    }


def feature_stats(
    store: str | Path | FeatureStore,
    feature: str,
    subj: str,
    split: str,
    config: StatsConfig | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Per-channel statistics (CLS and patch tokens), token-norm map, outlier tokens, value histogram and
    optionally the top-`pca` principal components of one complete array; saved next to it when `save`. Options
    are the fields of StatsConfig (pca=10, save=False, ...).

    `scheduler`: None (dask's threaded scheduler), "sync", or the ADDRESS of a running dask.distributed scheduler;
    `workers=N` starts a LocalCluster of N single-threaded worker processes for the duration of the call.
    """
    known = {f.name for f in fields(StatsConfig)}
    if set(options) - known:
        raise TypeError(f"feature_stats() got unknown option(s) {', '.join(sorted(set(options) - known))}; "
                        f"options are: {', '.join(sorted(known))}")
    cfg = replace(config or StatsConfig(), **options)
    pca, save, progress, task_mb, hist_every = cfg.pca, cfg.save, cfg.progress, cfg.task_mb, cfg.hist_every
    t0 = time.perf_counter()
    fs = FeatureStore.open(store)
    fa = fs.get(feature, subj, split)
    N, T, C = fa.shape
    if pca < 0 or pca > min(C, N * (T - 1)):
        raise BadArgumentError(f"{pca}: must be between 0 and {min(C, N * (T - 1))}", param="pca")
    if N == 0 or T < 2:
        raise BadArgumentError(f"{fa.path} has shape {fa.shape}: need at least one image and a patch token")
    task_mb = settings.get("stats.task_mb") if task_mb is None else task_mb
    if task_mb <= 0:
        raise BadArgumentError(f"task size {task_mb} MB must be positive")
    hist_every = max(1, N // HIST_IMAGES) if hist_every is None else int(hist_every)
    if hist_every < 1:
        raise BadArgumentError(f"hist_every {hist_every}: must be at least 1")
    fa.require_complete("computing statistics")
    target = open_for_saving(fs, fa) if save else None
    ci = fa.cls_index
    patch = np.array([t for t in range(T) if t != ci])
    grid = fa.grid

    first = np.asarray(fa.read(0)[0], dtype=np.float64)  # the shift: image 0, rounded to the stored dtype
    with np.errstate(over="ignore"):
        shift_patch = np.nan_to_num(first[patch].mean(axis=0).astype(fa.dtype).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    shift_cls = np.nan_to_num(first[ci], nan=0.0, posinf=0.0, neginf=0.0)

    rows = _balanced_rows(fa, _dask.task_rows(fa, fa.dtype.itemsize, task_mb))
    x = _dask.blocks_of(fa, rows)
    with _dask.client(scheduler, workers) as client, _dask.corrupt_chunks_named(fa):
        t1 = time.perf_counter()
        total, norms = _one_pass(x, ci, shift_patch, shift_cls, hist_every, client, progress, f"stats {fa.path}")
        pass_s = time.perf_counter() - t1
        result: dict[str, Any] = {
            "array": fa.path,
            "shape": (N, T, C),
            "dtype": str(fa.dtype),
            "grid": tuple(grid),
            "patch": _finish(total["patch"], shift_patch),
            "cls": _finish(total["cls"], shift_cls),
            "token_norm": _as_grid(norms[:, patch].mean(axis=0), grid),
            "cls_norm": float(norms[:, ci].mean()),
            "hist": histogram_from_f16_counts(total["hist"]) | {"every": hist_every, "images": -(-N // hist_every)},
            "outliers": _outliers(norms, patch, grid, cfg.outlier_z),
        }
        if pca:
            total_var = float(np.sum(result["patch"]["std"] ** 2))
            result["pca"] = _pca(fa, result["patch"]["mean"], total_var, replace(cfg, task_mb=task_mb), client)
    result["timing"] = {
        "pass_s": pass_s,
        "total_s": time.perf_counter() - t0,
        "task_rows": rows,
        "decoded_bytes": int(N * T * C * fa.dtype.itemsize),
    }
    result["saved_to"] = save_stats(*target, result) if target else None
    return result


