"""Statistics of one stored feature array, in one dask pass over its chunks.

What is computed (`feature_stats`), separately for the CLS token and for the patch tokens (every other token):
- per-channel mean, population std (ddof=0), min and max over (image, token). Values are converted exactly to
  float64 and summed in float64 after subtracting a per-channel shift (image 0's patch mean rounded to the stored
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
  exact, the reported 256 uniform bins take their range after the pass: [q(1e-4), q(1 - 1e-4)] of the counted
  values, so a few extreme values do not squeeze the bulk into one bin; values outside go to `below`/`above`.
  Counting costs as much as everything else together, so it counts every k-th image (0, k, 2k, ...), with
  k = max(1, N // 256): all images of an array below 512 images, at least 256 images otherwise (`hist_every=1`:
  all). The 65536 counts are kept too (`f16_counts`) for other binnings.
- optional PCA of the centred (N*(T-1), C) patch-token matrix with dask's out-of-core `svd_compressed`
  (randomized, 2 power iterations). It needs the mean, so it comes after the pass and reads the array 2 + 2 * 2
  more times; it keeps an (N*(T-1), K+10) float64 matrix in (cluster) memory.

Scheduling: tasks of whole storage chunks along the image axis, ~100 MB each (full T and C); the local threaded
scheduler, a `distributed.LocalCluster` (`workers=N`) or an existing cluster (`scheduler=ADDRESS`). Peak memory is
a few tasks plus the (N, T) norms. Inside a task the work runs on cache-sized float64 slices of 64 tokens. The
per-block kernels are shipped by value, so workers need numpy, dask and zarr, not featstore (nor torch).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.callbacks import Callback

from .errors import BadArgumentError, CorruptChunkError, FeatstoreError, NotFoundInStoreError, StoreError, one_line
from .store import FeatureArray, FeatureStore

TASK_MB = 100  # decoded bytes per dask task (whole storage chunks along the image axis)
SLICE_TOKENS = 64  # tokens per float64 working slice inside a task: 64 x 768 x 8 B = 393 kB stays in L2
OUTLIER_Z = 6.0
HIST_BINS = 256
HIST_IMAGES = 256  # the histogram counts every k-th image, k = max(1, N // 256): all images of a small array
HIST_QUANTILES = (1e-4, 1.0 - 1e-4)
PCA_POWER_ITER = 2
PCA_OVERSAMPLES = 10
_LOCAL_SCHEDULERS = ("threads", "sync", "synchronous", "single-threaded")
_MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian times this is its sigma


# ---- per-block kernels (run on dask workers) -------------------------------------------------------------------
@functools.cache
def _kernels():
    """The functions dask runs per block. They are closures, so (cloud)pickle ships them by value: a worker
    process never imports featstore (or what featstore imports) just to run them. They use numpy only."""
    import numpy as np

    # float16 -> float64 without numpy's half conversion (slow: it made up half of the kernel's time): sign-extend
    # the bits to int64, move the 15 exponent+mantissa bits to where float64 keeps its own, clear the copies of the
    # sign the extension left between them, and rescale by 2**(1023-15). Exact for every finite float16, subnormals
    # included; inf/nan come out as finite values >= 65536 (> float16 max), which the min/max check catches.
    keep = np.int64(0x81FF_FFFF_FFFF_FFFF - (1 << 64))  # sign bit 63 + bits 0..56
    rescale = np.float64(2.0**1008)

    def to_f64(a, out):
        """(k, C) float16 -> `out` (k, C) float64, exact for finite values."""
        bits = out.view(np.int64)
        np.copyto(bits, a.view(np.int16))
        np.left_shift(bits, 42, out=bits)
        np.bitwise_and(bits, keep, out=bits)
        np.multiply(out, rescale, out=out)
        return out

    def patch_pass(block, cls_index, shift, S, exact):
        """Patch-token partials of one block: min, max, sums and sums of squares of x - shift, and |x|^2.
        `exact` converts with numpy (slow, keeps inf/nan); otherwise to_f64."""
        n, T, C = block.shape
        slices = [(t, min(t + S, stop)) for start, stop in ((0, cls_index), (cls_index + 1, T)) for t in range(start, stop, S)]
        x_buf, q_buf = np.empty((S, C)), np.empty((S, C))
        ones_t, ones_c = np.ones(S), np.ones(C)
        rows = np.empty((4, len(slices), C))  # per slice of one image: min, max, sum, sum of squares
        per_image = np.empty((4, n, C))
        norms = np.empty((n, T))
        s2 = 2.0 * shift
        for i in range(n):
            sample = block[i]
            for j, (t0, t1) in enumerate(slices):
                k = t1 - t0
                x, q = x_buf[:k], q_buf[:k]  # cache-sized slices: everything below runs in L2
                if exact:
                    np.copyto(x, sample[t0:t1])
                else:
                    to_f64(sample[t0:t1], x)
                np.minimum.reduce(x, axis=0, out=rows[0, j])
                np.maximum.reduce(x, axis=0, out=rows[1, j])
                np.subtract(x, shift, out=x)
                np.multiply(x, x, out=q)
                np.matmul(ones_t[:k], x, out=rows[2, j])  # BLAS matrix-vector products: float64, faster than reduce
                np.matmul(ones_t[:k], q, out=rows[3, j])
                nrm = norms[i, t0:t1]
                np.matmul(q, ones_c, out=nrm)  # |x|^2 = |d|^2 + 2 d.s + |s|^2 with d = x - s (|s|^2 added below)
                nrm += x @ s2
            np.minimum.reduce(rows[0], axis=0, out=per_image[0, i])
            np.maximum.reduce(rows[1], axis=0, out=per_image[1, i])
            np.add.reduce(rows[2:], axis=1, out=per_image[2:, i])
        norms += shift @ shift
        return per_image[0].min(axis=0), per_image[1].max(axis=0), per_image[2].sum(axis=0), per_image[3].sum(axis=0), norms

    def block_stats(block, start, cls_index, shift_patch, shift_cls, slice_tokens, hist_every):
        """One (n, T, C) block (images start, start+1, ...) -> (partial sums, (n, T) token norms)."""
        block = np.asarray(block)
        n, T, _ = block.shape
        f16 = block.dtype == np.float16
        hist = np.zeros(65536, np.int64)
        for i in range(-start % hist_every, n, hist_every):  # images whose index is a multiple of hist_every
            if f16:
                codes = block[i].view(np.uint16)
            else:
                with np.errstate(over="ignore"):
                    codes = block[i].astype(np.float16).view(np.uint16)
            hist += np.bincount(codes.ravel(), minlength=65536)
        lo, hi, s1, s2, norms = patch_pass(block, cls_index, shift_patch, slice_tokens, exact=not f16)
        if f16 and (hi.max() >= 65536.0 or lo.min() <= -65536.0):  # inf/nan in the block: numpy's conversion
            with np.errstate(invalid="ignore", over="ignore"):  # they propagate into the statistics, as in numpy
                lo, hi, s1, s2, norms = patch_pass(block, cls_index, shift_patch, slice_tokens, exact=True)
        p = {"n": n * (T - 1), "sum": s1, "sumsq": s2, "min": lo, "max": hi}
        xc = block[:, cls_index, :].astype(np.float64)
        norms[:, cls_index] = np.einsum("nc,nc->n", xc, xc)
        np.sqrt(np.maximum(norms, 0.0, out=norms), out=norms)
        c = {"n": n, "min": xc.min(axis=0), "max": xc.max(axis=0)}
        xc -= shift_cls
        c["sum"], c["sumsq"] = xc.sum(axis=0), np.einsum("nc,nc->c", xc, xc)
        return {"patch": p, "cls": c, "hist": hist}, norms

    def merge(*parts):
        out = {"hist": sum(q["hist"] for q in parts)}
        for part in ("patch", "cls"):
            accs = [q[part] for q in parts]
            out[part] = {
                "n": sum(a["n"] for a in accs),
                "sum": sum(a["sum"] for a in accs),
                "sumsq": sum(a["sumsq"] for a in accs),
                "min": np.minimum.reduce([a["min"] for a in accs]),
                "max": np.maximum.reduce([a["max"] for a in accs]),
            }
        return out

    def centre(block, mean):
        """(rows, C) block -> float64 block minus the channel means (for the PCA)."""
        out = np.empty(block.shape)
        if block.dtype == np.float16 and np.isfinite(block).all():
            to_f64(block, out)
        else:
            np.copyto(out, block)
        out -= mean
        return out

    def read_rows(z, index, unit, tag):
        """dask's getter: the rows of one task, one storage unit per zarr read, so a unit that fails to decode is
        named (ValueError starting with `tag` + its index) and no sibling reads are left pending inside zarr."""
        rows, rest = index[0], tuple(index[1:])
        start, stop = rows.start or 0, z.shape[0] if rows.stop is None else rows.stop
        parts = []
        for u0 in range(start - start % unit, stop, unit):
            try:
                parts.append(z[(slice(max(start, u0), min(stop, u0 + unit)), *rest)])
            except (ValueError, RuntimeError) as e:  # codec errors: checksum mismatch, undecodable bytes
                raise ValueError(f"{tag}{u0 // unit}: {e}") from None
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    return block_stats, merge, centre, read_rows


# ---- the pass ---------------------------------------------------------------------------------------------------
def _task_rows(fa: FeatureArray, bytes_per_value: int, task_mb: float) -> int:
    """Rows per dask task: a whole multiple of the storage chunk, about task_mb of decoded data."""
    per_row = fa.shape[1] * fa.shape[2] * bytes_per_value
    k = max(1, int(task_mb * 1e6 // (per_row * fa.chunk_len)))
    return min(k * fa.chunk_len, max(fa.shape[0], 1))


def require_distributed():
    """dask.distributed, or a one-line error saying how to install it (shared with distributed.py)."""
    try:
        import distributed
    except ImportError:
        raise BadArgumentError(
            "--workers/--scheduler need dask.distributed, which is not installed: pip install 'featstore[distributed]'"
        ) from None
    return distributed


def connect(address: str):
    """A Client of the running cluster at `address` (shared with distributed.py), or a one-line error. Used
    explicitly, never made the process default: a failed connection would leave dask's global scheduler on it."""
    distributed = require_distributed()
    try:
        return distributed.Client(address, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        raise BadArgumentError(f"cannot connect to the dask scheduler at {address}: {one_line(e)}") from None


@contextlib.contextmanager
def _scheduler(scheduler: str | None, workers: int | None):
    """Yields a distributed Client (used explicitly, see `connect`), or None for dask's local schedulers (set for the
    duration)."""
    if scheduler is not None and workers is not None:
        raise BadArgumentError("give either --scheduler ADDRESS or --workers N, not both")
    if workers is None and (scheduler is None or scheduler in _LOCAL_SCHEDULERS):
        with dask.config.set(scheduler=scheduler or "threads"):
            yield None
        return
    require_distributed()
    if workers is not None:
        if workers < 1:
            raise BadArgumentError(f"--workers {workers}: need at least 1")
        with local_cluster(workers) as client:
            yield client
        return
    with connect(scheduler) as client:
        yield client


@contextlib.contextmanager
def local_cluster(workers: int, config: dict | None = None, **kwargs):
    """A Client of a LocalCluster of `workers` single-threaded processes, used explicitly (see `connect`). Its
    scratch space (dask's `temporary-directory`, where workers keep dask-scratch-space/) is a folder of its own,
    removed when the cluster closes, so a run leaves nothing in the temporary directory."""
    distributed = require_distributed()
    with tempfile.TemporaryDirectory(prefix="featstore-dask-") as scratch, dask.config.set(
        {"temporary-directory": scratch, **(config or {})}
    ), distributed.LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=logging.CRITICAL,  # a failing task reaches the caller as its exception: one line
        **kwargs,
    ) as cluster, distributed.Client(cluster, set_as_default=False) as client:
        yield client


