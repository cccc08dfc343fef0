"""The only place that uses zarr's and s3fs's internals; each is probed once, with zarr's public API as fallback.

Fast local chunk I/O over zarr internals, used only where the installed zarr offers them.

zarr's public read/write path hands every chunk to its event loop and from there to a thread pool: several thread
switches per chunk that cost more than encoding a one-sample chunk. For a plain local store, featstore instead runs
the array's own codecs synchronously and writes the chunk file with zarr's own atomic temp-file + rename. That needs
three zarr internals, all checked here, once:

- ``zarr.abc.codec.SupportsSyncCodec`` (zarr >= 3.1.6) and the codecs' ``_encode_sync`` / ``_decode_sync``;
- ``zarr.storage._local._put`` (the atomic write LocalStore.set uses; zarr >= 3.1.3);
- ``zarr.core.sync.sync`` (run a store coroutine from sync code).

zarr's wrapper of numcodecs' BitRound (the lossy `bitround-K` codec) has no sync path; the fast path runs numcodecs'
own BitRound in its place (public numcodecs API, the same function zarr's wrapper calls), so a bitround array stays
on the fast path, with bytes identical to zarr's (tested).

Where any is missing (or the configuration says ``chunkio: public``, FEATSTORE_CHUNKIO=public), zarr's public API
is used instead; CI runs the store, resume and dataset tests on both paths, and the suite checks that they write
identical bytes and read identical values. `path_in_use()` says which one this process takes.

Also here: s3fs's private ``_pipe_file(..., mode="create")`` (a conditional PUT, If-None-Match: *), so parallel
writers cannot overwrite each other's array definition (fallback: zarr's check-then-write), and the wrapper stores'
``_store`` attribute, to find the local folder under a wrapper (fallback: none, zarr's own path).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c  # zarr's own crc32c (its Crc32cCodec uses it)
import numcodecs
import numpy as np
import zarr
from zarr.buffer import default_buffer_prototype
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.codecs.numcodecs import BitRound
from zarr.storage import LocalStore

from ..config import chunkio, config, positive_int

try:  # the internals of the fast path; any one missing selects zarr's public path
    from zarr.abc.codec import SupportsSyncCodec
    from zarr.storage._local import _put as _zarr_put
except ImportError:  # pragma: no cover - older/newer zarr
    SupportsSyncCodec = None
    _zarr_put = None

try:
    from zarr.core.sync import sync as _zarr_sync
except ImportError:  # pragma: no cover
    _zarr_sync = None



def fast_available() -> bool:
    """Whether the installed zarr offers the internals of the fast path (independent of the override)."""
    return SupportsSyncCodec is not None and _zarr_put is not None


def path_in_use() -> str:
    """One line: which chunk I/O path this process takes, and why."""
    if chunkio() == "public":  # the user's explicit choice is the reason, whatever this zarr offers
        return f"zarr {zarr.__version__}: public API (configuration chunkio: public)"
    if not fast_available():
        return f"zarr {zarr.__version__}: public API (no sync codecs in this zarr)"
    return f"zarr {zarr.__version__}: fast path for local folders (sync codecs, atomic put); public API elsewhere"


def buffer_prototype():
    return default_buffer_prototype()


def local_root(store: zarr.abc.store.Store) -> Path | None:
    """The folder of a LocalStore, also under wrapper stores (their private `_store`); None for other stores."""
    inner = store
    while inner is not None and not isinstance(inner, LocalStore):
        inner = getattr(inner, "_store", None)
    return Path(inner.root) if isinstance(inner, LocalStore) else None


async def s3_create(store, key: str, data: bytes) -> None:
    """Write `key` only if it does not exist, atomically (S3 If-None-Match: *) where s3fs offers it; else zarr's
    check-then-write. A lost race is silent: callers re-read the key to see who won."""
    pipe = getattr(store.fs, "_pipe_file", None)
    if pipe is None:  # pragma: no cover - an s3fs without it
        await store.set_if_not_exists(key, buffer_prototype().buffer.from_bytes(data))
        return
    try:
        await pipe(f"{store.path}/{key}", data, mode="create")
    except FileExistsError:
        pass


def fast_enabled() -> bool:
    """The fast path is used unless the configuration says `chunkio: public` (FEATSTORE_CHUNKIO=public)."""
    return chunkio() != "public" and fast_available()


def public_path():
    """Use zarr's public API for arrays opened inside this block (tests compare both paths)."""
    return config.set(chunkio="public")


