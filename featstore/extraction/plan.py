"""What an extraction of one split has to do: its arrays (one per backbone output), what each lacks among this
process's share of the units, what they will take on disk, and the summaries of a finished run."""
from __future__ import annotations

import hashlib
import logging
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..storage import ArraySpec, FeatureArray, FeatureStore, split_path
from .config import ExtractConfig
from .images import SplitImages, read_headers
from .launcher import Share, share_units

if TYPE_CHECKING:
    from ..backbones import Backbone

log = logging.getLogger(__name__)


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
        return sorted({split_path(x.path)[0] for x in [*self.splits, *self.planned]})


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


class SplitPlan:
    """One split of one subject: its arrays (one per backbone output) and what each lacks; run.py fills them."""

    def __init__(self, fs: FeatureStore | None, bb: Backbone, cfg: ExtractConfig, subj: str, split: str,
                 paths: list[Path], share: Share, images: SplitImages | None = None):
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
            "precision": self.cfg.precision,  # a resumed run never mixes forward-pass dtypes in one array
        }
        meta = {
            **desc, "feature": feature, "precision": self.cfg.precision, "subj": self.subj, "split": self.split, "input_size": list(self.input_hw),
            "token_layout": {"cls_index": self.bb.cls_index, "grid": list(self.grid), "n_tokens": self.T},
            "image_names": names, "image_sizes": sizes, "versions": _versions(),
            **({"image_modes": self.images.modes, "converted_to_rgb": self.images.converted} if self.images else {}),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return meta, fingerprint

    def plan(self) -> list[PlannedArray]:
        unit = self.cfg.chunk * self.cfg.pack
        nunits = -(-len(self.paths) // unit)
        mine = share_units(nunits, self.share)
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

    def todo(self, arrays: list[FeatureArray], units: list[int] | None = None) -> dict[str, list[int]]:
        """The units each array lacks among this share's units (or among `units`), read from the completion record
        now: a retried distributed task skips what an earlier attempt finished."""
        todo = {}
        for fa in arrays:
            done = fa.done_mask()
            mine = share_units(fa.nchunks, self.share) if units is None else units
            todo[fa.path] = [int(c) for c in mine if not done[c]]
        return todo

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

    def check_space(self, arrays: list[FeatureArray], todo: dict[str, list[int]]) -> None:
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
