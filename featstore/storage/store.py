"""A store: opening it (folder or URL), finding its arrays, creating them race-free, deleting them, and the small
result groups saved next to an array."""
from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore, MemoryStore

from ..errors import FingerprintMismatchError, NotFoundInStoreError, StoreError, one_line
from ..layout import normalize_subj
from ._zarr_compat import buffer_prototype, list_dir, local_root, quiet_numcodecs, run
from .array import FeatureArray
from .fingerprint import fingerprint_diff
from .remote import fsspec_store, is_url, local_path, set_if_not_exists
from .schema import (
    ATTR_KEY,
    CHANNEL_DIM,
    DEFAULT_CODEC,
    FORMAT_VERSION,
    TOKEN_DIM,
    WRITE_CONFIG,
    ArraySpec,
    array_path,
    compressors,
    filters,
    image_dim,
    jsonable,
    nsd_ids,
    split_path,
)

log = logging.getLogger(__name__)


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
        elif is_url(root):
            self.zstore = fsspec_store(str(root), storage_options, self.read_only)
            self.source = str(root)
        else:
            path = Path(local_path(str(root)))
            self.source = str(path)
            if not self.read_only:
                check_writable_dir(path)
            self.zstore = LocalStore(path, read_only=self.read_only)
        self.local_root = local_root(self.zstore)
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
                self.root = open_group(self.zstore, "")
            except Exception as e:  # noqa: BLE001 - e.g. /proc, a read-only mount, a bucket that refuses writes
                raise StoreError(f"{self.location}: cannot create a Zarr store there ({one_line(e)})") from None

    @classmethod
    def open(cls, store: str | Path | FeatureStore, storage_options: dict[str, Any] | None = None) -> FeatureStore:
        """`store` itself when it is already open, else the store at that folder or URL, read-only."""
        return store if isinstance(store, FeatureStore) else cls(store, mode="r", storage_options=storage_options)

    def reopen(self, mode: str = "r") -> FeatureStore:
        """The same store opened again (in another process, or for writing)."""
        return FeatureStore(self.source, mode=mode, storage_options=self.storage_options)

    # ---- discovery --------------------------------------------------------------------------------------------
    def list_arrays(self) -> list[str]:
        """All feature arrays as 'feature/subj/split', sorted."""
        out = []
        with quiet_numcodecs():  # listing parses every array's metadata
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
            f, s, sp = split_path(path)
            if (feature is None or f == feature) and (subj is None or s == subj) and (split is None or sp == split):
                out.append(self.get(f, s, sp))
        return out

    def get(self, feature: str, subj: str, split: str) -> FeatureArray:
        """The array, or NotFoundInStoreError listing what the store holds; an array that exists but cannot be read
        (permissions, a corrupt zarr.json) is a StoreError saying so, never "not found"."""
        path = array_path(feature, normalize_subj(subj) if str(subj).isdigit() else subj, split)
        if not run(self.zstore.exists(f"{path}/zarr.json")):
            have = self.list_arrays()
            raise NotFoundInStoreError(
                f"{self.location} has no array {path}; it contains: {', '.join(have) if have else 'nothing'}"
            )
        try:
            with zarr.config.set(WRITE_CONFIG), quiet_numcodecs():  # config: captured when opened (zarr >= 3.1.3)
                arr = zarr.open_array(self.zstore, path=path, mode="r" if self.read_only else "a")
        except Exception as e:  # noqa: BLE001 - zarr raises many types for an unreadable definition
            raise StoreError(f"{self.location}: cannot open the array {path} ({one_line(e)})") from None
        return FeatureArray(self, path, arr)

    def exists(self, feature: str, subj: str, split: str) -> bool:
        return bool(run(self.zstore.exists(f"{array_path(feature, subj, split)}/zarr.json")))

    # ---- creation ---------------------------------------------------------------------------------------------
    def prepare(
        self,
        feature: str,
        subj: str,
        split: str,
        spec: ArraySpec,
        *,
        meta: dict[str, Any],
        fingerprint: dict[str, Any],
        overwrite: bool = False,
    ) -> tuple[FeatureArray, bool]:
        """Open the array for (feature, subj, split), creating it race-free; returns (array, created).

        Several processes may call this at once (`--shard`): the array metadata is written with
        `set_if_not_exists`, so exactly one definition wins and everyone then checks its fingerprint.
        `overwrite` starts the array over only when its configuration differs (saying what is discarded).
        An existing array resumes in its own storage format, and in its own codec unless `spec.codec` is given
        (None: DEFAULT_CODEC for a new array): a store begun by an older featstore, or with an older default, is
        finished as it was begun, not refused.
        """
        shape, chunk, dtype, codec, pack = spec.shape, spec.chunk, spec.dtype, spec.codec, spec.pack
        path = array_path(feature, subj, split)
        uid = uuid.uuid4().hex[:16]
        mem = MemoryStore()
        chunks = (chunk,) + tuple(shape[1:])
        arr = zarr.create_array(
            mem, name=path, shape=shape, chunks=chunks, dtype=dtype,
            shards=(chunk * pack,) + tuple(shape[1:]) if pack > 1 else None,
            filters=filters(codec or DEFAULT_CODEC, dtype), compressors=compressors(codec or DEFAULT_CODEC, dtype),
            fill_value=np.nan,
            dimension_names=(image_dim(split), TOKEN_DIM, CHANNEL_DIM),
        )
        fingerprint = jsonable({  # as stored (tuples become lists: the sharding codec's chunk_shape is a tuple)
            **fingerprint, "format_version": FORMAT_VERSION, "shape": list(shape), "dtype": dtype,
            "chunks": list(arr.chunks), "pack": pack, "codecs": [c.to_dict() for c in arr.metadata.codecs],
        })
        arr.attrs.update({
            ATTR_KEY: {**meta, "format_version": FORMAT_VERSION, "uid": uid, "fingerprint": fingerprint,
                       "codec": codec or DEFAULT_CODEC},  # the --codec name (bitround-K: lossy), for provenance
            "coordinates": f"{split}_nsd_id",  # CF/xarray: the NSD ids label the images too
        })
        for parent in (feature, f"{feature}/{subj}"):
            open_group(self.zstore, parent)
        key = f"{path}/zarr.json"
        kept = ("format_version", "codecs") if codec is None else ("format_version",)  # storage, not values
        if run(self.zstore.exists(key)):
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
            log.warning(
                "--overwrite: discarding %s (%s done) because its configuration changed (%s)",
                path, existing.progress(done), diff,
            )
            self.delete(path)
        blob = run(mem.get(key, buffer_prototype()))
        run(set_if_not_exists(self.zstore, key, blob))
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
        if not names or run(self.zstore.exists(f"{group}/{split}_nsd_id/zarr.json")):
            return
        g = open_group(self.zstore, group)
        dims = (image_dim(split),)
        try:  # concurrent writers (--shard) write the same content; whoever loses the race to create them is fine
            img = g.create_array(f"{split}_image", shape=(len(names),), dtype=str, dimension_names=dims,
                                 overwrite=True, compressors=None)
            img[:] = np.array(names, dtype=object)
            ids = g.create_array(f"{split}_nsd_id", shape=(len(names),), dtype="int64", fill_value=-1,
                                 dimension_names=dims, overwrite=True, compressors=None)
            ids[:] = nsd_ids(names)
        except Exception:
            if not run(self.zstore.exists(f"{group}/{split}_nsd_id/zarr.json")):
                raise

    def delete(self, path: str) -> None:
        """Drop an array: its completion record first, so a crash midway never leaves done markers behind."""
        for k in list_dir(self.zstore, path):
            if k.startswith("done-"):
                run(self.zstore.delete_dir(f"{path}/{k}"))
        run(self.zstore.delete_dir(path))

    # ---- statistics (written by stats.py) -----------------------------------------------------------------------
    def save_stats(self, fa: FeatureArray, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Store small result arrays in a group next to `fa` ({split}_stats); replaces earlier results."""
        gpath = f"{fa.path}_stats"
        run(self.zstore.delete_dir(gpath))
        g = zarr.open_group(self.zstore, path=gpath, mode="w")
        for name, value in arrays.items():
            g.create_array(name, data=np.atleast_1d(np.asarray(value)), compressors=None)
        g.attrs[ATTR_KEY] = {"source": fa.path, "source_uid": fa.uid, **jsonable(attrs)}

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
        run(self.zstore.delete_dir(key))
        arr = zarr.create_array(self.zstore, name=key, data=np.asarray(data), compressors=None)
        arr.attrs[ATTR_KEY] = jsonable(attrs)

    def load_derived(self, key: str, attrs: dict[str, Any]) -> np.ndarray | None:
        """The array saved at `key` if its attributes equal `attrs` (its fingerprint), else None."""
        try:
            arr = zarr.open_array(self.zstore, path=key, mode="r")
        except Exception:  # noqa: BLE001 - absent (or half-written: no metadata)
            return None
        if arr.attrs.get(ATTR_KEY) != jsonable(attrs):
            return None
        return arr[...]


def open_group(store: zarr.abc.store.Store, path: str) -> zarr.Group:
    """open_group(mode="a"), tolerating a concurrent process that created the group a moment earlier."""
    try:
        return zarr.open_group(store, path=path, mode="a")
    except Exception:  # noqa: BLE001 - ContainsGroupError from the race; a real problem raises again below
        return zarr.open_group(store, path=path, mode="r+")


def check_writable_dir(path: Path, param: str | None = None) -> None:
    """Fail early, before any model is loaded, if `path` cannot hold a store (`param`: the argument that named it)."""
    p = Path(path)
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"{p}: {probe} is not a folder", param=param)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StoreError(f"{p}: {probe} is not writable", param=param)
    try:  # access() says yes to root everywhere; /proc or a read-only mount only say no to a real write
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise StoreError(f"{p}: cannot write in {probe} ({e.strerror})", param=param) from None
    if p.exists() and any(p.iterdir()) and not (p / "zarr.json").is_file():
        raise StoreError(f"{p}: folder exists, is not empty and is not a featstore store", param=param)
