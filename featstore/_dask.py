"""The one place that sets up dask schedulers: dask's local threads, a LocalCluster of N processes, or a running
cluster at an ADDRESS. Used by statistics, distributed extraction and the encoding sweep.

Clients are used explicitly (`set_as_default=False`), never made the process default: a failed connection would
otherwise leave dask's global scheduler on a dead client.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from typing import Any

from .errors import BadArgumentError, one_line

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
