"""The Zarr schema: array paths, dimension names, coordinates, codecs, provenance attributes, uids.

This is the only module that knows Zarr paths and attribute names; everything else asks it.

Layout of a store (a Zarr v3 group; a local folder or any fsspec URL such as s3://bucket/store.zarr):
    {feature}/{subj}/{split}                 float16/float32 array (N, T, C), dims ({split}_image, token, channel),
                                             fill_value NaN, chunks of K samples (optionally packed into shards)
    {feature}/{subj}/{split}_image           coordinate: image file names (variable-length strings)
    {feature}/{subj}/{split}_nsd_id          coordinate: NSD ids parsed from the names (-1 where absent)
    {feature}/{subj}/{split}/done-{uid}/{i}  the completion record (completion.py)
    {feature}/{subj}/{split}_stats           group of small arrays written by `featstore stats`

Format version 1 (recorded as attrs["featstore"]["format_version"]). Version 0 stores (fill 0, one "image"
dimension, no coordinates) stay readable.
"""
from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from . import _chunkio
from .completion import CompletionRecord, WriterLock
from .errors import (
    BadArgumentError,
    CorruptChunkError,
    FingerprintMismatchError,
    IncompleteArrayError,
    NotFoundInStoreError,
    StoreError,
    one_line,
)
from .layout import normalize_subj

FORMAT_VERSION = 1
ATTR_KEY = "featstore"  # all featstore provenance lives under this attribute
TOKEN_DIM, CHANNEL_DIM = "token", "channel"
_WRITE_CONFIG = {"array.write_empty_chunks": True}  # every done chunk has a file: a missing file is corruption
_NSD_ID = re.compile(r"nsd-(\d+)")

# name -> bytes->bytes compressor (crc32c is always appended). Measured on backbone output: see the README.
CODECS = {
    "none": lambda itemsize: [],
    "lz4": lambda itemsize: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize)],
    "lz4-bitshuffle": lambda itemsize: [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=itemsize)],
    "zstd": lambda itemsize: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=itemsize)],
    "zstd-bitshuffle": lambda itemsize: [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=itemsize)],
}
DEFAULT_CODEC = "none"


def compressors(codec: str, dtype: str) -> list:
    if codec not in CODECS:
        raise BadArgumentError(f"--codec {codec!r}: choose one of {', '.join(CODECS)}")
    return [*CODECS[codec](np.dtype(dtype).itemsize), Crc32cCodec()]


def array_path(feature: str, subj: str, split: str) -> str:
    return f"{feature}/{subj}/{split}"


def image_dim(split: str) -> str:
    return f"{split}_image"


def nsd_ids(names: list[str]) -> np.ndarray:
    """NSD ids from Algonauts file names (`train-0001_nsd-00013.png` -> 13); -1 where a name carries none."""
    return np.array([int(m.group(1)) if (m := _NSD_ID.search(n)) else -1 for n in names], dtype=np.int64)


@dataclass
class VerifyReport:
    path: str
    total: int
    done: int
    corrupt: list[int]  # units marked done whose data fails to decode or checksum
    missing: list[int]  # units not marked done
    problems: list[str]  # shape/dtype/attribute disagreements

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.problems)


