"""Extraction: image-loader workers -> backbone -> background writer -> store. Resume lives here.

One forward pass per batch yields every requested (variant, layer); each goes to its own array. Only units (chunks,
or shards with --pack) that are not marked done in some array (and belong to this process's share) are computed,
and each array receives only the units it lacks (writer.py assembles and writes them). Every argument is checked
before torch is imported (torch loads in the functions that run the model), so a wrong flag, folder or weights path
fails in a fraction of a second, not after a model load.
"""
from __future__ import annotations

import hashlib
import logging
import re
import shutil
import sys
import time
import types
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._progress import tqdm
from .backbones import check_layer_spec, check_weights_arg, get_backbone, parse_backbones
from .cluster import detect_shard
from .cluster import resolve_device as cluster_device
from .errors import (
    BadArgumentError,
    CorruptImageError,
    Float16OverflowError,
    Interrupted,
    Terminated,
)
from .images import ImageFiles, SplitImages, check_splits, collate, quiet_worker, read_headers
from .layout import normalize_subj, read_subject
from .storage import ArraySpec, FeatureArray, FeatureStore, check_writable_dir, compressors, is_url
from .writer import BackgroundWriter, ChunkAssembler

if TYPE_CHECKING:
    import torch

    from .backbones import Backbone

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")


@dataclass
class ExtractConfig:
    """Everything an extraction run is configured by (the CLI flags, in Python)."""

    subj: str = "01"
    backbone: str | list[str] | Backbone = "dinov2_q"  # one variant, several sharing one model ("dinov2_q,dinov2"),
    # or a built Backbone
    batch_size: int = 16
    device: str = "cuda"
    enc_layer: int | str | list[int] = -1  # -1, "-1,-4,6", "0:12", "all", [0, 5]
    weights: str = "pretrained"  # "pretrained", "random" (seeded) or a checkpoint path
    arch: str | None = None
    image_size: int | None = None
    dtype: str = "float16"
    chunk: int = 1  # samples per chunk
    pack: int = 1  # chunks per stored object (zarr sharding); the unit of writing and of the completion record
    codec: str | None = None  # None: DEFAULT_CODEC for new arrays; an existing array keeps its own
    num_workers: int = 2  # image-decoding DataLoader workers
    shard: str | tuple[int, int] | None = None  # "K/N", (K, N) or "auto" (SLURM / torchrun variables)
    overwrite: bool = False
    splits: list[str] | None = None
    seed: int = 0
    durable: bool = True
    progress: bool = True
    storage_options: dict[str, Any] | None = None
    queue_mb: int = 512  # bytes of computed rows the writer may hold before the forward pass waits

    def validate(self) -> ExtractConfig:
        """Every check that needs no model, so that a wrong flag fails at once (and before torch is imported)."""
        if self.dtype not in DTYPES:
            raise BadArgumentError(f"--dtype {self.dtype!r}: choose float16 or float32")
        for flag in ("batch_size", "chunk", "pack"):
            if int(getattr(self, flag)) < 1:
                raise BadArgumentError(f"--{flag} {getattr(self, flag)}: must be >= 1")
        if self.num_workers < 0:
            raise BadArgumentError(f"--num_workers {self.num_workers}: must be >= 0")
        if self.codec is not None:
            compressors(self.codec, self.dtype)  # names the flag when unknown
        if isinstance(self.backbone, (str, list, tuple)):  # else a built Backbone
            parse_backbones(self.backbone)  # unknown names and unshareable mixes fail before anything is printed
            check_layer_spec(self.enc_layer)
            check_weights_arg(self.weights, self.arch)
        return replace(self, subj=normalize_subj(self.subj))


@dataclass
class SplitSummary:
    path: str
    n: int
    shape: tuple[int, ...]
    dtype: str
    computed: int  # images computed by this run for this array
    skipped: int  # images whose units were already done (or belong to another share)
    done_chunks: int  # units done: chunks, or packs with --pack (see `unit`)
    total_chunks: int
    bytes_on_disk: int
    seconds: float  # this split's own time
    unit: str = "chunk"  # what done_chunks counts: "chunk", or "pack" (K chunks in one object)
    vs_float32: float = float("nan")  # stored bytes of the done units / float32 .npy bytes of their rows

    @property
    def ratio_vs_float32(self) -> float:
        """How many times smaller than the float32 .npy of the same data."""
        return 1 / self.vs_float32 if self.vs_float32 > 0 else float("nan")

    def line(self) -> str:
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.path}: N={self.n} shape={self.shape} {self.dtype}, computed {self.computed}, "
            f"skipped {self.skipped} (done {self.done_chunks}/{self.total_chunks} {self.unit}s), "
            f"{self.bytes_on_disk / 1e6:.1f} MB on disk ({size_vs_npy(self.vs_float32)}), "
            f"{self.seconds:.1f} s ({rate:.1f} img/s)"
        )


