"""The completion record of one array: which write units (chunks, or shards with --pack) are durably written.

One empty key per unit, `{array}/done-{uid}/{i}`, written only after the unit's data is durable (local: written by
an atomic rename and fsync'ed; object storage: the PUT returned). Markers live under the array's own random uid, so
markers of an earlier incarnation of the array (before --overwrite) never count. Reading the record is one listing.

Also the advisory writer lock: two extractions of the same share of one array would compute the same chunks twice.
"""
from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import numpy as np
import zarr

from ..errors import StoreError
from ._zarr_compat import buffer, fast_enabled, fsync_path, list_dir, run, touch


class CompletionRecord:
    def __init__(self, zstore: zarr.abc.store.Store, array_path: str, uid: str | None, nunits: int,
                 local_root: Path | None, fast: bool = False):
        self.zstore, self.path, self.nunits, self.local_root = zstore, array_path, nunits, local_root
        self.fast = fast and local_root is not None
        self.prefix = f"{array_path}/done-{uid or 'none'}"

    def mask(self) -> np.ndarray:
        """Boolean (nunits,): which units are durably written."""
        mask = np.zeros(self.nunits, dtype=bool)
        units = np.fromiter((int(k) for k in self._keys() if k.isdigit()), dtype=np.int64)
        mask[units[units < self.nunits]] = True
        return mask

    def _keys(self) -> list[str]:
        """The marker names; a local folder is listed directly (zarr's async listing of a large record costs several
        times more, and a dataset's construction is mostly this listing)."""
        if self.local_root is None:
            return list_dir(self.zstore, self.prefix)
        try:
            return os.listdir(self.local_root / self.prefix)
        except FileNotFoundError:
            return []

    def mark_done(self, units: list[int], durable: bool) -> None:
        if self.fast and fast_enabled():
            folder = self.local_root / self.prefix
            folder.mkdir(parents=True, exist_ok=True)
            for i in units:  # the same empty key LocalStore.set writes, without the event-loop hop
                touch(folder / str(i))
            if durable:
                fsync_path(folder)
            return
        for i in units:
            run(self.zstore.set(f"{self.prefix}/{i}", buffer(b"")))

    def mark_undone(self, units: list[int]) -> None:
        for i in units:
            run(self.zstore.delete(f"{self.prefix}/{i}"))

    def clean_partials(self, units: list[int] | None = None) -> int:
        """Remove stray `*.partial` temp files that a killed writer left; only for `units` (this writer's share),
        so a concurrent writer's in-flight temp files are never touched. Returns how many were removed."""
        if self.local_root is None:
            return 0
        base = self.local_root / self.path
        wanted = None if units is None else set(units)
        removed = 0
        for p in base.rglob("*.partial"):
            rel = p.relative_to(base).parts
            idx = rel[1] if rel[0] == "c" else rel[1].split(".")[0] if rel[0].startswith("done-") else None
            if wanted is None or (idx is not None and idx.isdigit() and int(idx) in wanted):
                p.unlink(missing_ok=True)
                removed += 1
        return removed


_HELD: set[str] = set()  # the lock files this process holds
_HELD_GUARD = threading.Lock()


class WriterLock:
    """An advisory lock per array and share, released when the holder exits or crashes.

    A POSIX record lock (lockf), not flock: an flock belongs to the open file, which the DataLoader workers forked
    by extract inherit, so a killed extract's dying workers kept its share locked for a while and an immediate rerun
    was refused. A record lock belongs to the process alone. Record locks do not exclude the process that holds
    them, so a second acquire within the process is refused by the set of held paths.

    The lock file is removed on release, so a finished run leaves none behind (a killed one leaves an empty file that
    the next run takes over). Removing it is safe against a concurrent acquirer: the holder unlinks the file while it
    still holds the lock, and an acquirer that got the lock checks that its open file is still the one at the path;
    if the holder removed it in between (the acquirer locked a file no one else can reach), it opens the path again.

    Only local stores can be locked; on object storage concurrent writers of one share are not detected.
    """

    def __init__(self, local_root: Path | None, array_path: str, share: tuple[int, int]):
        self.path = None
        if local_root is not None:
            k, n = share
            self.path = local_root / array_path / f".featstore-lock-{k}of{n}"
        self._fd: int | None = None

    def _refuse(self) -> StoreError:
        return StoreError(
            f"another extract is already writing the same share of {self.path.parent} (lock "
            f"{self.path.name}); wait for it to finish, or give each process its own --shard K/N"
        )

    def acquire(self) -> WriterLock:
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        with _HELD_GUARD:
            if key in _HELD:
                raise self._refuse()
            while (fd := self._try_lock()) is None:
                pass  # the holder removed the file between our open and our lock: take the path's new file
            _HELD.add(key)
        self._fd, self._key = fd, key  # nothing is written into the lock file: a rerun leaves the store untouched
        return self

    def _try_lock(self) -> int | None:
        """The locked descriptor of the file now at the path, None if that file was removed meanwhile."""
        import fcntl

        fd = self._open()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise self._refuse() from None
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def release(self) -> None:
        if self._fd is not None:
            with _HELD_GUARD:
                try:
                    self.path.unlink()  # while the lock is held: see the class docstring
                except OSError:  # already gone, or a read-only folder: an empty file left behind is harmless
                    pass
                os.close(self._fd)  # closing releases the record lock
                _HELD.discard(self._key)
            self._fd = None

    def __enter__(self) -> WriterLock:  # noqa: PYI034
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
