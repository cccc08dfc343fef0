"""Filling one split on one process: image-loader workers -> backbone -> background writer -> store.

One forward pass per batch yields every requested (variant, layer); each array receives only the units it lacks
(writer.py assembles and writes them). torch is imported only here, inside the functions that run the model.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._progress import tqdm
from ..devices import one_torch_thread
from ..errors import CorruptImageError, Float16OverflowError, Interrupted, Terminated
from ..storage import FeatureArray
from .images import ImageFiles, collate, quiet_worker
from .plan import SplitPlan, SplitSummary
from .precision import autocast, error_line, no_tf32, precision_error
from .writer import BackgroundWriter, ChunkAssembler

if TYPE_CHECKING:
    import torch

    from .config import ExtractConfig

log = logging.getLogger(__name__)

WRITER_LANES = 4  # arrays written at once (each lane's chunk files share the I/O pool's threads)


def run_split(plan: SplitPlan, dev: torch.device) -> list[SplitSummary]:
    """Fill what the split's arrays lack among this process's share of the units, holding each array's writer lock
    for the share (a second process on the same share is refused)."""
    t0 = time.perf_counter()
    arrays = plan.prepare()
    locks = [fa.lock((plan.share.k, plan.share.n)).acquire() for fa in arrays]
    try:
        todo = plan.todo(arrays)
        plan.check_space(arrays, todo)
        computed = fill(plan, arrays, todo, dev)
    finally:
        for lk in locks:
            lk.release()
    return plan.summaries(arrays, computed, time.perf_counter() - t0)


def fill(plan: SplitPlan, arrays: list[FeatureArray], todo: dict[str, list[int]], dev: torch.device,
         loader_context: str | None = None) -> dict[str, int]:
    """Compute and write the `todo` units (after removing stray temp files of exactly those units); returns the
    rows computed per array. `loader_context`: start method of the image-decoding workers (None: torch's)."""
    for fa in arrays:
        if todo[fa.path]:
            removed = fa.clean_partials(todo[fa.path])
            if removed:
                log.info("%s: removed %d stray temporary files from an interrupted run", fa.path, removed)
    return _compute(plan, arrays, todo, dev, loader_context) if any(todo.values()) else {}


def interrupted(arrays: list[FeatureArray], exc: BaseException) -> Interrupted:
    """The one-line report of a stopped run (Ctrl-C: 130, SIGTERM: 143): what is done, and how to go on."""
    state = ", ".join(f"{fa.progress()} of {fa.path}" for fa in arrays)
    code = 143 if isinstance(exc, Terminated) else 130
    return Interrupted(f"interrupted: {state} are done; rerun the same command to resume", exit_code=code)


def _rows_needed(arrays: list[FeatureArray], todo: dict[str, list[int]]) -> dict[str, np.ndarray]:
    need = {fa.path: np.zeros(fa.shape[0], dtype=bool) for fa in arrays}
    for fa in arrays:
        for c in todo[fa.path]:
            need[fa.path][slice(*fa.chunk_range(c))] = True
    return need


def _loader(plan: SplitPlan, indices: list[int], dev: torch.device, context: str | None):
    from torch.utils.data import DataLoader

    cfg, workers = plan.cfg, plan.cfg.num_workers
    return DataLoader(
        ImageFiles(plan.paths, indices, plan.bb.preprocess, plan.input_hw),
        batch_size=cfg.batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=dev.type == "cuda", prefetch_factor=2 if workers > 0 else None,
        worker_init_fn=quiet_worker if workers > 0 else None, multiprocessing_context=context if workers > 0 else None,
    )


def _forward(plan: SplitPlan, loader, dev: torch.device,
             unmeasured: list[FeatureArray]) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """(image indices, {feature: tokens}) per batch: one forward pass serves every output, in cfg.precision. The
    first batch of a half-precision run is also computed in float32 when an array (`unmeasured`) has no recorded
    error yet: one extra forward pass, whose difference goes to those arrays' provenance."""
    import torch

    precision = plan.cfg.precision
    for idx, x, errors in loader:
        if errors:
            raise CorruptImageError(errors[0])
        x = x.to(dev, non_blocking=True)
        with torch.inference_mode():
            with autocast(precision, dev):
                ys = plan.bb.forward_features(x)
            if unmeasured:
                _record_error(unmeasured, ys, plan.bb.forward_features(x), plan.cfg, dev)
                unmeasured = []
        yield np.asarray(idx), ys


def _record_error(arrays: list[FeatureArray], ys: dict, ref: dict, cfg: ExtractConfig, dev: torch.device) -> None:
    import torch

    stored = torch.float16 if cfg.dtype == "float16" else torch.float32
    errors = precision_error(ys, ref, stored, cfg.precision, dev)
    for fa in arrays:
        fa.add_provenance({"precision_error": errors[fa.feature]})
        log.info("%s", error_line(fa.path, errors[fa.feature]))


def _compute(plan: SplitPlan, arrays: list[FeatureArray], todo: dict[str, list[int]], dev: torch.device,
             context: str | None) -> dict[str, int]:
    need = _rows_needed(arrays, todo)
    indices = [int(i) for i in np.flatnonzero(np.logical_or.reduce(list(need.values())))]
    loader = _loader(plan, indices, dev, context)
    single = len(arrays) == 1
    desc = arrays[0].path if single else f"{plan.subj}/{plan.split}: {len(arrays)} arrays"
    bar = tqdm(total=int(sum(n.sum() for n in need.values())), desc=desc, unit="img" if single else "row",
               disable=not plan.cfg.progress, smoothing=0.1)
    unmeasured = [] if plan.cfg.precision == "float32" else [
        fa for fa in arrays if todo[fa.path] and "precision_error" not in fa.meta]
    try:
        with no_tf32(dev):
            return write_batches(arrays, todo, _forward(plan, loader, dev, unmeasured), plan.cfg,
                                 on_written=bar.update, names=plan.paths)
    finally:
        bar.close()


def write_batches(arrays: list[FeatureArray], todo: dict[str, list[int]],
                  batches: Iterable[tuple[np.ndarray, Mapping[str, torch.Tensor]]], cfg: ExtractConfig,
                  on_written: Callable[[int], object] | None = None, names: Sequence | None = None) -> dict[str, int]:
    """What extraction does after the forward pass, for any stream of computed batches: `batches` yields (row
    indices, {feature: (B, T, C) tensor}); each array takes the rows its `todo` units hold, converted to cfg.dtype
    (a float16 overflow is an error naming `names[row]`), assembled into whole units and written by the background
    writer (cfg.durable, at most cfg.queue_mb queued). Returns the rows written per array; Ctrl-C writes what was
    computed, then raises Interrupted."""
    import torch

    need = _rows_needed(arrays, todo)
    tdtype = torch.float16 if cfg.dtype == "float16" else torch.float32
    assemblers = {fa.path: ChunkAssembler(fa, todo[fa.path]) for fa in arrays}
    writer = BackgroundWriter(cfg.durable, cfg.queue_mb << 20, on_written=on_written,
                              lanes=min(len(arrays), WRITER_LANES))
    computed = dict.fromkeys(need, 0)
    try:
        for idx, ys in batches:
            idx_arr = np.asarray(idx)
            sels = {fa.path: need[fa.path][idx_arr] for fa in arrays}
            with torch.inference_mode(), one_torch_thread():  # every output of the batch first, then the queue
                stored = [(fa, _stored_rows(fa, ys[fa.feature], sels[fa.path], idx_arr, tdtype, names))
                          for fa in arrays if sels[fa.path].any()]
            for fa, rows in stored:
                for first, data in assemblers[fa.path].add(rows):
                    writer.put(fa, first, data)
                computed[fa.path] += len(rows)
    except KeyboardInterrupt as e:
        writer.close()  # the rows already computed are written: nothing finished is lost
        raise interrupted(arrays, e) from None
    except BaseException:
        writer.close()
        writer.check()
        raise
    writer.close()
    writer.check()
    return computed


def _stored_rows(fa: FeatureArray, y: torch.Tensor, sel: np.ndarray, idx: np.ndarray, tdtype: torch.dtype,
                 names: Sequence | None) -> np.ndarray:
    """The batch's rows that `fa` needs, in the stored dtype (converted on the device, before the host copy); a
    value beyond float16 is an error naming the image, never an inf in the store."""
    import torch

    if not sel.all():
        y = y[torch.from_numpy(sel).to(y.device)]
    y = y.to(tdtype)
    if tdtype == torch.float16 and has_inf(y):
        row = int(idx[sel][int(torch.isinf(y).flatten(1).any(1).nonzero()[0])])
        raise Float16OverflowError(
            f"{names[row] if names is not None else f'row {row}'}: a feature value of {fa.feature} exceeds the "
            "float16 range (65504); rerun with --dtype float32 (and --overwrite)"
        )
    return y.cpu().numpy()


def has_inf(y: torch.Tensor) -> bool:
    """`torch.isinf(y).any()`, ~10x cheaper for float16 on CPU: one aminmax pass, the exact test only if it is not finite."""
    import torch

    lo, hi = torch.aminmax(y)
    return not bool(torch.isfinite(lo) & torch.isfinite(hi)) and bool(torch.isinf(y).any())