# ---- running store coroutines from sync code -------------------------------------------------------------------------
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def run(coro) -> Any:
    """Run a zarr store coroutine: on zarr's own loop where available, else on a private loop thread."""
    if _zarr_sync is not None:
        return _zarr_sync(coro)
    global _loop
    with _loop_lock:  # pragma: no cover - only without zarr.core.sync
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, daemon=True, name="featstore-loop").start()
    return asyncio.run_coroutine_threadsafe(coro, _loop).result()  # pragma: no cover


async def _alist(agen) -> list[str]:
    return [k async for k in agen]


def list_prefix(store: zarr.abc.store.Store, prefix: str) -> list[str]:
    """Every key under `prefix` (full keys)."""
    return run(_alist(store.list_prefix(prefix)))


def list_dir(store: zarr.abc.store.Store, prefix: str) -> list[str]:
    return run(_alist(store.list_dir(prefix)))


def buffer(data: bytes):
    return default_buffer_prototype().buffer.from_bytes(data)


# ---- numcodecs' BitRound --------------------------------------------------------------------------------------------
_NUMCODECS_WARNING = "Numcodecs codecs are not in the Zarr version 3 specification"


def bitround_filter(keepbits: int) -> BitRound:
    """zarr's BitRound filter, without the warning zarr gives for every numcodecs codec (the README says which
    readers know it)."""
    with quiet_numcodecs():
        return BitRound(keepbits=keepbits)


