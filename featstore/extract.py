"""The extraction entry point: `extract()`, its configuration and its results.

Every argument (flags, subject folder, output folder, weights file) is checked here before torch is imported, so a
mistake costs a fraction of a second, not a model load; the work itself is pipeline.py.
"""
from __future__ import annotations

import logging
import re
import sys
import types
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .backbones.registry import check_layer_spec, check_weights_arg, parse_backbones
from .cluster import detect_shard
from .errors import BadArgumentError
from .layout import normalize_subj, read_subject
from .store import DEFAULT_CODEC, FeatureStore, check_writable_dir, compressors, is_url

if TYPE_CHECKING:
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
    codec: str = DEFAULT_CODEC
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
    done_chunks: int
    total_chunks: int
    bytes_on_disk: int
    seconds: float

    @property
    def ratio_vs_float32(self) -> float:
        """How many times smaller than the float32 .npy of the same data."""
        raw = int(np.prod(self.shape)) * 4
        return raw / self.bytes_on_disk if self.bytes_on_disk else float("nan")

    def line(self) -> str:
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.path}: N={self.n} shape={self.shape} {self.dtype}, computed {self.computed}, "
            f"skipped {self.skipped} (done {self.done_chunks}/{self.total_chunks} chunks), "
            f"{self.bytes_on_disk / 1e6:.1f} MB on disk ({self.ratio_vs_float32:.2f}x smaller than float32 npy), "
            f"{self.seconds:.1f} s ({rate:.1f} img/s)"
        )


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
        from .pipeline import SplitJob, build_backbone

        fs = store or _open_for_plan(output_dir, cfg)
        bb = build_backbone(cfg, weights="random")  # shapes only: no weights are needed
        planned = [p for split, paths in subject.images.items()
                   for p in SplitJob(fs, bb, cfg, subj, split, paths, share).plan()]
        return ExtractResult(store=str(output_dir), feature=bb.outputs[0].feature, planned=planned)
    if store is None and not is_url(str(output_dir)):
        check_writable_dir(Path(output_dir), "--output_dir")  # before any model is loaded
    if scheduler is not None or workers is not None:
        from .distributed import extract_on_cluster

        return extract_on_cluster(subject, subj, output_dir, cfg, store=store, scheduler=scheduler, workers=workers)
    from .pipeline import SplitJob, build_backbone, resolve_device

    dev = resolve_device(cfg.device, cfg.shard)
    bb = build_backbone(cfg, weights=cfg.weights)
    if bb.weights.get("kind") == "random":
        log.warning("using RANDOM weights (seed %s) for %s: features are not pretrained",
                    bb.weights.get("seed"), bb.name)
    bb.to(dev)
    fs = store or FeatureStore(output_dir, mode="a", storage_options=cfg.storage_options)
    if cfg.shard is not None:
        log.info("%s", detect_shard(cfg.shard).line())
    result = ExtractResult(store=fs.location, feature=bb.outputs[0].feature)
    for split, paths in subject.images.items():
        result.splits.extend(SplitJob(fs, bb, cfg, subj, split, paths, share).run(dev))
    return result

def _open_for_plan(output_dir: str | Path, cfg: ExtractConfig) -> FeatureStore | None:
    """A dry run reads an existing store (to count what is left) and never creates one."""
    try:
        return FeatureStore(output_dir, mode="r", storage_options=cfg.storage_options)
    except Exception:  # noqa: BLE001 - no store yet: everything is left to do
        return None

__all__ = ["ExtractConfig", "ExtractResult", "PlannedArray", "SplitSummary", "extract", "is_url"]


class _CallableModule(types.ModuleType):
    """`featstore.extract` is both this module and the function: importing the submodule (e.g. through
    featstore.distributed) rebinds the package attribute to the module, so the module calls the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> ExtractResult:
        return extract(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule