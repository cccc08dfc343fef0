"""The pipeline: image-loader workers -> backbone -> background writer -> store. Resume lives here.

One forward pass per batch yields every requested (variant, layer); each goes to its own array. Only units (chunks,
or shards with --pack) that are not marked done in some array (and belong to this process's share) are computed,
and each array receives only the units it lacks. Rows are assembled into whole units, so the store never does a
read-modify-write, and a background thread writes finished units while the next batch runs through the backbone.
Memory is bounded by the writer queue, in bytes, whatever N or the number of arrays is.

extract.py checks the arguments and calls in here; this is the module that imports torch.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import shutil
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ._progress import tqdm
from .backbones import Backbone, Preprocess, get_backbone
from .cluster import resolve_device as cluster_device
from .errors import (
    BadArgumentError,
    CorruptImageError,
    Float16OverflowError,
    Interrupted,
    StoreWriteError,
    Terminated,
)
from .extract import ExtractConfig, PlannedArray, SplitSummary
from .store import FeatureArray, FeatureStore

log = logging.getLogger("featstore.extract")


# ---- images -----------------------------------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """Decodes and preprocesses images in DataLoader workers; errors travel back as data, not tracebacks."""

    def __init__(self, paths: list[Path], indices: list[int], preprocess: Preprocess, input_hw: tuple[int, int]):
        self.paths, self.indices, self.preprocess, self.input_hw = paths, indices, preprocess, tuple(input_hw)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        path = self.paths[idx]
        try:
            with Image.open(path) as im:
                x = self.preprocess(im)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            return idx, f"{path}: cannot decode image ({type(e).__name__}: {e})"
        if tuple(x.shape[-2:]) != self.input_hw:
            return idx, f"{path}: preprocessed size {tuple(x.shape[-2:])} differs from the split's {self.input_hw}"
        return idx, x


def _collate(items):
    idx = [i for i, _ in items]
    errors = [x for _, x in items if isinstance(x, str)]
    if errors:
        return idx, None, errors
    return idx, torch.stack([x for _, x in items]), []


def _quiet_worker(_: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which stops them after settling its writes; a
    group-wide signal (Ctrl-C, scancel, kill -- -PGID) then never kills a worker under the main process's feet."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---- chunk assembly and writing ---------------------------------------------------------------------------------------
class ChunkAssembler:
    """Turns the ordered stream of computed rows into runs of whole, consecutive units (views where possible)."""

    def __init__(self, fa: FeatureArray, chunks: list[int]):
        self.fa, self.chunks, self.pos = fa, chunks, 0
        self.stage: np.ndarray | None = None
        self.filled = 0

    def add(self, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        done: list[tuple[int, np.ndarray, int]] = []  # (unit, data, offset in rows or -1 if staged)
        i = 0
        while i < len(rows):
            c = self.chunks[self.pos]
            a, b = self.fa.chunk_range(c)
            need = b - a
            if self.filled == 0 and len(rows) - i >= need:
                done.append((c, rows[i : i + need], i))
                i += need
            else:
                if self.stage is None:
                    self.stage = np.empty((need,) + rows.shape[1:], dtype=rows.dtype)
                take = min(need - self.filled, len(rows) - i)
                self.stage[self.filled : self.filled + take] = rows[i : i + take]
                self.filled += take
                i += take
                if self.filled < need:
                    break
                done.append((c, self.stage, -1))
                self.stage, self.filled = None, 0
            self.pos += 1
        runs: list[tuple[int, np.ndarray]] = []
        j = 0
        while j < len(done):  # merge consecutive units that are adjacent views of `rows`
            c0, data, off = done[j]
            k = j
            while (
                off >= 0
                and k + 1 < len(done)
                and done[k + 1][0] == done[k][0] + 1
                and done[k + 1][2] == done[k][2] + len(done[k][1])
            ):
                k += 1
            if k > j:
                data = rows[off : done[k][2] + len(done[k][1])]
            runs.append((c0, data))
            j = k + 1
        return runs


class BackgroundWriter:
    """Writes unit runs of any number of arrays on a thread, so the store overlaps the next forward pass.

    The queue is bounded in bytes (`limit`; one item always fits), so memory stays flat however many arrays one
    forward pass feeds. `on_written(rows)` is called after each run is durably written and marked done.
    """

    def __init__(self, durable: bool, limit: int, on_written=None):
        self.durable, self.limit, self.on_written = durable, limit, on_written
        self.q: queue.Queue = queue.Queue()
        self.cv = threading.Condition()
        self.pending = 0
        self.error: BaseException | None = None
        self.failed: tuple[str, int] | None = None
        self.thread = threading.Thread(target=self._run, name="featstore-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            fa, first, data = item
            try:
                if self.error is None:  # drain without writing after a failure
                    fa.write_chunks(first, data, durable=self.durable)
                    if self.on_written is not None:
                        self.on_written(len(data))
            except BaseException as e:  # noqa: BLE001 - reported to the main thread
                self.error, self.failed = e, (fa.path, first)
            finally:
                with self.cv:
                    self.pending -= data.nbytes
                    self.cv.notify_all()

    def put(self, fa: FeatureArray, first: int, data: np.ndarray) -> None:
        self.check()
        with self.cv:
            self.cv.wait_for(lambda: self.pending == 0 or self.pending + data.nbytes <= self.limit
                             or self.error is not None)
            self.pending += data.nbytes
        self.q.put((fa, first, data))

    def check(self) -> None:
        if self.error is not None:
            e = self.error
            reason = getattr(e, "strerror", None) or str(e)
            path, unit = self.failed
            raise StoreWriteError(
                f"writing chunk {unit} of {path} failed: {reason}; "
                "chunks written before are kept; fix the cause and rerun the same command to resume"
            ) from e

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()


# ---- shares, devices, identities --------------------------------------------------------------------------------------
def shard_chunks(nchunks: int, k: int, n: int) -> np.ndarray:
    """This share's unit indices: one contiguous range of N nearly equal ones."""
    return np.array_split(np.arange(nchunks), n)[k]


