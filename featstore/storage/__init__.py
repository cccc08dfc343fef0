"""Everything that touches Zarr: the schema (schema.py), one array (array.py), a store (store.py), the completion
record and writer lock (completion.py), configuration diffs (fingerprint.py), fsspec set-up (remote.py) and the
only uses of zarr/s3fs internals (_zarr_compat.py). Other modules import from here, never zarr itself."""
from __future__ import annotations

from ._zarr_compat import path_in_use
from .array import FeatureArray, VerifyReport
from .completion import CompletionRecord, WriterLock
from .fingerprint import fingerprint_diff, image_list_diff
from .remote import is_url
from .schema import (
    CODECS,
    DEFAULT_CODEC,
    FORMAT_VERSION,
    ArraySpec,
    codec_name,
    compressors,
    filters,
    keepbits,
    nsd_ids,
    split_path,
)
from .store import FeatureStore, check_writable_dir

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "ArraySpec",
    "CompletionRecord",
    "FeatureArray",
    "FeatureStore",
    "VerifyReport",
    "WriterLock",
    "check_writable_dir",
    "codec_name",
    "compressors",
    "filters",
    "fingerprint_diff",
    "image_list_diff",
    "is_url",
    "keepbits",
    "nsd_ids",
    "path_in_use",
    "split_path",
]