class _TaskProgress(Callback):
    """tqdm bar over the block tasks of the local schedulers."""

    def __init__(self, bar, prefix: str):
        super().__init__()
        self.bar, self.prefix = bar, prefix

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(key, str) and key.startswith(self.prefix):
            self.bar.update(1)


def _one_pass(x: da.Array, cls_index: int, shift_patch, shift_cls, hist_every: int, client, progress: bool, desc: str):
    """The single pass: per-block partials, an 8-ary tree merge, and the per-block norms, computed together."""
    from ._progress import tqdm

    block_stats, merge, _, _ = _kernels()
    prefix = f"featstats-{uuid.uuid4().hex[:8]}-block-"
    sp, sc = dask.delayed(shift_patch), dask.delayed(shift_cls)
    starts = np.cumsum((0,) + x.chunks[0][:-1])
    parts = [
        dask.delayed(block_stats, nout=2, pure=False)(
            b, int(s), cls_index, sp, sc, SLICE_TOKENS, hist_every, dask_key_name=f"{prefix}{i}"
        )
        for i, (b, s) in enumerate(zip(x.to_delayed().ravel(), starts))
    ]
    level = [p[0] for p in parts]
    while len(level) > 1:
        level = [dask.delayed(merge, pure=False)(*level[j : j + 8]) for j in range(0, len(level), 8)]
    norms = [p[1] for p in parts]
    with tqdm(total=len(parts), desc=desc, unit="task", disable=None if progress else True) as bar:
        if client is None:
            with _TaskProgress(bar, prefix):
                total, blocks = dask.compute(level[0], norms)
        else:
            import distributed

            futures = client.compute([level[0], *norms])
            for _ in distributed.as_completed(futures[1:], loop=client.loop):
                bar.update(1)
            total, *blocks = client.gather(futures)
    return total, np.concatenate(blocks, axis=0)


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