def resolve_device(device: str, shard: Any = None) -> torch.device:
    device = cluster_device(device, shard=shard)
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("--device %s requested but CUDA is not available; running on CPU", device)
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise BadArgumentError(f"--device {device!r}: not a torch device (use cuda, cuda:N or cpu)") from None

def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:  # e.g. featstore run from a source tree
            return "unknown"

    pkgs = ("featstore", "torch", "timm", "open_clip_torch", "zarr", "numcodecs", "numpy", "pillow")
    return {p: v(p) for p in pkgs} | {"python": sys.version.split()[0]}


def _image_identity(paths: list[Path]) -> tuple[list[str], list[int], str]:
    names = [p.name for p in paths]
    sizes = [p.stat().st_size for p in paths]
    h = hashlib.sha256("\n".join(f"{n}:{s}" for n, s in zip(names, sizes)).encode()).hexdigest()
    return names, sizes, h


def build_backbone(cfg: ExtractConfig, weights: str) -> Backbone:
    if isinstance(cfg.backbone, Backbone):
        return cfg.backbone
    return get_backbone(cfg.backbone, layer=cfg.enc_layer, weights=weights, arch=cfg.arch, seed=cfg.seed,
                        image_size=cfg.image_size)

class SplitJob:
    """One split of one subject: its arrays (one per backbone output), what each lacks, and the run that fills it."""

    loader_context: str | None = None  # start method of the image-decoding workers (None: torch's default)

    def __init__(self, fs: FeatureStore | None, bb: Backbone, cfg: ExtractConfig, subj: str, split: str,
                 paths: list[Path], share: tuple[int, int]):
        self.fs, self.bb, self.cfg, self.subj, self.split, self.paths, self.share = fs, bb, cfg, subj, split, paths, share
        try:
            with Image.open(paths[0]) as im:
                self.input_hw = bb.preprocess.output_size((im.height, im.width))
        except Exception as e:  # noqa: BLE001
            raise CorruptImageError(f"{paths[0]}: cannot read image ({type(e).__name__}: {e})") from None
        self.T, self.C, self.grid = bb.token_shape(self.input_hw)
        self.shape = (len(paths), self.T, self.C)

    def _meta(self, feature: str) -> tuple[dict, dict]:
        names, sizes, images_sha = _image_identity(self.paths)
        desc = self.bb.describe(feature)
        fingerprint = {
            "images": images_sha, "n_images": len(self.paths),
            **{key: desc[key] for key in ("backbone", "arch", "layer", "weights", "preprocess") if key in desc},
        }
        meta = {
            **desc, "feature": feature, "subj": self.subj, "split": self.split, "input_size": list(self.input_hw),
            "token_layout": {"cls_index": self.bb.cls_index, "grid": list(self.grid), "n_tokens": self.T},
            "image_names": names, "image_sizes": sizes, "versions": _versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return meta, fingerprint

    def plan(self) -> list[PlannedArray]:
        unit = self.cfg.chunk * self.cfg.pack
        nunits = -(-len(self.paths) // unit)
        mine = shard_chunks(nunits, *self.share)
        itemsize = np.dtype(self.cfg.dtype).itemsize
        out = []
        for o in self.bb.outputs:
            done = np.zeros(nunits, dtype=bool)
            if self.fs is not None and self.fs.exists(o.feature, self.subj, self.split):
                fa = self.fs.get(o.feature, self.subj, self.split)
                if fa.nchunks == nunits:
                    done = fa.done_mask()
            todo = sum(min((c + 1) * unit, len(self.paths)) - c * unit for c in mine if not done[c])
            out.append(PlannedArray(f"{o.feature}/{self.subj}/{self.split}", self.shape, self.cfg.dtype, todo,
                                    int(np.prod(self.shape)) * itemsize))
        return out

    def prepare(self) -> list[FeatureArray]:
        """Create (or open and check) the arrays of every output; race-free across processes."""
        cfg, arrays = self.cfg, []
        for o in self.bb.outputs:
            meta, fingerprint = self._meta(o.feature)
            fa, _ = self.fs.prepare(
                o.feature, self.subj, self.split, shape=self.shape, chunk=cfg.chunk, dtype=cfg.dtype, meta=meta,
                fingerprint=fingerprint, overwrite=cfg.overwrite, codec=cfg.codec, pack=cfg.pack,
            )
            arrays.append(fa)
        return arrays

    def run(self, dev: torch.device, units: list[int] | None = None, lock: bool = True) -> list[SplitSummary]:
        """Fill what the arrays lack among this share's units (or only among `units`, e.g. one distributed task's
        range; such callers hand out disjoint ranges and pass lock=False)."""
        t0 = time.perf_counter()
        arrays = self.prepare()
        locks = [fa.lock(self.share).acquire() for fa in arrays] if lock else []
        try:
            todo = self.todo(arrays, units)
            self._check_space(arrays, todo)
            computed = self.fill(arrays, todo, dev)
        finally:
            for lk in locks:
                lk.release()
        return self.summaries(arrays, computed, time.perf_counter() - t0)

    def todo(self, arrays: list[FeatureArray], units: list[int] | None = None) -> dict[str, list[int]]:
        """The units each array lacks among this share's units (or among `units`), read from the completion record
        now: a retried distributed task skips what an earlier attempt finished."""
        todo = {}
        for fa in arrays:
            done = fa.done_mask()
            mine = shard_chunks(fa.nchunks, *self.share) if units is None else units
            todo[fa.path] = [int(c) for c in mine if not done[c]]
        return todo

    def fill(self, arrays: list[FeatureArray], todo: dict[str, list[int]], dev: torch.device) -> dict[str, int]:
        """Compute and write the `todo` units (after removing stray temp files of exactly those units); returns the
        rows computed per array."""
        for fa in arrays:
            if todo[fa.path]:
                removed = fa.clean_partials(todo[fa.path])
                if removed:
                    log.info("%s: removed %d stray temporary files from an interrupted run", fa.path, removed)
        return self._compute(arrays, todo, dev) if any(todo.values()) else {}

    def summaries(self, arrays: list[FeatureArray], computed: dict[str, int], seconds: float) -> list[SplitSummary]:
        out = []
        for fa in arrays:
            mask = fa.done_mask()
            n_computed = computed.get(fa.path, 0)
            out.append(SplitSummary(
                path=fa.path, n=len(self.paths), shape=fa.shape, dtype=self.cfg.dtype, computed=n_computed,
                skipped=len(self.paths) - n_computed, done_chunks=int(mask.sum()), total_chunks=fa.nchunks,
                bytes_on_disk=fa.nbytes_stored(), seconds=seconds,
            ))
        return out

    def _check_space(self, arrays: list[FeatureArray], todo: dict[str, list[int]]) -> None:
        """Warn (one line) when the units left will not fit on the disk, estimated from the measured ratio."""
        root = self.fs.local_root
        if root is None:
            return
        need = 0
        for fa in arrays:
            rows = sum(b - a for a, b in (fa.chunk_range(c) for c in todo[fa.path]))
            raw = rows * int(np.prod(fa.shape[1:])) * fa.dtype.itemsize
            s = fa.summary()
            ratio = s["ratio"] if s["done"] and s["ratio"] == s["ratio"] else 1.0
            need += int(raw / ratio)
        free = shutil.disk_usage(root).free
        if need > free:
            log.warning("%s: the chunks left need ~%.2f GB but only %.2f GB are free on that disk; the run will "
                        "stop when it is full (finished chunks are kept)", root, need / 1e9, free / 1e9)

    def _compute(self, arrays: list[FeatureArray], todo: dict[str, list[int]], dev: torch.device) -> dict[str, int]:
        cfg, bb, paths = self.cfg, self.bb, self.paths
        need = {fa.path: np.zeros(len(paths), dtype=bool) for fa in arrays}
        for fa in arrays:
            for c in todo[fa.path]:
                need[fa.path][slice(*fa.chunk_range(c))] = True
        wanted = np.logical_or.reduce(list(need.values()))
        indices = [int(i) for i in np.flatnonzero(wanted)]
        loader = DataLoader(
            ImageFiles(paths, indices, bb.preprocess, self.input_hw),
            batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, collate_fn=_collate,
            pin_memory=dev.type == "cuda", prefetch_factor=2 if cfg.num_workers > 0 else None,
            worker_init_fn=_quiet_worker if cfg.num_workers > 0 else None,
            multiprocessing_context=self.loader_context if cfg.num_workers > 0 else None,
        )
        tdtype = torch.float16 if cfg.dtype == "float16" else torch.float32
        assemblers = {fa.path: ChunkAssembler(fa, todo[fa.path]) for fa in arrays}
        features = {fa.path: fa.feature for fa in arrays}
        total_rows = int(sum(n.sum() for n in need.values()))
        single = len(arrays) == 1
        desc = arrays[0].path if single else f"{self.subj}/{self.split}: {len(arrays)} arrays"
        bar = tqdm(total=total_rows, desc=desc, unit="img" if single else "row", disable=not cfg.progress,
                   smoothing=0.1)
        writer = BackgroundWriter(cfg.durable, cfg.queue_mb << 20, on_written=bar.update)
        computed = dict.fromkeys(need, 0)
        try:
            for idx, x, errors in loader:
                if errors:
                    raise CorruptImageError(errors[0])
                idx_arr = np.asarray(idx)
                with torch.inference_mode():
                    ys = bb.forward_features(x.to(dev, non_blocking=True))
                    for fa in arrays:
                        sel = need[fa.path][idx_arr]
                        if not sel.any():
                            continue
                        y = ys[features[fa.path]]
                        if not sel.all():
                            y = y[torch.from_numpy(sel).to(y.device)]
                        y = y.to(tdtype)  # convert on the device, before the host copy
                        if tdtype == torch.float16 and _has_inf(y):
                            bad = int(torch.isinf(y).flatten(1).any(1).nonzero()[0])
                            raise Float16OverflowError(
                                f"{paths[idx_arr[sel][bad]]}: a feature value of {fa.feature} exceeds the float16 "
                                "range (65504); rerun with --dtype float32 (and --overwrite)"
                            )
                        rows = y.cpu().numpy()
                        for first, data in assemblers[fa.path].add(rows):
                            writer.put(fa, first, data)
                        computed[fa.path] += len(rows)
        except KeyboardInterrupt as e:
            writer.close()  # the rows already computed are written: nothing finished is lost
            bar.close()
            code = 143 if isinstance(e, Terminated) else 130
            state = ", ".join(f"{int(fa.done_mask().sum())}/{fa.nchunks} chunks of {fa.path}" for fa in arrays)
            raise Interrupted(f"interrupted: {state} are done; rerun the same command to resume",
                              exit_code=code) from None
        except BaseException:
            writer.close()
            bar.close()
            writer.check()
            raise
        writer.close()
        bar.close()
        writer.check()
        return computed


def _has_inf(y: torch.Tensor) -> bool:
    """`torch.isinf(y).any()`, ~10x cheaper for float16 on CPU: one aminmax pass, the exact test only if it is not finite."""
    lo, hi = torch.aminmax(y)
    return not bool(torch.isfinite(lo) & torch.isfinite(hi)) and bool(torch.isinf(y).any())


def _has_inf(y: torch.Tensor) -> bool:
    """`torch.isinf(y).any()`, ~10x cheaper for float16 on CPU: one aminmax pass, the exact test only if it is not finite."""
    lo, hi = torch.aminmax(y)
    return not bool(torch.isfinite(lo) & torch.isfinite(hi)) and bool(torch.isinf(y).any())

