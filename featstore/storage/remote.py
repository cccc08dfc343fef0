"""Opening stores by URL through fsspec (S3, GCS, ...): options, and the race-free create on object storage."""
from __future__ import annotations

from typing import Any

import zarr
from fsspec.core import split_protocol
from zarr.storage import FsspecStore

from ..errors import StoreError, one_line
from ._zarr_compat import s3_create


def is_url(root: Any) -> bool:
    """A URL of a remote store (s3://, gs://, memory://, ...): fsspec's own protocol split; file:// is local."""
    return isinstance(root, str) and split_protocol(root)[0] not in (None, "file", "local")


def local_path(root: str) -> str:
    """The path of a local folder given as a path or a file:// URL."""
    protocol, path = split_protocol(root)
    return path if protocol in ("file", "local") else root


def fsspec_store(url: str, storage_options: dict[str, Any] | None, read_only: bool) -> FsspecStore:
    """zarr's own fsspec store; credentials and endpoint come from the standard environment or storage_options."""
    opts = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):  # botocore reads AWS_ENDPOINT_URL(_S3) and the credentials itself
        opts.setdefault("use_listings_cache", False)  # see other processes' done markers at once
        opts.setdefault("max_concurrency", 1)  # one GET per chunk instead of HEAD + GET
    try:
        return FsspecStore.from_url(url, storage_options=opts or None, read_only=read_only)
    except Exception as e:  # noqa: BLE001 - missing protocol package, bad options
        raise StoreError(f"{url}: cannot open ({one_line(e)})") from None


async def set_if_not_exists(store: zarr.abc.store.Store, key: str, blob) -> None:
    """Atomic where the backend can: LocalStore (O_EXCL) and S3 (If-None-Match: *); zarr's FsspecStore version is
    check-then-write. Callers re-read the uid to see who won; elsewhere a lost race only wastes the loser's work."""
    if isinstance(store, FsspecStore) and "s3" in store.fs.protocol:
        await s3_create(store, key, blob.to_bytes())
        return
    await store.set_if_not_exists(key, blob)
