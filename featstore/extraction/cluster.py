"""The same extraction as dask tasks on a cluster: `extract(..., workers=N)` or `extract(..., scheduler=ADDRESS)`.

featstore has no scheduler of its own; it rides on dask.distributed. The client prepares the arrays once (creating
them race-free, as a single process would), reads the completion record, cuts the units left into a few contiguous
ranges per worker and submits one task per range. A task reopens the store from its URL or folder (never an open
client object: S3 clients are bound to their process's event loop), takes the backbone from a per-process cache
(built once per worker; one model per GPU through the `GPU` resource), re-reads the completion record and computes
only the units of its range still missing. Every unit is marked done only after its write succeeded, so a range
retried after its worker died skips what that worker finished. Rows never depend on which process computed them,
so the array is bit-identical to a single-process run.

Workers must see the images at the same paths as the client (a shared file system), and the store at the same
folder or URL; S3 credentials come from each worker's environment or from `storage_options`.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import _dask
from .._progress import tqdm
from ..backbones import Backbone
from ..devices import resolve_device
from ..errors import BadArgumentError, ClusterError, FeatstoreError, StoreError, one_line
from ..layout import Subject
from ..storage import FeatureStore
from .config import ExtractConfig
from .images import check_splits
from .launcher import Share, detect_share
from .plan import ExtractResult, SplitPlan
from .precision import check_precision
from .run import fill, interrupted

log = logging.getLogger(__name__)

RANGES_PER_WORKER = 4  # a few tasks per worker: the last ones balance the load, each still reads its images in order
RETRIES = 2  # a task that raised something other than a featstore error (e.g. a dropped S3 connection) runs again


def extract_on_cluster(subject: Subject, subj: str, output_dir: str | Path, cfg: ExtractConfig, *,
                       store: FeatureStore | None = None, scheduler: str | None = None,
                       workers: int | None = None) -> ExtractResult:
    """`extract()` with its units run as dask tasks (called by `extract` when `scheduler` or `workers` is given)."""
    _dask.check_choice(scheduler, workers)
    if isinstance(cfg.backbone, Backbone):
        raise BadArgumentError("a distributed extraction builds the backbone on each worker: pass it by name "
                               "(backbone='dinov2_q', arch=..., weights=...), not as a built Backbone")
    share = detect_share(cfg.shard)
    # built on the client's CPU only for what the arrays are defined by: token shape, layout, weights identity
    bb = cfg.build_backbone()
    checked = check_splits(subject.images, bb.preprocess)  # every image's header, before anything is written
    fs = store or FeatureStore(output_dir, mode="a", storage_options=cfg.storage_options)
    jobs = []
    for split, paths in subject.images.items():
        job = SplitPlan(fs, bb, cfg, subj, split, paths, share, checked[split])
        arrays = job.prepare()
        todo = job.todo(arrays)
        jobs.append((job, arrays, sorted(set().union(*todo.values()))))
    result = ExtractResult(store=fs.location, feature=bb.outputs[0].feature)
    computed: dict[str, int] = {}
    spans: dict[str, tuple[float, float]] = {}
    if any(left for _, _, left in jobs):
        with contextlib.ExitStack() as stack:
            for _, arrays, _ in jobs:  # one writer per share of a local store, as in a single-process run
                for fa in arrays:
                    stack.enter_context(fa.lock((share.k, share.n)))
            client = stack.enter_context(_dask.client(scheduler, workers, local_ok=False, daemon=False,
                                                        resources={"GPU": 1} if cfg.device.startswith("cuda") else None))
            computed, spans = _run_tasks(client, fs, cfg, jobs, share)
    for job, arrays, _ in jobs:
        start, end = spans.get(job.split, (0.0, 0.0))
        result.splits.extend(job.summaries(arrays, computed, end - start))
    return result


def _run_tasks(client, fs: FeatureStore, cfg: ExtractConfig, jobs, share):
    """Submit one task per range, follow them in one bar (rows); returns the rows computed per array and each
    split's own span (its first task's start to its last task's end, as the workers timed them)."""
    import distributed

    n_workers = max(1, len(client.scheduler_info()["workers"]))
    gpu_workers = [w for w in client.scheduler_info()["workers"].values() if w.get("resources", {}).get("GPU")]
    resources = {"GPU": 1} if cfg.device.startswith("cuda") and gpu_workers else None
    task_cfg = replace(cfg, progress=False, overwrite=False)
    futures, meta = [], {}
    for job, arrays, left in jobs:
        if not left:
            continue
        spec = [(fa.feature, fa.uid) for fa in arrays]
        for units in np.array_split(np.asarray(left), min(len(left), n_workers * RANGES_PER_WORKER)):
            units = [int(u) for u in units]
            rows = sum(b - a for a, b in map(arrays[0].chunk_range, units))
            fut = client.submit(_fill_range, fs.source, fs.storage_options, task_cfg, job.subj, job.split,
                                job.paths, share, spec, units, retries=RETRIES, pure=False, resources=resources,
                                key=f"featstore-{job.split}-{units[0]}-{units[-1]}-{os.urandom(4).hex()}")
            futures.append(fut)
            meta[fut.key] = (job.split, units, rows, arrays[0].unit)
    computed: dict[str, int] = {}
    spans: dict[str, tuple[float, float]] = {}
    bar = tqdm(total=sum(m[2] for m in meta.values()), desc=f"{jobs[0][0].subj}: {len(futures)} tasks on "
               f"{n_workers} workers", unit="img", disable=not cfg.progress, smoothing=0.1)
    try:
        for fut in distributed.as_completed(futures, loop=client.loop):
            split, units, rows, unit = meta[fut.key]
            try:
                out = fut.result()
            except Exception as e:  # noqa: BLE001 - retries spent, or workers kept dying under it (KilledWorker)
                raise ClusterError(
                    f"{split}: the task for {unit}s {units[0]}-{units[-1]} failed on the cluster ({one_line(e)}); "
                    f"{unit}s finished before are kept; rerun the same command to resume"
                ) from None
            if "error" in out:
                raise out["error"]
            for path, n in out["computed"].items():
                computed[path] = computed.get(path, 0) + n
            start, end = spans.get(split, (out["started"], out["ended"]))
            spans[split] = (min(start, out["started"]), max(end, out["ended"]))
            bar.update(rows)
    except KeyboardInterrupt as e:
        client.cancel(futures)
        raise interrupted([fa for _, arrays, _ in jobs for fa in arrays], e) from None
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
    return computed, spans