def size_vs_npy(r: float) -> str:
    """Stored size against the float32 .npy of the same rows, plainly: "0.50x the size of", "same size as"."""
    if np.isnan(r):
        return "nothing stored yet"
    if abs(r - 1) < 0.005:
        return "same size as the float32 .npy"
    return f"{r:.2f}x the size of the float32 .npy"


@dataclass
class PlannedArray:
    path: str
    shape: tuple[int, int, int]
    dtype: str
    todo_images: int  # images this run would compute for it
    estimated_bytes: int  # on disk when complete

    def line(self) -> str:
        return (f"{self.path}: shape={self.shape} {self.dtype}, ~{self.estimated_bytes / 1e9:.2f} GB on disk, "
                f"{self.todo_images} images to compute")


@dataclass
class ExtractResult:
    store: str
    feature: str  # the first array's feature (the only one for a single-output run)
    splits: list[SplitSummary] = field(default_factory=list)
    planned: list[PlannedArray] = field(default_factory=list)  # dry runs

    @property
    def features(self) -> list[str]:
        return sorted({s.path.split("/")[0] for s in self.splits} | {p.path.split("/")[0] for p in self.planned})


# ---- shares, subjects ------------------------------------------------------------------------------------------------
def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """'K/N' (K in 0..N-1), (K, N), 'auto' or None -> (K, N)."""
    s = detect_shard(shard)
    return s.k, s.n

def _check_subj(subj: str, data_dir: Path) -> str:
    m = re.fullmatch(r"subj(\d{2})", data_dir.resolve().name)
    if m and m.group(1) != subj:
        raise BadArgumentError(f"--subj {subj} does not match --data_dir {data_dir} (subject {m.group(1)})")
    return subj
# ---- devices, identities --------------------------------------------------------------------------------------
def shard_chunks(nchunks: int, k: int, n: int) -> np.ndarray:
    """This share's unit indices: one contiguous range of N nearly equal ones."""
    return np.array_split(np.arange(nchunks), n)[k]


def resolve_device(device: str, shard: Any = None) -> torch.device:
    import torch

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
    if not isinstance(cfg.backbone, (str, list, tuple)):  # already built
        return cfg.backbone
    return get_backbone(cfg.backbone, layer=cfg.enc_layer, weights=weights, arch=cfg.arch, seed=cfg.seed,
                        image_size=cfg.image_size)


