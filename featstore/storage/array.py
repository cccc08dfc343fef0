"""One stored feature array: what it holds, its completion record, and its chunk-level write, read and verify."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import CorruptChunkError, IncompleteArrayError
from ._zarr_compat import codec_steps, decoder, encoder, fsync_all, io_pool, list_prefix, put_file, raw_reader, run
from .completion import CompletionRecord, WriterLock
from .schema import ATTR_KEY, codec_name, split_path


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

    A "unit" is what one write fills and one done marker covers: a chunk, or a whole pack (a Zarr shard of K chunks)
    with --pack K. Messages name it (`unit`, `units`), so a count of packs never reads as a count of chunks.
    """

    def __init__(self, store: Any, path: str, array: zarr.Array):
        """`store`: the FeatureStore that holds the array (its zarr store, local folder and location)."""
        self.store = store
        self.path = path
        self.zarr = array
        self.meta: dict[str, Any] = dict(array.attrs.get(ATTR_KEY, {}))
        shards = getattr(array, "shards", None)
        self.chunk_len = int(shards[0] if shards else array.chunks[0])  # rows per unit
        self.nchunks = -(-int(array.shape[0]) // self.chunk_len)
        self.record = CompletionRecord(store.zstore, path, self.uid, self.nchunks, store.local_root,
                                       fast=store.plain_local)

    def add_provenance(self, items: dict[str, Any]) -> None:
        """Add what is measured while the array is filled (the error of --precision vs float32) to its attributes,
        read afresh so that nothing another process added is lost; the fingerprint is never touched."""
        arr = zarr.open_array(self.store.zstore, path=self.path, mode="r+")
        meta = dict(arr.attrs.get(ATTR_KEY, {}))
        if meta.get("uid") != self.uid:
            return  # replaced meanwhile (--overwrite elsewhere): not ours to annotate
        meta.update({k: v for k, v in items.items() if k not in ("fingerprint", "uid", "format_version")})
        arr.update_attributes({ATTR_KEY: meta})
        self.meta = meta

    # ---- description -------------------------------------------------------------------------------------------
    @property
    def feature(self) -> str:
        return split_path(self.path)[0]

    @property
    def subj(self) -> str:
        return split_path(self.path)[1]

    @property
    def split(self) -> str:
        return split_path(self.path)[2]

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

    @property
    def unit(self) -> str:
        """What one done marker covers, in messages: "chunk", or "pack" when K chunks are packed in one object."""
        return "pack" if self.packed else "chunk"

    @property
    def chunks_per_unit(self) -> int:
        return self.chunk_len // int(self.zarr.chunks[0])

    def units(self, n: int) -> str:
        """`n` units with their name: "1 chunk", "5 packs"."""
        return f"{n} {self.unit}{'' if n == 1 else 's'}"

    def progress(self, done: int | None = None) -> str:
        """"20/160 chunks" or "5/5 packs": the units done out of all, named."""
        done = int(self.done_mask().sum()) if done is None else done
        return f"{done}/{self.nchunks} {self.unit}s"

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
                f"{self.path} is incomplete ({self.progress(int(mask.sum()))} done); "
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
                fsync_all(self._unit_files(root, units))
        else:  # whole chunks, encoded and written in parallel by the I/O threads, each fsync'ed right after
            data = np.asarray(data, dtype=self.dtype)
            encode = self._encoder
            jobs = [(root / self.path / self._chunk_key(i), data[(i - first_chunk) * self.chunk_len :][: self.chunk_len])
                    for i in units]
            pool = io_pool()
            for f in [pool.submit(lambda p, r: put_file(p, encode(r), durable), p, r) for p, r in jobs]:
                f.result()
            if durable:
                fsync_all([p for p, _ in jobs], files=False)
        self.record.mark_done(units, durable)
        return units

    def _unit_files(self, root: Path, units: list[int]) -> list[Path]:
        """The files holding these units: one chunk file each, or one shard file each when packed."""
        return [root / self.path / self._chunk_key(i) for i in units]

    def _chunk_key(self, i: int) -> str:
        return self.zarr.metadata.encode_chunk_key((i,) + (0,) * (len(self.shape) - 1))

    @functools.cached_property
    def _steps(self) -> list | None:
        return codec_steps(self.zarr, self.store.plain_local)

    @functools.cached_property
    def _encoder(self):
        return encoder(self.zarr, self._steps)

    @functools.cached_property
    def _decoder(self):
        return decoder(self._steps)

    @functools.cached_property
    def _raw_reader(self):
        return raw_reader(self.zarr, self._steps)

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

        On a plain local store the chunk file is read and decoded in the calling thread (_zarr_compat), which is
        2-2.5x faster than zarr's own path for one-sample chunks; without a compressor it is read straight into a
        new writeable array (a row of it). Every call reads anew and nothing is cached: a writeable result is the
        caller's own, to keep without copying (FeatureDataset's float16 items do).
        """
        if self._steps is None:
            return self.read(j)[0]
        i, r = divmod(int(j), self.chunk_len)
        key = self.store.local_root / self.path / self._chunk_key(i)
        if self._raw_reader is not None:
            try:
                return self._raw_reader(key)[r]
            except FileNotFoundError:
                raise self._corrupt(i, FileNotFoundError(f"{key} is missing")) from None
            except Exception as e:  # noqa: BLE001
                raise self._corrupt(i, e) from None
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
            f"{self.path}: {self.unit} {unit} is corrupt ({reason}); run `featstore verify --repair {where}`, "
            "then rerun the extract command to recompute it"
        )

    # ---- integrity --------------------------------------------------------------------------------------------
    def verify(self, repair: bool = False, progress: bool = False) -> VerifyReport:
        """Decode every done unit (the crc32c codec checks its checksum); list missing and corrupt units."""
        from .._progress import tqdm

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
        for i in tqdm(np.flatnonzero(mask), desc=f"verify {self.path}", disable=not progress, unit=self.unit):
            a, b = self.chunk_range(int(i))
            try:
                if not self.packed and not run(
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
        """What `featstore info` shows. The ratios set the raw bytes of the done units against the stored bytes of
        those same units, so neither a partial array nor the files of units written but never marked done (a run
        stopped by a full disk) skew them; "bytes_on_disk" is everything the array takes."""
        mask = self.done_mask()
        done = [int(i) for i in np.flatnonzero(mask)]
        rows_done = sum(b - a for a, b in map(self.chunk_range, done))
        raw = rows_done * int(np.prod(self.shape[1:]))
        stored = self.nbytes_units(done)
        return {
            "path": self.path, "shape": self.shape, "dtype": str(self.dtype), "chunks": tuple(self.zarr.chunks),
            "unit": self.unit, "chunks_per_unit": self.chunks_per_unit,
            "bytes_on_disk": self.nbytes_stored(), "bytes_done": stored,
            "ratio": raw * self.dtype.itemsize / stored if stored and raw else float("nan"),
            "ratio_vs_float32": raw * 4 / stored if stored and raw else float("nan"),
            "done": len(done), "total": self.nchunks, "weights": self.meta.get("weights", {}),
            "codec": codec_name([c.to_dict() for c in self.zarr.metadata.codecs]),
        }

    def nbytes_stored(self) -> int:
        """Bytes of everything under the array: its units (done or not), metadata and completion record. A file
        that a concurrent writer (another --shard) renames away while it is counted (its temp file) counts 0."""
        return int(run(_sizes(self.store.zstore, list_prefix(self.store.zstore, f"{self.path}/"))))

    def nbytes_units(self, units: list[int]) -> int:
        """Stored bytes of these units' objects (a missing one counts 0): one stat each on a local disk."""
        if self.store.local_root is not None:
            total = 0
            for p in self._unit_files(self.store.local_root, units):
                try:
                    total += p.stat().st_size
                except FileNotFoundError:
                    pass
            return total
        return int(run(_sizes(self.store.zstore, [f"{self.path}/{self._chunk_key(i)}" for i in units])))


async def _sizes(store: zarr.abc.store.Store, keys: list[str]) -> int:
    """Sum of the sizes of `keys` (missing ones count 0), a bounded number of requests in flight."""
    import asyncio

    sem = asyncio.Semaphore(int(zarr.config.get("async.concurrency") or 10))

    async def one(key: str) -> int:
        async with sem:
            try:
                return int(await store.getsize(key))
            except FileNotFoundError:
                return 0

    return sum(await asyncio.gather(*map(one, keys)))
