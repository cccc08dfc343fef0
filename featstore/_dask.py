"""The one place that sets up dask: schedulers (dask's local threads, a LocalCluster of N processes, or a running
cluster at an ADDRESS), a stored array as dask blocks of whole units, and running tasks under a progress bar. Used
by statistics, distributed extraction and the encoding sweep.

Clients are used explicitly (`set_as_default=False`), never made the process default: a failed connection would
otherwise leave dask's global scheduler on a dead client.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dask.callbacks import Callback

from .errors import BadArgumentError, CorruptChunkError, one_line

if TYPE_CHECKING:
    import dask.array as da

    from .storage import FeatureArray

LOCAL_SCHEDULERS = ("threads", "sync", "synchronous", "single-threaded")


def require_distributed():
    """dask.distributed, or a one-line error saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise BadArgumentError(
            "--workers/--scheduler need dask.distributed, which is not installed: pip install 'featstore[distributed]'"
        ) from None
    return distributed


def check_choice(scheduler: str | None, workers: int | None) -> None:
    """Either a scheduler address or a worker count, not both; a count of at least one."""
    if scheduler is not None and workers is not None:
        raise BadArgumentError("give either --scheduler ADDRESS or --workers N, not both")
    if workers is not None and workers < 1:
        raise BadArgumentError(f"--workers {workers}: need at least 1")


def connect(address: str):
    """A Client of the running cluster at `address`, or a one-line error."""
    distributed = require_distributed()
    try:
        return distributed.Client(address, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        raise BadArgumentError(f"cannot connect to the dask scheduler at {address}: {one_line(e)}") from None


@contextlib.contextmanager
def client(scheduler: str | None = None, workers: int | None = None, *, local_ok: bool = True,
           daemon: bool = True, resources: dict[str, float] | None = None) -> Iterator[Any]:
    """A distributed Client for the duration, or None where dask's local schedulers do (`scheduler` None or one of
    LOCAL_SCHEDULERS, set for the duration; only when `local_ok`).

    `workers=N` starts a LocalCluster of N single-threaded worker processes whose scratch space is removed
    afterwards; `daemon=False` lets those workers start processes of their own (DataLoader workers); `resources`
    is what each worker advertises (e.g. {"GPU": 1})."""
    check_choice(scheduler, workers)
    if workers is None and (scheduler is None or scheduler in LOCAL_SCHEDULERS):
        if not local_ok:
            raise BadArgumentError(f"--scheduler {scheduler}: needs a dask cluster; give its ADDRESS, or --workers N")
        import dask

        with dask.config.set(scheduler=scheduler or "threads"):
            yield None
        return
    distributed = require_distributed()
    if workers is None:
        with connect(scheduler) as c:
            yield c
        return
    import dask

    nanny = logging.getLogger("distributed.nanny")
    nanny.addFilter(_slow_exit)
    try:
        with tempfile.TemporaryDirectory(prefix="featstore-dask-") as scratch, dask.config.set(
            {"temporary-directory": scratch, "distributed.worker.daemon": daemon}
        ), distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
            silence_logs=logging.CRITICAL,  # a failing task reaches the caller as its exception: one line
            resources=resources,
        ) as cluster, distributed.Client(cluster, set_as_default=False) as c:
            c.wait_for_workers(workers)
            yield c
    finally:
        nanny.removeFilter(_slow_exit)


def _slow_exit(record: logging.LogRecord) -> bool:
    """Drop the nanny's 'still alive after 4 s, killing' at close: a worker with torch loaded takes that long to
    exit on a busy machine, after its work is done and written; the kill is harmless."""
    return "still alive after" not in record.getMessage()


# ---- a stored array as dask blocks (statistics, the encoding sweep) ------------------------------------------------
_CORRUPT_TAG = "featstore-corrupt-unit "


def task_rows(fa: FeatureArray, bytes_per_value: int, task_mb: float) -> int:
    """Rows per dask task: a whole multiple of the storage unit, about task_mb of decoded data."""
    per_row = fa.shape[1] * fa.shape[2] * bytes_per_value
    k = max(1, int(task_mb * 1e6 // (per_row * fa.chunk_len)))
    return min(k * fa.chunk_len, max(fa.shape[0], 1))


def blocks_of(fa: FeatureArray, rows: int) -> da.Array:
    """The stored array as dask blocks of `rows` (whole storage units), each read unit by unit by a getter that
    names a unit failing to decode (zarr + numpy only: workers need no featstore)."""
    import dask.array as da

    getter = functools.partial(_read_rows(), unit=fa.chunk_len, tag=_CORRUPT_TAG)
    name = f"featstore-read-{fa.path.replace('/', '-')}-{fa.uid or 'v0'}-{rows}"
    return da.from_array(fa.zarr, chunks=(rows, *fa.shape[1:]), name=name, getitem=getter, asarray=False)


@functools.cache
def _read_rows():
    """dask's getter as a closure, so cloudpickle ships it by value."""
    import numpy as np

    def read_rows(z, index, unit, tag):
        """The rows of one task, one storage unit per zarr read, so a unit that fails to decode is named
        (ValueError starting with `tag` + its index) and no sibling reads are left pending inside zarr."""
        rows, rest = index[0], tuple(index[1:])
        start, stop = rows.start or 0, z.shape[0] if rows.stop is None else rows.stop
        parts = []
        for u0 in range(start - start % unit, stop, unit):
            try:
                parts.append(z[(slice(max(start, u0), min(stop, u0 + unit)), *rest)])
            except (ValueError, RuntimeError) as e:  # codec errors: checksum mismatch, undecodable bytes
                raise ValueError(f"{tag}{u0 // unit}: {e}") from None
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    return read_rows


@contextlib.contextmanager
def corrupt_chunks_named(fa: FeatureArray):
    """A unit that failed to decode inside a dask task becomes the store's one-line CorruptChunkError: re-reading
    that one unit here raises it with the array, the unit and the repair command."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        if not text.startswith(_CORRUPT_TAG):
            raise
        unit = int(text[len(_CORRUPT_TAG):].split(":", 1)[0])
        fa.read(*fa.chunk_range(unit))  # raises CorruptChunkError
        raise CorruptChunkError(  # the unit read back fine here (a transient fault): still one line
            f"{fa.path}: {fa.unit} {unit} failed to decode ({text.split(': ', 1)[-1].splitlines()[0]}); "
            f"run `featstore verify {fa.store.location}`"
        ) from None


def compute(parts: list, client, bar, prefix: str) -> list:
    """dask.compute of `parts` (delayed objects whose keys start with `prefix`), on the local schedulers or the
    cluster `client`, advancing the tqdm `bar` per finished task (dask's own callbacks, or as_completed)."""
    import dask

    if client is None:
        with _TaskBar(bar, prefix):
            return list(dask.compute(*parts))
    distributed = require_distributed()
    futures = client.compute(parts)
    for _ in distributed.as_completed(futures, loop=client.loop):
        bar.update(1)
    return client.gather(futures)


class _TaskBar(Callback):
    """tqdm bar over the tasks of the local schedulers whose keys start with `prefix`."""

    def __init__(self, bar, prefix: str):
        super().__init__()
        self.bar, self.prefix = bar, prefix

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(key, str) and key.startswith(self.prefix):
            self.bar.update(1)