def _pca(fa: FeatureArray, k: int, mean: np.ndarray, total_var: float, task_mb: float, power_iter: int, client):
    """Top-k principal axes of the centred patch tokens; explained variance with the population convention (/M)."""
    N, T, C = fa.shape
    ci = fa.cls_index
    x = _dask_array(fa, _task_rows(fa, 8, task_mb))
    if ci == 0:
        p = x[:, 1:, :]
    elif ci == T - 1:
        p = x[:, :-1, :]
    else:
        p = da.concatenate([x[:, :ci], x[:, ci + 1 :]], axis=1).rechunk({1: -1})
    m = p.reshape(N * (T - 1), C)
    _, _, centre, _ = _kernels()
    xc = m.map_blocks(centre, mean=mean, dtype=np.float64)
    _, s, v = da.linalg.svd_compressed(
        xc, k, n_power_iter=power_iter, n_oversamples=PCA_OVERSAMPLES, seed=0, compute=True
    )
    s, v = dask.compute(s, v) if client is None else client.gather(client.compute([s, v]))
    ev = s.astype(np.float64) ** 2 / (N * (T - 1))
    return {
        "components": np.asarray(v, dtype=np.float64),
        "explained_variance": ev,
        "explained_variance_ratio": ev / total_var if total_var > 0 else np.zeros_like(ev),
        "singular_values": np.asarray(s, dtype=np.float64),
        "n_power_iter": power_iter,
    }