# ---- on the workers ------------------------------------------------------------------------------------------------
_models: dict[tuple, tuple[Backbone, Any]] = {}
_models_lock = threading.Lock()


def _fill_range(source, storage_options, cfg: ExtractConfig, subj: str, split: str, paths: list[Path],
                share: Share, spec: list[tuple[str, str]], units: list[int]) -> dict[str, Any]:
    """One task: compute the units of `units` still missing. featstore errors come back as data (a user mistake
    such as a corrupt image is not retried); anything else raises, and dask retries the task. The task times itself
    with the wall clock (comparable across the cluster's processes), so each split reports its own time."""
    started = time.time()
    try:
        bb, dev = _worker_backbone(cfg)
        check_precision(cfg.precision, dev)  # the worker's own device decides
        if cfg.num_workers > 0 and multiprocessing.current_process().daemon:
            log.warning("dask worker processes are daemonic: decoding images in the task (set "
                        "distributed.worker.daemon: false to use --num_workers %d)", cfg.num_workers)
            cfg = replace(cfg, num_workers=0)
        fs = FeatureStore(source, mode="a", storage_options=storage_options)
        job = SplitPlan(fs, bb, cfg, subj, split, paths, share)
        # dask workers default to spawn, which would import torch in every loader worker of every task; the loader
        # workers only decode images, with one torch thread (set by torch), so fork is safe and instant
        context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        arrays = []
        for feature, uid in spec:
            fa = fs.get(feature, subj, split)
            if fa.uid != uid:
                raise StoreError(f"{fa.path} in {fs.location} was replaced while this extraction ran (--overwrite "
                                 "elsewhere?); rerun the command")
            arrays.append(fa)
        computed = fill(job, arrays, job.todo(arrays, units), dev, context)
        return {"computed": computed, "started": started, "ended": time.time()}
    except FeatstoreError as e:
        return {"error": e}


def _worker_backbone(cfg: ExtractConfig) -> tuple[Backbone, Any]:
    """This process's model for `cfg`, built on first use and kept (one at a time: a new config replaces it). With
    `cuda`, a LocalCluster's integer-named worker drives GPU `name % count` (devices.resolve_device)."""
    key = (str(cfg.backbone), str(cfg.enc_layer), cfg.weights, cfg.arch, cfg.seed, cfg.image_size, cfg.device)
    with _models_lock:
        if key not in _models:
            _models.clear()
            dev = resolve_device(cfg.device, worker_index=_worker_index())
            _models[key] = (cfg.build_backbone().to(dev), dev)
        return _models[key]


def _worker_index() -> int | None:
    try:
        import distributed

        name = distributed.get_worker().name
    except (ImportError, ValueError):  # not on a dask worker
        return None
    return name if isinstance(name, int) else None


__all__ = ["extract_on_cluster"]
