"""The only place that uses zarr's and s3fs's internals; each is probed once, with zarr's public API as fallback.

Fast local chunk I/O over zarr internals, used only where the installed zarr offers them.

zarr's public read/write path hands every chunk to its event loop and from there to a thread pool: several thread
switches per chunk that cost more than encoding a one-sample chunk. For a plain local store, featstore instead runs
the array's own codecs synchronously and writes the chunk file with zarr's own atomic temp-file + rename. That needs
three zarr internals, all checked here, once:

- ``zarr.abc.codec.SupportsSyncCodec`` (zarr >= 3.1.6) and the codecs' ``_encode_sync`` / ``_decode_sync``;
- ``zarr.storage._local._put`` (the atomic write LocalStore.set uses; zarr >= 3.1.3);
- ``zarr.core.sync.sync`` (run a store coroutine from sync code).

Where any is missing (or the configuration says ``chunkio: public``, FEATSTORE_CHUNKIO=public), zarr's public API
is used instead; CI runs the store, resume and dataset tests on both paths, and the suite checks that they write
identical bytes and read identical values. `path_in_use()` says which one this process takes.

Also here: s3fs's private ``_pipe_file(..., mode="create")`` (a conditional PUT, If-None-Match: *), so parallel
writers cannot overwrite each other's array definition (fallback: zarr's check-then-write), and the wrapper stores'
``_store`` attribute, to find the local folder under a wrapper (fallback: none, zarr's own path).
"""
from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.buffer import default_buffer_prototype
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


# ---- synchronous codecs -----------------------------------------------------------------------------------------------
def codec_steps(arr: zarr.Array, local: bool) -> list | None:
    """[(codec, chunk spec it sees)] in encode order, or None where zarr's own path must be used (remote stores,
    codecs without a sync path such as sharding, a zarr without the internals, or the public override)."""
    if not (local and fast_enabled()):
        return None
    codecs = list(arr.metadata.codecs)  # array->array, array->bytes, bytes->bytes
    if not all(isinstance(c, SupportsSyncCodec) for c in codecs):
        return None
    spec = arr.metadata.get_chunk_spec((0,) * arr.ndim, arr.config, default_buffer_prototype())
    steps = []
    for codec in codecs:
        steps.append((codec, spec))
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