_CORRUPT_TAG = "featstore-corrupt-unit "


def _dask_array(fa: FeatureArray, rows: int) -> da.Array:
    """The stored array as dask blocks of `rows` (whole storage units), read by `read_rows` (zarr + numpy only)."""
    read_rows = functools.partial(_kernels()[3], unit=fa.chunk_len, tag=_CORRUPT_TAG)
    name = f"featstore-read-{fa.path.replace('/', '-')}-{fa.uid or 'v0'}-{rows}"
    return da.from_array(fa.zarr, chunks=(rows, *fa.shape[1:]), name=name, getitem=read_rows, asarray=False)


@contextlib.contextmanager
def _corrupt_chunks_named(fa: FeatureArray):
    """A unit that failed to decode inside a dask task becomes the store's one-line CorruptChunkError: re-reading
    that one unit here raises it with the array, the chunk and the repair command."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        if not text.startswith(_CORRUPT_TAG):
            raise
        unit = int(text[len(_CORRUPT_TAG):].split(":", 1)[0])
        fa.read(*fa.chunk_range(unit))  # raises CorruptChunkError
        raise CorruptChunkError(  # the unit read back fine here (a transient fault): still one line
            f"{fa.path}: {fa.unit} {unit} failed to decode ({text.split(': ', 1)[-1].splitlines()[0]}); "
            f"run `featstore verify {fa.store.location}`"
        ) from None


def _open(store) -> FeatureStore:
    return store if isinstance(store, FeatureStore) else FeatureStore(store, mode="r")


def feature_stats(
    store: str | Path | FeatureStore,
    feature: str,
    subj: str,
    split: str,
    *,
    pca: int = 0,
    scheduler: str | None = None,
    workers: int | None = None,
    save: bool = True,
    progress: bool = False,
    task_mb: float = TASK_MB,
    outlier_z: float = OUTLIER_Z,
    pca_power_iter: int = PCA_POWER_ITER,
    hist_every: int | None = None,
) -> dict[str, Any]:
    """Per-channel statistics (CLS and patch tokens), token-norm map, outlier tokens, value histogram and
    optionally the top-`pca` principal components of one complete array; saved next to it when `save`.

    `scheduler`: None (dask's threaded scheduler), "sync", or the ADDRESS of a running dask.distributed scheduler;
    `workers=N` starts a LocalCluster of N single-threaded worker processes for the duration of the call.
    """
    t0 = time.perf_counter()
    fs = _open(store)
    fa = fs.get(feature, subj, split)
    N, T, C = fa.shape
    if pca < 0 or pca > min(C, N * (T - 1)):
        raise BadArgumentError(f"--pca {pca}: must be between 0 and {min(C, N * (T - 1))}")
    if N == 0 or T < 2:
        raise BadArgumentError(f"{fa.path} has shape {fa.shape}: need at least one image and a patch token")
    if task_mb <= 0:
        raise BadArgumentError(f"task size {task_mb} MB must be positive")
    hist_every = max(1, N // HIST_IMAGES) if hist_every is None else int(hist_every)
    if hist_every < 1:
        raise BadArgumentError(f"hist_every {hist_every}: must be at least 1")
    fa.require_complete("computing statistics")
    target = _open_for_saving(fs, fa) if save else None
    ci = fa.cls_index
    patch = np.array([t for t in range(T) if t != ci])
    grid = fa.grid

    first = np.asarray(fa.read(0)[0], dtype=np.float64)  # the shift: image 0, rounded to the stored dtype
    with np.errstate(over="ignore"):
        shift_patch = np.nan_to_num(first[patch].mean(axis=0).astype(fa.dtype).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    shift_cls = np.nan_to_num(first[ci], nan=0.0, posinf=0.0, neginf=0.0)

    rows = _task_rows(fa, fa.dtype.itemsize, task_mb)
    x = _dask_array(fa, rows)
    with _scheduler(scheduler, workers) as client, _corrupt_chunks_named(fa):
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
            "outliers": _outliers(norms, patch, grid, outlier_z),
        }
        if pca:
            total_var = float(np.sum(result["patch"]["std"] ** 2))
            result["pca"] = _pca(fa, pca, result["patch"]["mean"], total_var, task_mb, pca_power_iter, client)
    result["timing"] = {
        "pass_s": pass_s,
        "total_s": time.perf_counter() - t0,
        "task_rows": rows,
        "decoded_bytes": int(N * T * C * fa.dtype.itemsize),
    }
    result["saved_to"] = _save(*target, result) if target else None
    return result


# ---- saving and loading -------------------------------------------------------------------------------------------
_PARTS = ("patch", "cls")
_FIELDS = ("mean", "std", "min", "max")
_PCA_FIELDS = ("components", "explained_variance", "explained_variance_ratio", "singular_values")
_HIST_SCALARS = ("below", "above", "nan", "every", "images")


_NO_SAVE_HINT = "rerun with --no_save (save=False) to compute them without saving"


def _open_for_saving(fs: FeatureStore, fa: FeatureArray) -> tuple[FeatureStore, FeatureArray]:
    """The store opened for writing the results, checked before the pass: a read-only store fails at once."""
    if fs.local_root is not None and not os.access(fs.local_root, os.W_OK | os.X_OK):
        raise StoreError(f"cannot save the statistics: the store {fs.location} is not writable; {_NO_SAVE_HINT}")
    if not fs.read_only:
        return fs, fa
    try:
        wfs = fs.reopen("a")
    except FeatstoreError as e:
        reason = str(e).split(": ", 1)[-1] if str(e).startswith("--") else str(e)  # not the extract's flag name
        raise StoreError(f"cannot save the statistics into the store {fs.location} ({reason}); {_NO_SAVE_HINT}") from None
    return wfs, wfs.get(fa.feature, fa.subj, fa.split)


def _save(fs: FeatureStore, fa: FeatureArray, r: dict[str, Any]) -> str:
    arrays: dict[str, np.ndarray] = {f"{p}_{f}": r[p][f] for p in _PARTS for f in _FIELDS}
    arrays.update(
        token_norm=r["token_norm"],
        cls_norm=np.float64(r["cls_norm"]),
        hist_counts=r["hist"]["counts"],
        hist_edges=r["hist"]["edges"],
        hist_f16_counts=r["hist"]["f16_counts"],
    )
    if "position_share" in r["outliers"]:
        arrays["outlier_position_share"] = r["outliers"]["position_share"]
    for f in _PCA_FIELDS if "pca" in r else ():
        arrays[f"pca_{f}"] = r["pca"][f]
    attrs = {
        "kind": "featstore.stats",
        "shape": list(r["shape"]),
        "dtype": r["dtype"],
        "grid": list(r["grid"]),
        "counts": {p: r[p]["count"] for p in _PARTS},
        "hist": {k: r["hist"][k] for k in _HIST_SCALARS} | {"quantiles": list(HIST_QUANTILES)},
        "outliers": {k: v for k, v in r["outliers"].items() if k != "position_share"},
        "pca": {"k": len(r["pca"]["singular_values"]), "n_power_iter": r["pca"]["n_power_iter"]} if "pca" in r else None,
        "timing": r["timing"],
    }
    try:
        fs.save_stats(fa, arrays, attrs)
    except OSError as e:
        raise StoreError(f"cannot save the statistics into the store {fs.location} ({e}); {_NO_SAVE_HINT}") from None
    return f"{fs.location}/{fa.path}_stats"


def load_feature_stats(store: str | Path | FeatureStore, feature: str, subj: str, split: str) -> dict[str, Any]:
    """The saved result of `feature_stats` (same structure, without timing), or NotFoundInStoreError."""
    fs = _open(store)
    fa = fs.get(feature, subj, split)
    raw = fs.load_stats(fa)
    if raw is None or raw.get("attrs", {}).get("kind") != "featstore.stats":
        raise NotFoundInStoreError(
            f"no statistics saved for {fa.path} (or the array changed since); run: featstore stats {fs.location} "
            f"--feature {feature} --subj {subj} --split {split}"
        )
    a = raw["attrs"]
    r: dict[str, Any] = {"array": fa.path, "shape": tuple(a["shape"]), "dtype": a["dtype"], "grid": tuple(a["grid"])}
    for p in _PARTS:
        r[p] = {f: raw[f"{p}_{f}"] for f in _FIELDS} | {"count": a["counts"][p]}
    r["token_norm"] = raw["token_norm"]
    r["cls_norm"] = float(raw["cls_norm"][0])
    r["hist"] = {"counts": raw["hist_counts"], "edges": raw["hist_edges"], "f16_counts": raw["hist_f16_counts"]}
    r["hist"].update({k: a["hist"][k] for k in _HIST_SCALARS})
    r["outliers"] = dict(a["outliers"])
    if "outlier_position_share" in raw:
        r["outliers"]["position_share"] = raw["outlier_position_share"]
    if a.get("pca"):
        r["pca"] = {f: raw[f"pca_{f}"] for f in _PCA_FIELDS} | {"n_power_iter": a["pca"]["n_power_iter"]}
    r["timing"] = a.get("timing")
    r["saved_to"] = f"{fs.location}/{fa.path}_stats"
    return r
