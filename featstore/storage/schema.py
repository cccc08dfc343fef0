"""The Zarr schema of a store: array paths, dimension names, coordinates, codecs, provenance attributes.

Layout of a store (a Zarr v3 group; a local folder or any fsspec URL such as s3://bucket/store.zarr):
    {feature}/{subj}/{split}                 float16/float32 array (N, T, C), dims ({split}_image, token, channel),
                                             fill_value NaN, chunks of K samples (optionally packed, K per object)
    {feature}/{subj}/{split}_image           coordinate: image file names (variable-length strings)
    {feature}/{subj}/{split}_nsd_id          coordinate: NSD ids parsed from the names (-1 where absent)
    {feature}/{subj}/{split}/done-{uid}/{i}  the completion record (completion.py): unit i (a chunk, or a pack) is done
    {feature}/{subj}/{split}_stats           group of small arrays written by `featstore stats`
    _sweep/...                               projections cached by the encoding sweep (derived.py)

Format version 1 (recorded as attrs["featstore"]["format_version"]). Version 0 stores (fill 0, one "image"
dimension, no coordinates) stay readable. Only storage/ knows these paths and attribute names; everything else asks
FeatureArray (`.feature`, `.subj`, `.split`, `.provenance`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from ..errors import BadArgumentError

FORMAT_VERSION = 1
ATTR_KEY = "featstore"  # all featstore provenance lives under this attribute
TOKEN_DIM, CHANNEL_DIM = "token", "channel"
WRITE_CONFIG = {"array.write_empty_chunks": True}  # every done chunk has a file: a missing file is corruption
NSD_ID = re.compile(r"nsd-(\d+)")

# name -> bytes->bytes compressor (crc32c is always appended). Measured on backbone output: see the README.
CODECS = {
    "none": lambda itemsize: [],
    "lz4": lambda itemsize: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize)],
    "lz4-bitshuffle": lambda itemsize: [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=itemsize)],
    "zstd": lambda itemsize: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=itemsize)],
    "zstd-bitshuffle": lambda itemsize: [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=itemsize)],
}
DEFAULT_CODEC = "none"


def compressors(codec: str, dtype: str) -> list:
    if codec not in CODECS:
        raise BadArgumentError(f"{codec!r}: choose one of {', '.join(CODECS)}", param="codec")
    return [*CODECS[codec](np.dtype(dtype).itemsize), Crc32cCodec()]


def array_path(feature: str, subj: str, split: str) -> str:
    return f"{feature}/{subj}/{split}"


def image_dim(split: str) -> str:
    return f"{split}_image"


def nsd_ids(names: list[str]) -> np.ndarray:
    """NSD ids from Algonauts file names (`train-0001_nsd-00013.png` -> 13); -1 where a name carries none."""
    return np.array([int(m.group(1)) if (m := NSD_ID.search(n)) else -1 for n in names], dtype=np.int64)


def split_path(path: str) -> tuple[str, str, str]:
    """'feature/subj/split' -> (feature, subj, split)."""
    feature, subj, split = path.split("/")
    return feature, subj, split


@dataclass(frozen=True)
class ArraySpec:
    """How a new array is laid out: its shape, samples per chunk, dtype, codec name (None: DEFAULT_CODEC for a new
    array, an existing one keeps its own) and chunks per stored object (`pack`, zarr sharding)."""

    shape: tuple[int, int, int]
    chunk: int
    dtype: str
    codec: str | None = None
    pack: int = 1


def jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
