"""Streaming .npy export in the legacy layout: OUT/{feature}/{subj}/{split}.npy, float32, chunk by chunk."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ._progress import tqdm
from .config import positive_int
from .errors import NotFoundInStoreError, StoreError, StoreWriteError
from .storage import FeatureArray, FeatureStore

log = logging.getLogger(__name__)



def export_npy(
    store: str | Path | FeatureStore,
    output_dir: str | Path,
    feature: str | None = None,
    subj: str | None = None,
    split: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write each selected, complete array as a float32 .npy, one storage chunk at a time.

    RAM stays bounded by a few chunks; each file is written under a temporary name (`.npy.partial`), fsync'ed and
    renamed at the end, so an export that fails or is interrupted (any exception, Ctrl-C) removes its temporary file
    and never leaves a truncated file that looks finished. A chunk that fails its checksum raises
    `CorruptChunkError` naming the array and the chunk.
    """
    fs = FeatureStore.open(store)
    arrays = fs.arrays(feature, subj, split)
    if not arrays:
        wanted = "/".join(x or "*" for x in (feature, subj, split))
        raise NotFoundInStoreError(
            f"{fs.location} has no array matching {wanted}; it contains: {', '.join(fs.list_arrays()) or 'nothing'}"
        )
    for fa in arrays:  # all or nothing: refuse before writing any file
        fa.require_complete("exporting it")
    out = Path(output_dir)
    written = []
    for fa in arrays:
        dest = out / fa.feature / fa.subj / f"{fa.split}.npy"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"--output_dir {out}: cannot create {dest.parent} ({e.strerror})") from None
        _export_one(fa, dest, progress)
        log.debug("wrote %s %s", dest, fa.shape)
        written.append(dest)
    return written


def _export_one(fa: FeatureArray, dest: Path, progress: bool) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": fa.shape}
    need = int(np.prod(fa.shape, dtype=np.int64)) * 4 + 4096
    free = shutil.disk_usage(dest.parent).free
    if free < need:
        raise StoreWriteError(
            f"--output_dir {dest.parent}: {dest.name} needs {need / 1e9:.2f} GB, only {free / 1e9:.2f} GB free; "
            "nothing was written"
        )
    tmp = dest.with_name(dest.name + ".partial")
    try:
        try:
            f = open(tmp, "wb")  # noqa: SIM115 (closed below, also on failure)
        except OSError as e:
            raise StoreError(f"--output_dir {dest.parent}: cannot create {tmp.name} ({e.strerror})") from None
        with f:
            np.lib.format.write_array_header_1_0(f, header)
            try:
                with contextlib.closing(_blocks(fa)) as blocks:  # closed at once: its reader threads stop
                    bar = tqdm(blocks, total=fa.nchunks, desc=f"export {fa.path}", unit=fa.unit,
                               disable=None if progress else True)  # None: no bar where stderr is not a terminal
                    f.writelines(block.data for block in bar)
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise StoreWriteError(f"writing {tmp} failed ({e.strerror}); nothing was kept") from None
        tmp.replace(dest)
    except BaseException:  # failure, Ctrl-C or SIGTERM: no temporary file survives
        tmp.unlink(missing_ok=True)
        raise


def _blocks(fa: FeatureArray):
    """float32 C-ordered rows of each storage chunk, in order, decoded by a few threads ahead of the writer.

    One read per storage chunk: a failing chunk is named, and no sibling reads are left pending inside zarr (their
    orphaned tasks used to fill the terminal with 'cannot schedule new futures after shutdown' at exit)."""
    per_chunk = fa.chunk_len * int(np.prod(fa.shape[1:], dtype=np.int64)) * 4
    threads = positive_int("export.read_threads")  # blosc and crc32c release the GIL
    ahead = max(threads, min(4 * threads, (positive_int("export.read_ahead_mb") << 20) // max(per_chunk, 1)))

    def read(i: int) -> np.ndarray:  # a corrupt chunk raises CorruptChunkError (one line, array and chunk)
        return np.ascontiguousarray(fa.read(*fa.chunk_range(i)), dtype="<f4")

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="featstore-export")
    pending: deque = deque()
    try:
        nxt = 0
        while nxt < fa.nchunks or pending:
            while nxt < fa.nchunks and len(pending) < ahead:
                pending.append(pool.submit(read, nxt))
                nxt += 1
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)  # in-flight reads finish: nothing left running at exit