# ---- entry points -----------------------------------------------------------------------------------------------------
def extract(
    data_dir: str | Path,
    output_dir: str | Path,
    config: ExtractConfig | None = None,
    *,
    store: FeatureStore | None = None,
    dry_run: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    **options: Any,
) -> ExtractResult:
    """Extract one subject's features into the store at `output_dir` (a folder or an fsspec URL), resuming whatever
    is already done. Options are the fields of ExtractConfig (e.g. backbone="dinov2_q,dinov2", enc_layer="0:12").
    `dry_run` only reports the arrays, their shapes and the bytes they will take. `scheduler` (a dask.distributed
    ADDRESS) or `workers` (a LocalCluster of N processes) runs the units left as tasks on a cluster (distributed.py)."""
    known = {f.name for f in fields(ExtractConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise TypeError(f"extract() got unknown option(s) {', '.join(bad)}; options are: {', '.join(sorted(known))}")
    cfg = replace(config or ExtractConfig(), **options).validate()
    share = parse_shard(cfg.shard)
    data_dir = Path(data_dir)
    subject = read_subject(data_dir, cfg.splits)
    subj = _check_subj(cfg.subj, data_dir)
    if dry_run:
        fs = store or _open_for_plan(output_dir, cfg)
        bb = build_backbone(cfg, weights="random")  # shapes only: no weights are needed
        checked = check_splits(subject.images, bb.preprocess)
        planned = [p for split, paths in subject.images.items()
                   for p in SplitJob(fs, bb, cfg, subj, split, paths, share, checked[split]).plan()]
        return ExtractResult(store=str(output_dir), feature=bb.outputs[0].feature, planned=planned)
    if store is None and not is_url(str(output_dir)):
        check_writable_dir(Path(output_dir), "output_dir")  # before any model is loaded
    if scheduler is not None or workers is not None:
        from .distributed import extract_on_cluster

        return extract_on_cluster(subject, subj, output_dir, cfg, store=store, scheduler=scheduler, workers=workers)
    dev = resolve_device(cfg.device, cfg.shard)
    bb = build_backbone(cfg, weights=cfg.weights)
    checked = check_splits(subject.images, bb.preprocess)  # every image's header, before anything is written
    if bb.weights.get("kind") == "random":
        log.warning("using RANDOM weights (seed %s) for %s: features are not pretrained",
                    bb.weights.get("seed"), bb.name)
    bb.to(dev)
    fs = store or FeatureStore(output_dir, mode="a", storage_options=cfg.storage_options)
    if cfg.shard is not None:
        log.info("%s", detect_shard(cfg.shard).line())
    result = ExtractResult(store=fs.location, feature=bb.outputs[0].feature)
    for split, paths in subject.images.items():
        result.splits.extend(SplitJob(fs, bb, cfg, subj, split, paths, share, checked[split]).run(dev))
    return result

def _open_for_plan(output_dir: str | Path, cfg: ExtractConfig) -> FeatureStore | None:
    """A dry run reads an existing store (to count what is left) and never creates one."""
    try:
        return FeatureStore(output_dir, mode="r", storage_options=cfg.storage_options)
    except Exception:  # noqa: BLE001 - no store yet: everything is left to do
        return None

__all__ = ["ExtractConfig", "ExtractResult", "PlannedArray", "SplitSummary", "extract", "is_url"]


class SplitJob:
    """One split of one subject: its arrays (one per backbone output), what each lacks, and the run that fills it."""

    loader_context: str | None = None  # start method of the image-decoding workers (None: torch's default)

    def __init__(self, fs: FeatureStore | None, bb: Backbone, cfg: ExtractConfig, subj: str, split: str,
                 paths: list[Path], share: tuple[int, int], images: SplitImages | None = None):
        """`images`: the split's checked headers (check_splits); without them (a distributed task, whose client
        checked them) the first image's header gives the size."""
        self.fs, self.bb, self.cfg, self.subj, self.split, self.paths, self.share = fs, bb, cfg, subj, split, paths, share
        self.images = images
        self.input_hw = images.input_hw if images else bb.preprocess.output_size(read_headers(paths[:1])[0][0])
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
            **({"image_modes": self.images.modes, "converted_to_rgb": self.images.converted} if self.images else {}),
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
                o.feature, self.subj, self.split, ArraySpec(self.shape, cfg.chunk, cfg.dtype, cfg.codec, cfg.pack),
                meta=meta, fingerprint=fingerprint, overwrite=cfg.overwrite,
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
            s = fa.summary()
            n_computed = computed.get(fa.path, 0)
            out.append(SplitSummary(
                path=fa.path, n=len(self.paths), shape=fa.shape, dtype=self.cfg.dtype, computed=n_computed,
                skipped=len(self.paths) - n_computed, done_chunks=s["done"], total_chunks=fa.nchunks,
                bytes_on_disk=s["bytes_on_disk"], seconds=seconds, unit=fa.unit,
                vs_float32=1 / s["ratio_vs_float32"] if s["ratio_vs_float32"] > 0 else float("nan"),
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
        import torch
        from torch.utils.data import DataLoader

        cfg, bb, paths = self.cfg, self.bb, self.paths
        need = {fa.path: np.zeros(len(paths), dtype=bool) for fa in arrays}
        for fa in arrays:
            for c in todo[fa.path]:
                need[fa.path][slice(*fa.chunk_range(c))] = True
        wanted = np.logical_or.reduce(list(need.values()))
        indices = [int(i) for i in np.flatnonzero(wanted)]
        loader = DataLoader(
            ImageFiles(paths, indices, bb.preprocess, self.input_hw),
            batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, collate_fn=collate,
            pin_memory=dev.type == "cuda", prefetch_factor=2 if cfg.num_workers > 0 else None,
            worker_init_fn=quiet_worker if cfg.num_workers > 0 else None,
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
            state = ", ".join(f"{fa.progress()} of {fa.path}" for fa in arrays)
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
    import torch

    lo, hi = torch.aminmax(y)
    return not bool(torch.isfinite(lo) & torch.isfinite(hi)) and bool(torch.isinf(y).any())


class _CallableModule(types.ModuleType):
    """`featstore.extract` is both this module and the function: importing the submodule (e.g. through
    featstore.distributed) rebinds the package attribute to the module, so the module calls the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> ExtractResult:
        return extract(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule