"""Streaming .npy export in the legacy layout: OUT/{feature}/{subj}/{split}.npy, float32, chunk by chunk."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .errors import NotFoundInStoreError, StoreError
from .store import FeatureStore

log = logging.getLogger(__name__)


def export_npy(
    store: str | Path | FeatureStore,
    output_dir: str | Path,
    feature: str | None = None,
    subj: str | None = None,
    split: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write each selected, complete array as a float32 .npy through a memmap, one chunk run at a time.

    RAM stays bounded by one block of chunks; the file is written under a temporary name and renamed at the end,
    so an interrupted export never leaves a truncated file that looks finished.
    """
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store, mode="r")
    selected = []
    for path in fs.list_arrays():
        f, s, sp = path.split("/")
        if (feature is None or f == feature) and (subj is None or s == subj) and (split is None or sp == split):
            selected.append((f, s, sp))
    if not selected:
        wanted = "/".join(x or "*" for x in (feature, subj, split))
        raise NotFoundInStoreError(
            f"{fs.location} has no array matching {wanted}; it contains: {', '.join(fs.list_arrays()) or 'nothing'}"
        )
    arrays = [fs.get(*sel) for sel in selected]
    for fa in arrays:  # all or nothing: refuse before writing any file
        fa.require_complete("exporting it")
    out = Path(output_dir)
    written = []
    for fa in arrays:
        f, s, sp = fa.path.split("/")
        dest = out / f / s / f"{sp}.npy"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"--output_dir {out}: cannot create {dest.parent} ({e.strerror})") from None
        tmp = dest.with_name(dest.name + ".partial")
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=fa.shape)
        step = max(fa.chunk_len, (64 << 20) // max(1, int(np.prod(fa.shape[1:])) * 4) // fa.chunk_len * fa.chunk_len)
        for a in tqdm(range(0, fa.shape[0], step), desc=f"export {fa.path}", unit="block", disable=not progress):
            mm[a : a + step] = fa.read(a, min(a + step, fa.shape[0]))
        mm.flush()
        del mm
        tmp.replace(dest)
        log.info("wrote %s %s", dest, fa.shape)
        written.append(dest)
    return written
