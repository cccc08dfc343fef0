"""The error hierarchy: one-line messages for users, in the library's terms.

Every ``FeatstoreError`` subclass that has a matching builtin also subclasses it (``StoreError`` is an ``OSError``,
``BadArgumentError`` a ``ValueError``, ...), so callers can catch either; ``Interrupted`` has none (it reports a
stopped run). ``Terminated`` is not a featstore error: it is the ``KeyboardInterrupt`` the CLI's SIGTERM handler
raises, so a terminated run stops the way Ctrl-C stops it. The CLI prints ``str(error)`` on one line and exits with
``exit_code``.
"""
from __future__ import annotations


class FeatstoreError(Exception):
    """Base of all featstore errors; the message is one line meant for a user.

    `param` names the argument the error is about, in the library's terms (`output_dir`); the message then starts
    with its value. Python shows `output_dir /proc/x.zarr: cannot write in /proc`, the CLI the flag
    (`--output_dir /proc/x.zarr: ...`): the library never spells command-line flags, the CLI adds them.
    """

    exit_code = 2

    def __init__(self, message: str = "", *args: object, param: str | None = None):
        super().__init__(message, *args)
        self.param = param

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return f"{self.param} {self.message}" if self.param else self.message

    def cli_message(self) -> str:
        """The message as the command line says it: the argument named by its flag."""
        return f"--{self.param} {self.message}" if self.param else self.message


class LayoutError(FeatstoreError, FileNotFoundError):
    """The subject folder is missing or does not look like an Algonauts subject."""


class UnknownBackboneError(FeatstoreError, KeyError):
    """A backbone name that is not in the registry (FeatstoreError's __str__ comes first: no KeyError quotes)."""


class WeightsError(FeatstoreError, RuntimeError):
    """Weights could not be found, fetched or loaded."""


class BadArgumentError(FeatstoreError, ValueError):
    """A flag or argument value is invalid."""


class StoreError(FeatstoreError, OSError):
    """The output store cannot be opened, created or written."""


class StoreWriteError(StoreError):
    """Writing a chunk failed (disk full, I/O error); everything written before stays valid."""

    exit_code = 1


class NotFoundInStoreError(FeatstoreError, KeyError):
    """A feature/subject/split that the store does not contain."""


class FingerprintMismatchError(FeatstoreError, ValueError):
    """An existing array was produced by a different configuration."""


class IncompleteArrayError(FeatstoreError, RuntimeError):
    """A read of samples (or statistics) over chunks that are not marked done."""


class CorruptChunkError(FeatstoreError, ValueError):
    """A chunk marked done fails to decode or checksum; `featstore verify --repair` then extract recomputes it."""

    exit_code = 1


class CorruptImageError(FeatstoreError, OSError):
    """A stimulus image could not be decoded."""

    exit_code = 1


class Float16OverflowError(FeatstoreError, OverflowError):
    """A feature value does not fit float16; use --dtype float32."""

    exit_code = 1


class ClusterError(FeatstoreError, RuntimeError):
    """A distributed extraction task failed for good (after retries, or its workers kept dying); what finished is kept."""

    exit_code = 1


class Interrupted(FeatstoreError):
    """SIGINT/SIGTERM stopped an extraction after its in-flight writes were settled."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """Raised by the CLI's SIGTERM handler so extraction stops the same way as on Ctrl-C (exit 143)."""


def one_line(e: BaseException) -> str:
    """`Type: first line of the message`, for the one-line user errors that wrap another library's exception."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
