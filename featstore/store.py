"""The Zarr schema: array paths, chunking, codecs, provenance attributes and the completion record.

This is the only module that knows Zarr paths and attribute names; everything else asks it.

Layout of a store (a Zarr v3 group):
    {feature}/{subj}/{split}                 float16/float32 array (N, T, C), chunks of K samples
    {feature}/{subj}/{split}/done-{uid}/{i}  empty key: chunk i is durably written (the completion record)
    {feature}/{subj}/{split}_stats           group of small arrays written by `featstore stats`

The completion record cannot lie: a chunk's marker is written only after the chunk itself has been written
(atomically, by zarr's temp-file + rename) and fsync'ed; markers live under the array's own random `uid`, so markers
of an earlier incarnation of the array (before `--overwrite`) never count.
"""
from __future__ import annotations

import functools
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.codec import SupportsSyncCodec
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore, _local

from .errors import (
    FingerprintMismatchError,
    IncompleteArrayError,
    NotFoundInStoreError,
    StoreError,
)

DIMENSION_NAMES = ("image", "token", "channel")
ATTR_KEY = "featstore"  # all featstore provenance lives under this attribute
_WRITE_CONFIG = {"write_empty_chunks": True}  # every done chunk has a file: a missing file is corruption
IO_THREADS = 4  # threads that encode, write and fsync chunks: fsync waits overlap each other and the encoding


def default_compressors(dtype: str) -> list:
    """Blosc lz4 with byte shuffle (fast enough to keep up with a GPU), then a crc32c checksum per chunk."""
    return [
        BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=np.dtype(dtype).itemsize),
        Crc32cCodec(),
    ]


def _as_store(root: str | Path | zarr.abc.store.Store, read_only: bool):
    if isinstance(root, zarr.abc.store.Store):
        return root
    return LocalStore(Path(root), read_only=read_only)


def _buf(data: bytes):
    return default_buffer_prototype().buffer.from_bytes(data)


async def _alist(agen) -> list[str]:
    return [k async for k in agen]


@dataclass
class VerifyReport:
    path: str
    total: int
    done: int
    corrupt: list[int]  # chunk indices marked done whose data fails to decode or checksum
    missing: list[int]  # chunk indices not marked done
    problems: list[str]  # shape/dtype/attribute disagreements

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.problems)