@contextlib.contextmanager
def quiet_numcodecs():
    """Opening an array that holds a numcodecs codec makes zarr warn, every time, that other zarr implementations
    may not read it: said once in the README instead of on every open."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NUMCODECS_WARNING)
        yield


class _SyncBitRound:
    """numcodecs' BitRound with the sync interface of zarr's codecs: what zarr's async wrapper does, minus the thread
    hop (encode: round, keep the integer view zarr passes on; decode: view as float, in the chunk's shape)."""

    def __init__(self, codec: BitRound):
        self.codec = numcodecs.BitRound(keepbits=int(codec.codec_config["keepbits"]))

    def _encode_sync(self, buf, spec):
        return spec.prototype.nd_buffer.from_ndarray_like(self.codec.encode(buf.as_ndarray_like()))

    def _decode_sync(self, buf, spec):
        out = self.codec.decode(buf.as_ndarray_like())
        return spec.prototype.nd_buffer.from_ndarray_like(out.reshape(spec.shape))


def _sync(codec):
    """The codec itself where it has a sync path, a sync stand-in for BitRound, else None."""
    if isinstance(codec, SupportsSyncCodec):
        return codec
    if isinstance(codec, BitRound):
        return _SyncBitRound(codec)
    return None


# ---- synchronous codecs -----------------------------------------------------------------------------------------------
def codec_steps(arr: zarr.Array, local: bool) -> list | None:
    """[(codec, chunk spec it sees)] in encode order, or None where zarr's own path must be used (remote stores,
    codecs without a sync path such as sharding, a zarr without the internals, or the public override)."""
    if not (local and fast_enabled()):
        return None
    codecs = list(arr.metadata.codecs)  # array->array, array->bytes, bytes->bytes
    runners = [_sync(c) for c in codecs]
    if any(r is None for r in runners):
        return None
    spec = arr.metadata.get_chunk_spec((0,) * arr.ndim, arr.config, default_buffer_prototype())
    steps = []
    for codec, runner in zip(codecs, runners):
        steps.append((runner, spec))
        spec = codec.resolve_metadata(spec)
    return steps


def encoder(arr: zarr.Array, steps: list) -> Callable[[np.ndarray], Any]:
    """rows of one chunk -> encoded buffer; an edge chunk is padded with the fill value exactly as zarr pads it."""
    prototype = default_buffer_prototype()
    chunk_shape = tuple(arr.chunks)
    dtype = np.dtype(arr.dtype)
    fill = arr.metadata.fill_value

    def encode(rows: np.ndarray):
        if rows.shape != chunk_shape:
            full = np.full(chunk_shape, fill, dtype=dtype)
            full[: len(rows)] = rows
            rows = full
        buf = prototype.nd_buffer.from_numpy_array(np.ascontiguousarray(rows, dtype=dtype))
        for codec, spec in steps:
            buf = codec._encode_sync(buf, spec)
        return buf

    return encode


def decoder(steps: list) -> Callable[[bytes], np.ndarray]:
    """bytes of one chunk file -> ndarray (the crc32c codec checks the checksum)."""
    prototype, rev = default_buffer_prototype(), steps[::-1]

    def decode(data: bytes) -> np.ndarray:
        buf = prototype.buffer.from_bytes(data)
        for codec, spec in rev:
            buf = codec._decode_sync(buf, spec)
        return buf.as_numpy_array()

    return decode


def raw_reader(arr: zarr.Array, steps: list | None) -> Callable[[Path], np.ndarray] | None:
    """For chunks stored as their plain bytes + crc32c (codec "none", the default): chunk file -> a new, writeable
    array the file was read straight into, its checksum checked there (one copy from the page cache, where reading
    bytes then decoding makes two and a read-only result). None for any other codec chain: use `decoder`."""
    if not steps or len(steps) != 2 or not isinstance(steps[1][0], Crc32cCodec):
        return None
    codec, dtype = steps[0][0], np.dtype(arr.dtype)
    little = sys.byteorder == "little" and (dtype.itemsize == 1 or getattr(codec.endian, "value", None) == "little")
    if not isinstance(codec, BytesCodec) or not little or dtype.byteorder == ">":
        return None
    shape = tuple(arr.chunks)
    nbytes = int(np.prod(shape)) * dtype.itemsize

    def read(path: Path) -> np.ndarray:
        buf = np.empty(nbytes + 4, np.uint8)
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != nbytes + 4:
                raise ValueError(f"{size} bytes, expected {nbytes + 4}")
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{got} bytes, expected {nbytes + 4}")
                got += n
        if np.uint32(google_crc32c.value(buf[:-4])).tobytes() != buf[-4:].tobytes():  # as zarr's Crc32cCodec
            raise ValueError("Stored and computed checksum do not match")
        return buf[:-4].view(dtype).reshape(shape)

    return read


# ---- files ------------------------------------------------------------------------------------------------------------
def put_file(path: Path, buf, durable: bool) -> None:
    """zarr's own atomic write (temp file + rename); with `durable`, fsync it at once so the disk works while other
    threads encode."""
    _zarr_put(path, buf)
    if durable:
        fsync_path(path)


def touch(path: Path) -> None:
    """An empty file, made by one create (no temp file and rename: an empty file has no content to be torn)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_all(paths: list[Path], files: bool = True) -> None:
    """fsync files (unless already done), then their folders, so the renames that published them are durable too.
    In parallel: each fsync mostly waits for the disk, and the file system commits concurrent ones together."""
    if files:
        list(io_pool().map(fsync_path, paths))
    list(io_pool().map(fsync_path, sorted({p.parent for p in paths})))


def io_pool() -> ThreadPoolExecutor:
    """One pool per process (a forked child inherits the parent's pool object but none of its threads) and thread
    count (`io_threads`: encoding, writing and fsync waits overlap each other)."""
    return _io_pool_of(os.getpid(), positive_int("io_threads"))


@functools.cache
def _io_pool_of(pid: int, threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="featstore-io")
