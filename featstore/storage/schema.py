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
from ._zarr_compat import bitround_filter

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
# Lossy: `bitround-K` keeps K mantissa bits (round to nearest even), zeroing the rest, then compresses losslessly
# with BITROUND_THEN: bitshuffle turns the zeroed low bits into whole zero bit-planes, which lz4 removes at a fraction
# of zstd's decode cost (measured: `python tools/codec_table.py --bitround`, see the README).
BITROUND = re.compile(r"bitround-(.*)")
BITROUND_THEN = "lz4-bitshuffle"
MANTISSA_BITS = {"float16": 10, "float32": 23}
CODEC_CHOICES = (*CODECS, "bitround-K")  # what --help lists


def keepbits(codec: str, dtype: str) -> int | None:
    """K of a `bitround-K` codec name (checked against the dtype's mantissa), None for a lossless preset; a name that
    is neither is a BadArgumentError naming the codec."""
    if codec in CODECS:
        return None
    m = BITROUND.fullmatch(codec)
    if m is None:
        raise BadArgumentError(f"{codec!r}: choose one of {', '.join(CODEC_CHOICES)}", param="codec")
    most = MANTISSA_BITS[np.dtype(dtype).name]
    if not (m.group(1).isdigit() and 1 <= int(m.group(1)) <= most):
        raise BadArgumentError(f"{codec!r}: K is the mantissa bits kept, 1..{most} for {np.dtype(dtype).name} "
                               f"(e.g. bitround-5)", param="codec")
    return int(m.group(1))


def filters(codec: str, dtype: str) -> list:
    """The array->array steps before serialisation: BitRound for `bitround-K`, none for the lossless presets."""
    k = keepbits(codec, dtype)
    return [] if k is None else [bitround_filter(k)]


def compressors(codec: str, dtype: str) -> list:
    """The bytes->bytes steps of a codec name, crc32c last."""
    name = codec if keepbits(codec, dtype) is None else BITROUND_THEN
    return [*CODECS[name](np.dtype(dtype).itemsize), Crc32cCodec()]


def codec_name(codecs: list[dict]) -> str:
    """The --codec name that made an array, from its stored codec list (to_dict form); a description of the steps for
    a list no preset makes (an array written by another tool)."""
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":  # --pack: the chunks' codecs are inside
        codecs = codecs[0].get("configuration", {}).get("codecs", [])
    steps = [c for c in codecs if c.get("name") not in ("bytes", "crc32c")]
    k = None
    if steps and steps[0].get("name") == "numcodecs.bitround":
        k = steps.pop(0).get("configuration", {}).get("keepbits")
    for name, make in CODECS.items():
        made = [c.to_dict() for c in make(2)]
        if _same_steps(made, steps) and (k is None or name == BITROUND_THEN):
            return name if k is None else f"bitround-{k}"
    labels = [c.get("name", "?") for c in steps]
    return " + ".join(([f"bitround-{k}"] if k is not None else []) + labels) or "none"


def _same_steps(a: list[dict], b: list[dict]) -> bool:
    """Equal codec lists, blosc's typesize aside (it follows the dtype)."""
    def norm(cs):
        return [{**c, "configuration": {k: v for k, v in c.get("configuration", {}).items() if k != "typesize"}}
                for c in cs]
    return norm(a) == norm(b)


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