class FeatureArray:
    """One (N, T, C) feature array plus its completion record."""

    def __init__(self, store: FeatureStore, path: str, array: zarr.Array):
        self.store = store
        self.path = path
        self.zarr = array.with_config(_WRITE_CONFIG)
        self.meta: dict[str, Any] = dict(array.attrs.get(ATTR_KEY, {}))
        self.chunk_len = int(array.chunks[0])
        self.nchunks = -(-int(array.shape[0]) // self.chunk_len)
        self._done_prefix = f"{path}/done-{self.meta.get('uid', 'none')}"

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

    def chunk_range(self, i: int) -> tuple[int, int]:
        return i * self.chunk_len, min((i + 1) * self.chunk_len, self.shape[0])

    # ---- completion record ------------------------------------------------------------------------------------
    def done_mask(self) -> np.ndarray:
        """Boolean (nchunks,): which chunks are durably written. One directory listing, no chunk reads."""
        keys = sync(_alist(self.store.zstore.list_dir(self._done_prefix)))
        mask = np.zeros(self.nchunks, dtype=bool)
        for k in keys:
            if k.isdigit() and int(k) < self.nchunks:
                mask[int(k)] = True
        return mask

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
        for i in chunks:
            sync(self.store.zstore.delete(f"{self._done_prefix}/{i}"))

    # ---- write path -------------------------------------------------------------------------------------------
    def write_chunks(self, first_chunk: int, data: np.ndarray, durable: bool = True) -> list[int]:
        """Write whole chunks starting at chunk `first_chunk` (no read-modify-write), then mark them done."""
        start = first_chunk * self.chunk_len
        stop = start + data.shape[0]
        if stop != self.shape[0] and data.shape[0] % self.chunk_len:
            raise ValueError(f"write of {data.shape[0]} rows at {start} is not chunk-aligned")
        chunks = list(range(first_chunk, -(-stop // self.chunk_len)))
        encode = self._sync_encoder
        if encode is None:
            self.zarr[start:stop] = data
        else:  # whole chunks, encoded and written in parallel by the store's I/O threads
            data = np.asarray(data, dtype=self.dtype)
            if data.shape[1:] != self.shape[1:]:
                raise ValueError(f"rows of shape {data.shape[1:]} written to {self.path} of shape {self.shape}")
            root = self.store.local_root / self.path
            jobs = [(root / self._chunk_key(i), data[(i - first_chunk) * self.chunk_len :][: self.chunk_len])
                    for i in chunks]
            for f in [_io_pool().submit(_put_chunk, p, rows, encode, durable) for p, rows in jobs]:
                f.result()
        if durable:  # the sync path fsync'ed each file right after writing it; the folders remain
            self.store._fsync_keys([f"{self.path}/{self._chunk_key(i)}" for i in chunks], files=encode is None)
        for i in chunks:
            if encode is not None:  # same function as zarr's LocalStore.set, without the event-loop hop
                _local._put(self.store.local_root / self._done_prefix / str(i), _buf(b""))
            else:
                sync(self.store.zstore.set(f"{self._done_prefix}/{i}", _buf(b"")))
        return chunks

    @functools.cached_property
    def _codec_steps(self) -> list | None:
        """[(codec, chunk spec it sees)] in encode order, for running zarr's own codecs synchronously; None for
        wrapped/remote stores and codecs without a sync path (e.g. sharding), which keep zarr's own read/write path."""
        codecs = list(self.zarr.metadata.codecs)  # array->array, array->bytes, bytes->bytes
        if type(self.store.zstore) is not LocalStore or not all(isinstance(c, SupportsSyncCodec) for c in codecs):
            return None
        spec = self.zarr.metadata.get_chunk_spec((0,) * self.zarr.ndim, self.zarr.config, default_buffer_prototype())
        steps = []
        for codec in codecs:
            steps.append((codec, spec))
            spec = codec.resolve_metadata(spec)
        return steps

    @functools.cached_property
    def _sync_encoder(self):
        """rows of one chunk -> encoded bytes (zarr's own codecs, synchronously), or None where zarr's write path
        applies. zarr's path hops between its event loop and thread pool several times per chunk, which costs
        more than encoding it; this one pads an edge chunk with the fill value exactly as zarr does."""
        if self._codec_steps is None:
            return None
        prototype, steps = default_buffer_prototype(), self._codec_steps
        chunk_shape = (self.chunk_len, *self.shape[1:])
        fill = self.zarr.metadata.fill_value

        def encode(rows: np.ndarray):
            if rows.shape != chunk_shape:
                full = np.full(chunk_shape, fill, dtype=self.dtype)
                full[: len(rows)] = rows
                rows = full
            buf = prototype.nd_buffer.from_numpy_array(np.ascontiguousarray(rows))
            for codec, spec in steps:
                buf = codec._encode_sync(buf, spec)
            return buf

        return encode

    def _chunk_key(self, i: int) -> str:
        return self.zarr.metadata.encode_chunk_key((i,) + (0,) * (len(self.shape) - 1))

    def clean_partials(self, chunks: list[int] | None = None) -> int:
        """Remove stray `*.partial` temp files left by a killed writer; only for `chunks` (this writer's share),
        so a concurrent writer's in-flight temp files are never touched. Returns how many were removed."""
        root = self.store.local_root
        if root is None:
            return 0
        base = root / self.path
        wanted = None if chunks is None else set(chunks)
        removed = 0
        for p in base.rglob("*.partial"):
            rel = p.relative_to(base).parts
            idx = rel[1] if rel[0] == "c" else rel[1].split(".")[0] if rel[0].startswith("done-") else None
            if wanted is None or (idx is not None and idx.isdigit() and int(idx) in wanted):
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    # ---- read path --------------------------------------------------------------------------------------------
    def read(self, start: int, stop: int | None = None) -> np.ndarray:
        """Samples [start, stop) as stored (no completeness check: callers check `done_mask` once)."""
        return self.zarr[start : start + 1 if stop is None else stop]

    # ---- integrity --------------------------------------------------------------------------------------------
    def verify(self, repair: bool = False, progress: bool = False) -> VerifyReport:
        """Decode every done chunk (the crc32c codec checks its checksum); list missing and corrupt chunks."""
        from tqdm.auto import tqdm

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
            key = f"{self.path}/{self._chunk_key(int(i))}"
            try:
                if not sync(self.store.zstore.exists(key)):
                    raise ValueError("chunk file missing")
                self.read(*self.chunk_range(int(i)))
            except Exception:  # any decode/checksum failure means this chunk must be recomputed  # noqa: BLE001
                corrupt.append(int(i))
        if repair and corrupt:
            self.mark_undone(corrupt)
        missing = [int(i) for i in np.flatnonzero(~mask)]
        return VerifyReport(self.path, self.nchunks, int(mask.sum()), corrupt, missing, problems)

    def summary(self) -> dict[str, Any]:
        """What `featstore info` shows for this array."""
        disk = self.nbytes_stored()
        return {
            "path": self.path, "shape": self.shape, "dtype": str(self.dtype), "chunks": tuple(self.zarr.chunks),
            "bytes_on_disk": disk, "ratio": self.zarr.nbytes / disk if disk else float("nan"),
            "ratio_vs_float32": self.zarr.size * 4 / disk if disk else float("nan"),
            "done": int(self.done_mask().sum()), "total": self.nchunks, "weights": self.meta.get("weights", {}),
        }

    def nbytes_stored(self) -> int:
        return int(sync(self.store.zstore.getsize_prefix(self.path)))

    # ---- single-sample read (dataset.py's per-item path) ------------------------------------------------------
    def read_sample(self, j: int) -> np.ndarray:
        """Sample j as stored, (T, C), possibly a read-only view; no completeness check (callers check once).

        zarr hands every read to its event-loop thread and from there to a thread pool, several thread switches
        per call that cost more than decoding one chunk. For a plain local store this reads the chunk file and
        runs the array's own codecs' synchronous decode (checksum included) in the calling thread instead.
        """
        decode = self._sync_decoder
        if decode is None:
            return self.zarr[j]
        i, r = divmod(int(j), self.chunk_len)
        key = f"{self.store.local_root}/{self.path}/{self._chunk_key(i)}"
        try:
            with open(key, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StoreError(
                f"{self.path}: chunk {i} is marked done but {key} is missing; run `featstore verify --repair`"
            ) from None
        return decode(data)[r]

    @functools.cached_property
    def _sync_decoder(self):
        """bytes of one chunk file -> ndarray, or None where only zarr's own read path applies."""
        if self._codec_steps is None:
            return None
        prototype, steps = default_buffer_prototype(), self._codec_steps[::-1]

        def decode(data: bytes) -> np.ndarray:
            buf = prototype.buffer.from_bytes(data)
            for codec, spec in steps:
                buf = codec._decode_sync(buf, spec)
            return buf.as_numpy_array()

        return decode


class FeatureStore:
    """A featstore Zarr group on local disk (or any zarr Store object, e.g. a wrapper used in tests)."""

    def __init__(self, root: str | Path | zarr.abc.store.Store, mode: str = "r"):
        self.read_only = mode == "r"
        self.zstore = _as_store(root, self.read_only)
        self.local_root: Path | None = None
        inner = self.zstore
        while inner is not None and not isinstance(inner, LocalStore):
            inner = getattr(inner, "_store", None)
        if isinstance(inner, LocalStore):
            self.local_root = Path(inner.root)
        self.location = str(self.local_root) if self.local_root else repr(self.zstore)
        if self.read_only:
            if self.local_root is not None and not (self.local_root / "zarr.json").is_file():
                raise StoreError(f"{self.location}: not a featstore store (no zarr.json)")
            try:
                self.root = zarr.open_group(self.zstore, mode="r")
            except Exception as e:  # zarr raises several types for "not a group"  # noqa: BLE001
                raise StoreError(f"{self.location}: cannot open as a Zarr group ({type(e).__name__}: {e})") from None
        else:
            if self.local_root is not None:
                check_writable_dir(self.local_root, "--output_dir")
            self.root = zarr.open_group(self.zstore, mode="a")

    # ---- discovery --------------------------------------------------------------------------------------------
    def list_arrays(self) -> list[str]:
        """All feature arrays as 'feature/subj/split', sorted."""
        out = []
        for fname, fgroup in self.root.groups():
            for sname, sgroup in fgroup.groups():
                for aname, arr in sgroup.arrays():
                    if ATTR_KEY in arr.attrs:
                        out.append(f"{fname}/{sname}/{aname}")
        return sorted(out)

    def get(self, feature: str, subj: str, split: str) -> FeatureArray:
        path = f"{feature}/{subj}/{split}"
        try:
            arr = zarr.open_array(self.zstore, path=path, mode="r" if self.read_only else "a")
        except Exception:  # noqa: BLE001
            have = self.list_arrays()
            raise NotFoundInStoreError(
                f"{self.location} has no array {path}; it contains: {', '.join(have) if have else 'nothing'}"
            ) from None
        return FeatureArray(self, path, arr)

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
        compressors: list | None = None,
    ) -> tuple[FeatureArray, bool]:
        """Open the array for (feature, subj, split), creating it race-free; returns (array, created).

        Several processes may call this at once (`--shard`): the array metadata is written with
        `set_if_not_exists`, so exactly one definition wins and everyone then checks its fingerprint.
        """
        path = f"{feature}/{subj}/{split}"
        compressors = compressors or default_compressors(dtype)
        uid = uuid.uuid4().hex[:16]
        mem = MemoryStore()
        arr = zarr.create_array(
            mem,
            name=path,
            shape=shape,
            chunks=(chunk,) + tuple(shape[1:]),
            dtype=dtype,
            compressors=compressors,
            fill_value=0,
            dimension_names=DIMENSION_NAMES,
        )
        fingerprint = {
            **fingerprint,
            "shape": list(shape),
            "dtype": dtype,
            "chunks": list(arr.chunks),
            "codecs": [c.to_dict() for c in arr.metadata.codecs],
        }
        arr.attrs[ATTR_KEY] = {**meta, "uid": uid, "fingerprint": fingerprint}
        for parent in (feature, f"{feature}/{subj}"):
            zarr.open_group(self.zstore, path=parent, mode="a")
        key = f"{path}/zarr.json"
        if overwrite:
            self.delete(path)
        elif sync(self.zstore.exists(key)):
            existing = self.get(feature, subj, split)
            diff = fingerprint_diff(existing.fingerprint, fingerprint, existing.meta, meta)
            if diff:
                raise FingerprintMismatchError(
                    f"{path} in {self.location} was made by a different configuration ({diff}); "
                    "nothing was changed; rerun with --overwrite to start this array over"
                )
            return existing, False
        blob = sync(mem.get(key, default_buffer_prototype()))
        sync(self.zstore.set_if_not_exists(key, blob))
        fa = self.get(feature, subj, split)
        if fa.meta.get("uid") != uid:  # another process created it first: same checks as above
            diff = fingerprint_diff(fa.fingerprint, fingerprint, fa.meta, meta)
            if diff:
                raise FingerprintMismatchError(f"{path}: a concurrent writer created it differently ({diff})")
            return fa, False
        return fa, True

    def delete(self, path: str) -> None:
        """Drop an array: its completion record first, so a crash midway never leaves done markers behind."""
        for k in sync(_alist(self.zstore.list_dir(path))):
            if k.startswith("done-"):
                sync(self.zstore.delete_dir(f"{path}/{k}"))
        sync(self.zstore.delete_dir(path))

    # ---- statistics (written by stats.py) -----------------------------------------------------------------------
    def save_stats(self, fa: FeatureArray, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Store small result arrays in a group next to `fa` ({split}_stats); replaces earlier results."""
        gpath = f"{fa.path}_stats"
        sync(self.zstore.delete_dir(gpath))
        g = zarr.open_group(self.zstore, path=gpath, mode="w")
        for name, value in arrays.items():
            g.create_array(name, data=np.atleast_1d(np.asarray(value)), compressors=None)
        g.attrs[ATTR_KEY] = {"source": fa.path, "source_uid": fa.meta.get("uid"), **_jsonable(attrs)}

    def load_stats(self, fa: FeatureArray) -> dict[str, Any] | None:
        """The saved statistics of `fa` as {name: ndarray, "attrs": {...}}, or None if there are none (or stale)."""
        gpath = f"{fa.path}_stats"
        try:
            g = zarr.open_group(self.zstore, path=gpath, mode="r")
        except Exception:  # noqa: BLE001
            return None
        attrs = dict(g.attrs.get(ATTR_KEY, {}))
        if attrs.get("source_uid") != fa.meta.get("uid"):
            return None
        out: dict[str, Any] = {name: a[...] for name, a in g.arrays()}
        out["attrs"] = attrs
        return out

    # ---- durability -------------------------------------------------------------------------------------------
    def _fsync_keys(self, keys: list[str], files: bool = True) -> None:
        """fsync the files (unless already done), then their folders. In parallel: each fsync mostly waits for the
        disk, and the file system commits concurrent ones together (4 threads: ~4x the fsyncs per second of one)."""
        if self.local_root is None:
            return
        paths = [self.local_root / k for k in keys]
        if files:
            list(_io_pool().map(_fsync_path, paths))
        # the renames that published the chunks must be durable too
        list(_io_pool().map(_fsync_path, sorted({p.parent for p in paths})))


def _put_chunk(path: Path, rows: np.ndarray, encode, durable: bool) -> None:
    """Encode and write one chunk file; with `durable`, fsync it at once, so that the disk works while other threads
    encode (the fsync in `write_chunks` that the done markers wait for then finds little left to do)."""
    _local._put(path, encode(rows))
    if durable:
        _fsync_path(path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_pool() -> ThreadPoolExecutor:
    """Threads that encode (blosc releases the GIL), write and fsync chunk files; one pool per process (a forked
    child inherits the parent's pool object but none of its threads)."""
    return _io_pool_of(os.getpid())


@functools.cache
def _io_pool_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="featstore-io")


def check_writable_dir(path: Path, flag: str) -> None:
    """Fail early, before any model is loaded, if `path` cannot hold a store."""
    p = Path(path)
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"{flag} {p}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StoreError(f"{flag} {p}: {probe} is not writable")
    if p.exists() and any(p.iterdir()) and not (p / "zarr.json").is_file():
        raise StoreError(f"{flag} {p}: folder exists, is not empty and is not a featstore store")


def fingerprint_diff(old: dict, new: dict, old_meta: dict | None = None, new_meta: dict | None = None) -> str:
    """Human-readable summary of what differs between two fingerprints ('' when equal)."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) == new.get(k):
            continue
        if k == "images" and old_meta and new_meta:
            diffs.append(image_list_diff(old_meta.get("image_names", []), new_meta.get("image_names", [])))
        else:
            diffs.append(f"{k}: stored {_short(old.get(k))} vs now {_short(new.get(k))}")
    return "; ".join(diffs)


def image_list_diff(old: list[str], new: list[str]) -> str:
    if len(old) != len(new):
        return f"image list: stored {len(old)} images vs now {len(new)}"
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"image list: index {i} stored {a} vs now {b}"
    return "image list: same names but different file sizes"


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