class FeatureArray:
    """One (N, T, C) feature array plus its completion record.

    A "unit" is what one write fills and one done marker covers: a chunk, or a whole shard when packed (--pack).
    """

    def __init__(self, store: FeatureStore, path: str, array: zarr.Array):
        self.store = store
        self.path = path
        self.zarr = array
        self.meta: dict[str, Any] = dict(array.attrs.get(ATTR_KEY, {}))
        shards = getattr(array, "shards", None)
        self.chunk_len = int(shards[0] if shards else array.chunks[0])  # rows per unit
        self.nchunks = -(-int(array.shape[0]) // self.chunk_len)
        self.record = CompletionRecord(store.zstore, path, self.uid, self.nchunks, store.local_root,
                                       fast=store.plain_local)

    # ---- description -------------------------------------------------------------------------------------------
    @property
    def feature(self) -> str:
        return self.path.split("/")[0]

    @property
    def subj(self) -> str:
        return self.path.split("/")[1]

    @property
    def split(self) -> str:
        return self.path.split("/")[2]

    @property
    def uid(self) -> str | None:
        """Random id of this incarnation of the array (a new one after --overwrite)."""
        return self.meta.get("uid")

    @property
    def format_version(self) -> int:
        return int(self.meta.get("format_version", 0))

    @property
    def provenance(self) -> dict[str, Any]:
        """Everything recorded about how the array was made (backbone, layer, weights, preprocessing, ...)."""
        return dict(self.meta)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.zarr.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.zarr.dtype)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["token_layout"]["grid"])

    @property
    def cls_index(self) -> int:
        return int(self.meta["token_layout"]["cls_index"])

    @property
    def image_names(self) -> list[str]:
        return list(self.meta.get("image_names", []))

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.meta.get("fingerprint", {}))

    @property
    def packed(self) -> bool:
        return bool(getattr(self.zarr, "shards", None))

    def chunk_range(self, i: int) -> tuple[int, int]:
        return i * self.chunk_len, min((i + 1) * self.chunk_len, self.shape[0])

    # ---- completion record ------------------------------------------------------------------------------------
    def done_mask(self) -> np.ndarray:
        """Boolean (nchunks,): which units are durably written. One listing, no chunk reads."""
        return self.record.mask()

    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    def require_complete(self, what: str = "this operation") -> None:
        mask = self.done_mask()
        if not mask.all():
            raise IncompleteArrayError(
                f"{self.path} is incomplete ({int(mask.sum())}/{self.nchunks} chunks done); "
                f"finish the extraction (rerun the same extract command) before {what}"
            )

    def mark_undone(self, chunks: list[int]) -> None:
        self.record.mark_undone(chunks)

    def clean_partials(self, chunks: list[int] | None = None) -> int:
        return self.record.clean_partials(chunks)

    def lock(self, share: tuple[int, int]) -> WriterLock:
        """The advisory lock of this writer's share (local stores); use as a context manager."""
        return WriterLock(self.store.local_root, self.path, share)

    # ---- write path -------------------------------------------------------------------------------------------
    def write_chunks(self, first_chunk: int, data: np.ndarray, durable: bool = True) -> list[int]:
        """Write whole units starting at unit `first_chunk` (no read-modify-write), then mark them done."""
        start = first_chunk * self.chunk_len
        stop = start + data.shape[0]
        if stop != self.shape[0] and data.shape[0] % self.chunk_len:
            raise ValueError(f"write of {data.shape[0]} rows at {start} is not aligned to units of {self.chunk_len}")
        if data.shape[1:] != self.shape[1:]:
            raise ValueError(f"rows of shape {data.shape[1:]} written to {self.path} of shape {self.shape}")
        units = list(range(first_chunk, -(-stop // self.chunk_len)))
        root = self.store.local_root
        if self._steps is None:
            self.zarr[start:stop] = data  # zarr's path: returns after every chunk's write (or PUT) succeeded
            if durable and root is not None:
                _chunkio.fsync_all(self._unit_files(root, units))
        else:  # whole chunks, encoded and written in parallel by the I/O threads, each fsync'ed right after
            data = np.asarray(data, dtype=self.dtype)
            encode = self._encoder
            jobs = [(root / self.path / self._chunk_key(i), data[(i - first_chunk) * self.chunk_len :][: self.chunk_len])
                    for i in units]
            pool = _chunkio.io_pool()
            for f in [pool.submit(lambda p, r: _chunkio.put_file(p, encode(r), durable), p, r) for p, r in jobs]:
                f.result()
            if durable:
                _chunkio.fsync_all([p for p, _ in jobs], files=False)
        self.record.mark_done(units, durable)
        return units

    def _unit_files(self, root: Path, units: list[int]) -> list[Path]:
        """The files holding these units: one chunk file each, or one shard file each when packed."""
        return [root / self.path / self._chunk_key(i) for i in units]

    def _chunk_key(self, i: int) -> str:
        return self.zarr.metadata.encode_chunk_key((i,) + (0,) * (len(self.shape) - 1))

    @functools.cached_property
    def _steps(self) -> list | None:
        return _chunkio.codec_steps(self.zarr, self.store.plain_local)

    @functools.cached_property
    def _encoder(self):
        return _chunkio.encoder(self.zarr, self._steps)

    @functools.cached_property
    def _decoder(self):
        return _chunkio.decoder(self._steps)

    # ---- read path --------------------------------------------------------------------------------------------
    def read(self, start: int, stop: int | None = None) -> np.ndarray:
        """Samples [start, stop) as stored (no completeness check: callers check `done_mask` once)."""
        stop = start + 1 if stop is None else stop
        try:
            return self.zarr[start:stop]
        except Exception as e:  # noqa: BLE001 - a codec or checksum failure: find the unit, one line
            raise self._corrupt(self._first_bad_unit(start, stop), e) from None

    def read_sample(self, j: int) -> np.ndarray:
        """Sample j as stored, (T, C), possibly a read-only view; no completeness check (callers check once).

        On a plain local store the chunk file is read and decoded in the calling thread (_chunkio), which is
        2-2.5x faster than zarr's own path for one-sample chunks.
        """
        if self._steps is None:
            return self.read(j)[0]
        i, r = divmod(int(j), self.chunk_len)
        key = self.store.local_root / self.path / self._chunk_key(i)
        try:
            with open(key, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise self._corrupt(i, FileNotFoundError(f"{key} is missing")) from None
        try:
            return self._decoder(data)[r]
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(i, e) from None

    def _first_bad_unit(self, start: int, stop: int) -> int:
        for i in range(start // self.chunk_len, -(-stop // self.chunk_len)):
            try:
                self.zarr[slice(*self.chunk_range(i))]
            except Exception:  # noqa: BLE001
                return i
        return start // self.chunk_len

    def _corrupt(self, unit: int, e: BaseException) -> CorruptChunkError:
        text = str(e).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(e).__name__  # not the raw checksum bytes
        where = self.store.location
        return CorruptChunkError(
            f"{self.path}: chunk {unit} is corrupt ({reason}); run `featstore verify --repair {where}`, "
            "then rerun the extract command to recompute it"
        )

    # ---- integrity --------------------------------------------------------------------------------------------
    def verify(self, repair: bool = False, progress: bool = False) -> VerifyReport:
        """Decode every done unit (the crc32c codec checks its checksum); list missing and corrupt units."""
        from ._progress import tqdm

        problems = []
        fp = self.fingerprint
        if fp:
            if list(fp.get("shape", self.shape)) != list(self.shape):
                problems.append(f"shape {self.shape} != recorded {fp['shape']}")
            if fp.get("dtype", str(self.dtype)) != str(self.dtype):
                problems.append(f"dtype {self.dtype} != recorded {fp['dtype']}")
        if len(self.image_names) != self.shape[0]:
            problems.append(f"{len(self.image_names)} image names recorded for {self.shape[0]} rows")
        mask = self.done_mask()
        corrupt = []
        for i in tqdm(np.flatnonzero(mask), desc=f"verify {self.path}", disable=not progress, unit="chunk"):
            a, b = self.chunk_range(int(i))
            try:
                if not self.packed and not _chunkio.run(
                    self.store.zstore.exists(f"{self.path}/{self._chunk_key(int(i))}")
                ):
                    raise ValueError("chunk file missing")
                values = self.zarr[a:b]
                if self.format_version >= 1 and np.isnan(values).all(axis=(1, 2)).any():
                    raise ValueError("a sample reads as all NaN (never written)")
            except Exception:  # any decode/checksum failure means this unit must be recomputed  # noqa: BLE001
                corrupt.append(int(i))
        if repair and corrupt:
            self.mark_undone(corrupt)
        missing = [int(i) for i in np.flatnonzero(~mask)]
        return VerifyReport(self.path, self.nchunks, int(mask.sum()), corrupt, missing, problems)

    def summary(self) -> dict[str, Any]:
        """What `featstore info` shows: ratios count the done units only, so a partial array is not flattered."""
        disk = self.nbytes_stored()
        mask = self.done_mask()
        rows_done = sum(b - a for a, b in (self.chunk_range(int(i)) for i in np.flatnonzero(mask)))
        raw = rows_done * int(np.prod(self.shape[1:]))
        return {
            "path": self.path, "shape": self.shape, "dtype": str(self.dtype), "chunks": tuple(self.zarr.chunks),
            "bytes_on_disk": disk,
            "ratio": raw * self.dtype.itemsize / disk if disk and raw else float("nan"),
            "ratio_vs_float32": raw * 4 / disk if disk and raw else float("nan"),
            "done": int(mask.sum()), "total": self.nchunks, "weights": self.meta.get("weights", {}),
        }

    def nbytes_stored(self) -> int:
        return int(_chunkio.run(self.store.zstore.getsize_prefix(self.path)))


class FeatureStore:
    """A featstore Zarr group: a local folder, an fsspec URL (s3://, gs://, file://) or any zarr Store object."""

    def __init__(self, root: str | Path | zarr.abc.store.Store, mode: str = "r",
                 storage_options: dict[str, Any] | None = None):
        self.read_only = mode == "r"
        self.storage_options = storage_options
        self.local_root: Path | None = None
        if isinstance(root, zarr.abc.store.Store):
            self.zstore = root
            self.source: Any = root
        elif is_url(root) and not str(root).startswith("file://"):
            self.zstore = _fsspec_store(str(root), storage_options, self.read_only)
            self.source = str(root)
        else:
            path = Path(str(root)[len("file://"):] if str(root).startswith("file://") else root)
            self.source = str(path)
            if not self.read_only:
                check_writable_dir(path, "--output_dir")
            self.zstore = LocalStore(path, read_only=self.read_only)
        inner = self.zstore
        while inner is not None and not isinstance(inner, LocalStore):
            inner = getattr(inner, "_store", None)
        if isinstance(inner, LocalStore):
            self.local_root = Path(inner.root)
        self.plain_local = type(self.zstore) is LocalStore  # wrappers (tests inject faults) keep zarr's path
        self.location = str(self.local_root) if self.local_root else (
            self.source if isinstance(self.source, str) else repr(self.zstore))
        if self.read_only:
            if self.local_root is not None and not (self.local_root / "zarr.json").is_file():
                raise StoreError(f"{self.location}: not a featstore store (no zarr.json)")
            try:
                self.root = zarr.open_group(self.zstore, mode="r")
            except Exception as e:  # zarr raises several types for "not a group"  # noqa: BLE001
                raise StoreError(f"{self.location}: cannot open as a Zarr group ({one_line(e)})") from None
        else:
            try:
                self.root = _open_group(self.zstore, "")
            except Exception as e:  # noqa: BLE001 - e.g. /proc, a read-only mount, a bucket that refuses writes
                raise StoreError(f"--output_dir {self.location}: cannot create a Zarr store there ({one_line(e)})") from None

    def reopen(self, mode: str = "r") -> FeatureStore:
        """The same store opened again (in another process, or for writing)."""
        return FeatureStore(self.source, mode=mode, storage_options=self.storage_options)

    # ---- discovery --------------------------------------------------------------------------------------------
    def list_arrays(self) -> list[str]:
        """All feature arrays as 'feature/subj/split', sorted."""
        out = []
        for fname, fgroup in self.root.groups():
            for sname, sgroup in fgroup.groups():
                for aname, arr in sgroup.arrays():
                    if ATTR_KEY in arr.attrs:
                        out.append(array_path(fname, sname, aname))
        return sorted(out)

    def arrays(self, feature: str | None = None, subj: str | None = None, split: str | None = None) -> list[FeatureArray]:
        """The arrays matching the given parts (None matches any)."""
        out = []
        for path in self.list_arrays():
            f, s, sp = path.split("/")
            if (feature is None or f == feature) and (subj is None or s == subj) and (split is None or sp == split):
                out.append(self.get(f, s, sp))
        return out

    def get(self, feature: str, subj: str, split: str) -> FeatureArray:
        path = array_path(feature, normalize_subj(subj) if str(subj).isdigit() else subj, split)
        try:
            with zarr.config.set(_WRITE_CONFIG):  # captured when the array is opened (zarr >= 3.1.3)
                arr = zarr.open_array(self.zstore, path=path, mode="r" if self.read_only else "a")
        except Exception:  # noqa: BLE001
            have = self.list_arrays()
            raise NotFoundInStoreError(
                f"{self.location} has no array {path}; it contains: {', '.join(have) if have else 'nothing'}"
            ) from None
        return FeatureArray(self, path, arr)

    def exists(self, feature: str, subj: str, split: str) -> bool:
        return bool(_chunkio.run(self.zstore.exists(f"{array_path(feature, subj, split)}/zarr.json")))

    # ---- creation ---------------------------------------------------------------------------------------------
    def prepare(
        self,
        feature: str,
        subj: str,
        split: str,
        *,
        shape: tuple[int, int, int],
        chunk: int,
        dtype: str,
        meta: dict[str, Any],
        fingerprint: dict[str, Any],
        overwrite: bool = False,
        codec: str | None = None,
        pack: int = 1,
    ) -> tuple[FeatureArray, bool]:
        """Open the array for (feature, subj, split), creating it race-free; returns (array, created).

        Several processes may call this at once (`--shard`): the array metadata is written with
        `set_if_not_exists`, so exactly one definition wins and everyone then checks its fingerprint.
        `overwrite` starts the array over only when its configuration differs (saying what is discarded).
        An existing array resumes in its own storage format, and in its own codec unless `codec` is given (None:
        DEFAULT_CODEC for a new array): a store begun by an older featstore, or with an older default, is finished
        as it was begun, not refused.
        """
        path = array_path(feature, subj, split)
        uid = uuid.uuid4().hex[:16]
        mem = MemoryStore()
        chunks = (chunk,) + tuple(shape[1:])
        arr = zarr.create_array(
            mem, name=path, shape=shape, chunks=chunks, dtype=dtype,
            shards=(chunk * pack,) + tuple(shape[1:]) if pack > 1 else None,
            compressors=compressors(codec or DEFAULT_CODEC, dtype), fill_value=np.nan,
            dimension_names=(image_dim(split), TOKEN_DIM, CHANNEL_DIM),
        )
        fingerprint = _jsonable({  # as stored (tuples become lists: the sharding codec's chunk_shape is a tuple)
            **fingerprint, "format_version": FORMAT_VERSION, "shape": list(shape), "dtype": dtype,
            "chunks": list(arr.chunks), "pack": pack, "codecs": [c.to_dict() for c in arr.metadata.codecs],
        })
        arr.attrs.update({
            ATTR_KEY: {**meta, "format_version": FORMAT_VERSION, "uid": uid, "fingerprint": fingerprint},
            "coordinates": f"{split}_nsd_id",  # CF/xarray: the NSD ids label the images too
        })
        for parent in (feature, f"{feature}/{subj}"):
            _open_group(self.zstore, parent)
        key = f"{path}/zarr.json"
        kept = ("format_version", "codecs") if codec is None else ("format_version",)  # storage, not values
        if _chunkio.run(self.zstore.exists(key)):
            existing = self.get(feature, subj, split)
            diff = fingerprint_diff(existing.fingerprint, fingerprint, existing.meta, meta, ignore=kept)
            if not diff:
                if existing.format_version == FORMAT_VERSION:
                    self._write_coordinates(split, f"{feature}/{subj}", meta.get("image_names", []))
                return existing, False
            if not overwrite:
                raise FingerprintMismatchError(
                    f"{path} in {self.location} was made by a different configuration ({diff}); "
                    "nothing was changed; rerun with --overwrite to start this array over"
                )
            done = int(existing.done_mask().sum())
            import logging

            logging.getLogger(__name__).warning(
                "--overwrite: discarding %s (%d/%d chunks done) because its configuration changed (%s)",
                path, done, existing.nchunks, diff,
            )
            self.delete(path)
        blob = _chunkio.run(mem.get(key, _proto()))
        _chunkio.run(_set_if_not_exists(self.zstore, key, blob))
        fa = self.get(feature, subj, split)
        if fa.uid != uid:  # another process created it first: same checks as above
            diff = fingerprint_diff(fa.fingerprint, fingerprint, fa.meta, meta, ignore=kept)
            if diff:
                raise FingerprintMismatchError(f"{path}: a concurrent writer created it differently ({diff})")
            return fa, False
        self._write_coordinates(split, f"{feature}/{subj}", meta.get("image_names", []))
        return fa, True

    def _write_coordinates(self, split: str, group: str, names: list[str]) -> None:
        """Image names and NSD ids beside the array, so xarray labels the images (idempotent, identical content)."""
        if not names or _chunkio.run(self.zstore.exists(f"{group}/{split}_nsd_id/zarr.json")):
            return
        g = _open_group(self.zstore, group)
        dims = (image_dim(split),)
        try:  # concurrent writers (--shard) write the same content; whoever loses the race to create them is fine
            img = g.create_array(f"{split}_image", shape=(len(names),), dtype=str, dimension_names=dims,
                                 overwrite=True, compressors=None)
            img[:] = np.array(names, dtype=object)
            ids = g.create_array(f"{split}_nsd_id", shape=(len(names),), dtype="int64", fill_value=-1,
                                 dimension_names=dims, overwrite=True, compressors=None)
            ids[:] = nsd_ids(names)
        except Exception:
            if not _chunkio.run(self.zstore.exists(f"{group}/{split}_nsd_id/zarr.json")):
                raise

    def delete(self, path: str) -> None:
        """Drop an array: its completion record first, so a crash midway never leaves done markers behind."""
        for k in _chunkio.list_dir(self.zstore, path):
            if k.startswith("done-"):
                _chunkio.run(self.zstore.delete_dir(f"{path}/{k}"))
        _chunkio.run(self.zstore.delete_dir(path))

    # ---- statistics (written by stats.py) -----------------------------------------------------------------------
    def save_stats(self, fa: FeatureArray, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Store small result arrays in a group next to `fa` ({split}_stats); replaces earlier results."""
        gpath = f"{fa.path}_stats"
        _chunkio.run(self.zstore.delete_dir(gpath))
        g = zarr.open_group(self.zstore, path=gpath, mode="w")
        for name, value in arrays.items():
            g.create_array(name, data=np.atleast_1d(np.asarray(value)), compressors=None)
        g.attrs[ATTR_KEY] = {"source": fa.path, "source_uid": fa.uid, **_jsonable(attrs)}

    def load_stats(self, fa: FeatureArray) -> dict[str, Any] | None:
        """The saved statistics of `fa` as {name: ndarray, "attrs": {...}}, or None if there are none (or stale)."""
        gpath = f"{fa.path}_stats"
        try:
            g = zarr.open_group(self.zstore, path=gpath, mode="r")
        except Exception:  # noqa: BLE001
            return None
        attrs = dict(g.attrs.get(ATTR_KEY, {}))
        if attrs.get("source_uid") != fa.uid:
            return None
        out: dict[str, Any] = {name: a[...] for name, a in g.arrays()}
        out["attrs"] = attrs
        return out

    # ---- derived arrays (the encoding sweep's projections) -------------------------------------------------------
    def save_derived(self, key: str, data: np.ndarray, attrs: dict[str, Any]) -> None:
        """Store a small derived array at `key` (outside the feature arrays, e.g. `_sweep/...`), replacing what was
        there. The attributes go last: an interrupted write leaves an array that `load_derived` treats as absent."""
        _chunkio.run(self.zstore.delete_dir(key))
        arr = zarr.create_array(self.zstore, name=key, data=np.asarray(data), compressors=None)
        arr.attrs[ATTR_KEY] = _jsonable(attrs)

    def load_derived(self, key: str, attrs: dict[str, Any]) -> np.ndarray | None:
        """The array saved at `key` if its attributes equal `attrs` (its fingerprint), else None."""
        try:
            arr = zarr.open_array(self.zstore, path=key, mode="r")
        except Exception:  # noqa: BLE001 - absent (or half-written: no metadata)
            return None
        if arr.attrs.get(ATTR_KEY) != _jsonable(attrs):
            return None
        return arr[...]


def _open_group(store: zarr.abc.store.Store, path: str) -> zarr.Group:
    """open_group(mode="a"), tolerating a concurrent process that created the group a moment earlier."""
    try:
        return zarr.open_group(store, path=path, mode="a")
    except Exception:  # noqa: BLE001 - ContainsGroupError from the race; a real problem raises again below
        return zarr.open_group(store, path=path, mode="r+")


def is_url(root: Any) -> bool:
    return isinstance(root, str) and "://" in root


def _fsspec_store(url: str, storage_options: dict[str, Any] | None, read_only: bool) -> FsspecStore:
    """zarr's own fsspec store; credentials and endpoint come from the standard environment or storage_options."""
    opts = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):  # botocore reads AWS_ENDPOINT_URL(_S3) and the credentials itself
        opts.setdefault("use_listings_cache", False)  # see other processes' done markers at once
        opts.setdefault("max_concurrency", 1)  # one GET per chunk instead of HEAD + GET
    try:
        return FsspecStore.from_url(url, storage_options=opts or None, read_only=read_only)
    except Exception as e:  # noqa: BLE001 - missing protocol package, bad options
        raise StoreError(f"{url}: cannot open ({one_line(e)})") from None


async def _set_if_not_exists(store: zarr.abc.store.Store, key: str, blob) -> None:
    """Atomic where the backend can: LocalStore (O_EXCL) and S3 (If-None-Match: *); zarr's FsspecStore version is
    check-then-write. Callers re-read the uid to see who won; elsewhere a lost race only wastes the loser's work."""
    if isinstance(store, FsspecStore) and "s3" in store.fs.protocol:
        try:
            await store.fs._pipe_file(f"{store.path}/{key}", blob.to_bytes(), mode="create")
        except FileExistsError:
            pass
        return
    await store.set_if_not_exists(key, blob)


def _proto():
    from zarr.buffer import default_buffer_prototype  # the public module (zarr.core is private)

    return default_buffer_prototype()


def check_writable_dir(path: Path, flag: str) -> None:
    """Fail early, before any model is loaded, if `path` cannot hold a store."""
    import os

    p = Path(path)
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"{flag} {p}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StoreError(f"{flag} {p}: {probe} is not writable")
    try:  # access() says yes to root everywhere; /proc or a read-only mount only say no to a real write
        import tempfile

        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise StoreError(f"{flag} {p}: cannot write in {probe} ({e.strerror})") from None
    if p.exists() and any(p.iterdir()) and not (p / "zarr.json").is_file():
        raise StoreError(f"{flag} {p}: folder exists, is not empty and is not a featstore store")


def fingerprint_diff(old: dict, new: dict, old_meta: dict | None = None, new_meta: dict | None = None,
                     ignore: tuple[str, ...] = ()) -> str:
    """Human-readable summary of what differs between two fingerprints ('' when equal), leaving out the keys in
    `ignore` (how an array is stored, never what its values are)."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        if k in ignore or (k == "format_version" and old.get(k, 0) == new.get(k, 0)):
            continue
        if k == "pack" and old.get(k, 1) == new.get(k, 1):
            continue
        if old.get(k) == new.get(k):
            continue
        if k == "images" and old_meta and new_meta:
            diffs.append(image_list_diff(old_meta.get("image_names", []), new_meta.get("image_names", [])))
        elif k == "codecs" and _codec_label(old.get(k)) != _codec_label(new.get(k)):
            diffs.append(f"codec: stored {_codec_label(old.get(k))} vs now {_codec_label(new.get(k))}")
        else:
            diffs.append(_value_diff(k, old.get(k), new.get(k)))
    return "; ".join(diffs)


def _codec_label(codecs: list[dict] | None) -> str:
    """'none', 'blosc lz4 shuffle', ...: the compression steps of a codec list, as --codec users think of them."""
    steps = []
    for c in codecs or []:
        cfg = c.get("configuration", {})
        if c.get("name") == "blosc":
            steps.append(f"blosc {cfg.get('cname')} {cfg.get('shuffle')}")
        elif c.get("name") not in ("bytes", "crc32c"):
            steps.append(str(c.get("name")))
    return " + ".join(steps) or "none"


def _value_diff(key: str, old: Any, new: Any) -> str:
    """The first place where two JSON values differ, so long values (codec lists) never look identical."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            if old.get(k) != new.get(k):
                return _value_diff(f"{key}.{k}", old.get(k), new.get(k))
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return _value_diff(f"{key}[{i}]", a, b)
    return f"{key}: stored {_short(old)} vs now {_short(new)}"


def image_list_diff(old: list[str], new: list[str]) -> str:
    if len(old) != len(new):
        return f"image list: stored {len(old)} images vs now {len(new)}"
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"image list: index {i} stored {a} vs now {b}"
    return "image list: same names but different file sizes"


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
