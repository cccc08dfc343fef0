"""The knobs users may tune, in one donfig configuration (as `zarr.config`): set them in Python with
`featstore.config.set(...)` (also as a context manager), or from the environment before featstore is imported.

| key                  | environment                     | default | what it does                                         |
|----------------------|---------------------------------|---------|------------------------------------------------------|
| chunkio              | FEATSTORE_CHUNKIO               | auto    | `public` forces zarr's public chunk I/O everywhere    |
| io_threads           | FEATSTORE_IO_THREADS            | 4       | threads that encode, write and fsync chunk files     |
| export.read_threads  | FEATSTORE_EXPORT__READ_THREADS  | 4       | chunks decoded in parallel by `export-npy`           |
| export.read_ahead_mb | FEATSTORE_EXPORT__READ_AHEAD_MB | 256     | decoded bytes in flight ahead of the .npy writer     |
| stats.task_mb        | FEATSTORE_STATS__TASK_MB        | 100     | decoded bytes per dask task of `featstore stats`     |
"""
from __future__ import annotations

from donfig import Config

from .errors import BadArgumentError

CHUNKIO_CHOICES = ("auto", "public")

config = Config(
    "featstore",
    defaults=[{
        "chunkio": "auto",
        "io_threads": 4,
        "export": {"read_threads": 4, "read_ahead_mb": 256},
        "stats": {"task_mb": 100},
    }],
)


def chunkio() -> str:
    """'auto' (the fast local path where the installed zarr offers it) or 'public' (zarr's public API only)."""
    value = str(config.get("chunkio")).strip().lower()
    if value not in CHUNKIO_CHOICES:
        raise BadArgumentError(
            f"featstore config chunkio={value!r} (FEATSTORE_CHUNKIO): choose one of {', '.join(CHUNKIO_CHOICES)}"
        )
    return value


def positive_int(key: str) -> int:
    """A count from the configuration, checked: one line naming the key when it is not a positive integer."""
    value = config.get(key)
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise BadArgumentError(f"featstore config {key}={value!r}: must be a positive integer")
    return n
