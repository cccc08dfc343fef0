"""The lossy `bitround-K` codec: exact values against an independent bit rounding, both chunk I/O paths, other
readers, the provenance, bad K, resume. Real Zarr stores on disk, the real tiny backbone."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import zarr
from conftest import TINY, cli_here

from featstore.extraction import ExtractConfig, extract
from featstore.storage import ArraySpec, FeatureStore, codec_name
from featstore.storage._zarr_compat import fast_available, public_path

META = {"token_layout": {"cls_index": 0, "grid": [3, 3], "n_tokens": 10}}


def bitround_ref(x: np.ndarray, k: int) -> np.ndarray:
    """float16 -> float16 keeping k of the 10 mantissa bits, rounding to nearest, ties to even, written from the
    definition: split the magnitude's bits into the kept part q and the dropped remainder, round q up when the
    remainder is over half a unit of q, or exactly half and q odd (a carry into the exponent is the next binade)."""
    u = x.view(np.uint16).astype(np.int64)
    sign, mag = u & 0x8000, u & 0x7FFF
    drop = 10 - k
    if drop == 0:
        return x.copy()
    q, rem, half = mag >> drop, mag & ((1 << drop) - 1), 1 << (drop - 1)
    up = (rem > half) | ((rem == half) & (q % 2 == 1))
    return (sign | ((q + up) << drop)).astype(np.uint16).view(np.float16)


def finite_float16(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Every kind of finite float16 (random bit patterns: normals, subnormals, zeros of both signs, ties), plus
    activation-like values."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits)  # inf/NaN exponent -> subnormal
    x = bits.view(np.float16)
    x[: n // 2] = rng.standard_normal(n // 2).astype(np.float16)
    return x.reshape(shape)


def make_array(root, codec: str, x: np.ndarray):
    fs = FeatureStore(root, mode="a")
    meta = {**META, "image_names": [f"img{i:05d}.png" for i in range(len(x))]}
    fa, created = fs.prepare("f", "01", "train", ArraySpec(x.shape, 1, str(x.dtype), codec), meta=meta,
                             fingerprint={})
    assert created
    fa.write_chunks(0, x, durable=False)
    return fa


def chunk_files(root) -> dict[str, bytes]:
    base = root / "f/01/train/c"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def test_reference_rounding_is_round_to_nearest_even():
    """The test's own rounding on hand-made cases: 1 + 2^-4 is halfway between 1 and 1 + 2^-3 at K=3 (tie, q even:
    down); 1 + 3 * 2^-4 is the tie above an odd q (up); the largest float16 rounds into the next binade (inf)."""
    x = np.array([1 + 2**-4, 1 + 3 * 2**-4, 1 + 2**-4 + 2**-10, -(1 + 3 * 2**-4), 65504.0], np.float16)
    want = np.array([1.0, 1 + 2**-2, 1 + 2**-3, -(1 + 2**-2), np.inf], np.float16)
    np.testing.assert_array_equal(bitround_ref(x, 3), want)


@pytest.mark.parametrize("k", [1, 3, 5, 7, 10])
def test_bitround_array_round_trips_to_the_rounded_values_on_both_paths(tmp_path, k):
    """What is read back is exactly the independent rounding of what was written; the fast chunk path (numcodecs'
    BitRound run synchronously) writes the same bytes as zarr's public path and reads the same values."""
    x = finite_float16((6, 10, 16), seed=k)
    want = bitround_ref(x, k)
    fast = make_array(tmp_path / "fast.zarr", f"bitround-{k}", x)
    got = fast.read(0, len(x))
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(fast.read_sample(4).view(np.uint16), want[4].view(np.uint16))
    with public_path():
        pub = make_array(tmp_path / "public.zarr", f"bitround-{k}", x)
        np.testing.assert_array_equal(FeatureStore(tmp_path / "fast.zarr").get("f", "01", "train").read(0, 6)
                                      .view(np.uint16), want.view(np.uint16))
    assert chunk_files(tmp_path / "fast.zarr") == chunk_files(tmp_path / "public.zarr")
    if fast_available():
        assert fast._steps is not None  # the bitround array is on the fast path, not silently on the public one
    assert pub.verify().ok


def test_plain_zarr_reads_a_bitround_array_and_the_codec_is_in_its_metadata(tmp_path, capsys):
    x = finite_float16((4, 10, 16))
    make_array(tmp_path / "s.zarr", "bitround-5", x)
    codecs = json.loads((tmp_path / "s.zarr/f/01/train/zarr.json").read_text())["codecs"]
    assert codecs[0] == {"name": "numcodecs.bitround", "configuration": {"keepbits": 5}}
    assert [c["name"] for c in codecs[1:]] == ["bytes", "blosc", "crc32c"]
    assert (codecs[2]["configuration"]["cname"], codecs[2]["configuration"]["shuffle"]) == ("lz4", "bitshuffle")
    assert codec_name(codecs) == "bitround-5"
    attrs = json.loads((tmp_path / "s.zarr/f/01/train/zarr.json").read_text())["attributes"]["featstore"]
    assert attrs["codec"] == "bitround-5"
    with warnings.catch_warnings():  # zarr says numcodecs codecs are outside the v3 spec: true, and in the README
        warnings.simplefilter("ignore")
        plain = zarr.open_array(tmp_path / "s.zarr", path="f/01/train", mode="r")[:]
    np.testing.assert_array_equal(plain.view(np.uint16), bitround_ref(x, 5).view(np.uint16))
    r = cli_here(capsys, "info", str(tmp_path / "s.zarr"))
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("f/01/train "))
    assert " bitround-5 " in row, r.stdout


def test_pack_keeps_the_codec_inside_the_shards(tmp_path):
    x = finite_float16((4, 10, 16))
    fs = FeatureStore(tmp_path / "s.zarr", mode="a")
    fa, _ = fs.prepare("f", "01", "train", ArraySpec(x.shape, 1, "float16", "bitround-4", pack=2),
                       meta={**META, "image_names": [f"i{i}.png" for i in range(4)]}, fingerprint={})
    fa.write_chunks(0, x, durable=False)
    np.testing.assert_array_equal(fa.read(0, 4).view(np.uint16), bitround_ref(x, 4).view(np.uint16))
    assert fa.summary()["codec"] == "bitround-4"


@pytest.mark.parametrize("codec", ["bitround-0", "bitround-11", "bitround-x", "bitround-", "bitround--3"])
def test_bad_k_is_one_line_naming_the_flag(tmp_path, capsys, codec):
    r = cli_here(capsys, "extract", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "s.zarr"),
                 "--arch", "tiny", "--weights", "random", "--device", "cpu", "--codec", codec)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featstore: error: --codec ") and codec in lines[0], r.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_k_range_follows_the_dtype():
    assert ExtractConfig(codec="bitround-23", dtype="float32").validate().codec == "bitround-23"
    with pytest.raises(ValueError, match=r"codec 'bitround-11': K is the mantissa bits kept, 1\.\.10 for float16"):
        ExtractConfig(codec="bitround-11").validate()
    with pytest.raises(ValueError, match=r"1\.\.23 for float32"):
        ExtractConfig(codec="bitround-24", dtype="float32").validate()


def test_float32_bitround_round_trips(tmp_path):
    """float32 keeps K of 23 bits: checked through float16's reference on values exact in both (a float16 value
    rounded to K bits, K <= 10, is the same number whichever format holds it)."""
    x16 = finite_float16((3, 10, 16))
    x16 = np.where(np.abs(x16) >= np.finfo(np.float16).tiny, x16, 0).astype(np.float16)  # float32 has no subnormal gap
    fa = make_array(tmp_path / "s.zarr", "bitround-6", x16.astype(np.float32))
    np.testing.assert_array_equal(fa.read(0, 3), bitround_ref(x16, 6).astype(np.float32))


def test_resume_of_a_bitround_array_keeps_its_codec(subject, tmp_path, capsys):
    """Extract with --codec bitround-5, lose two samples, rerun without --codec: only they are recomputed, in the
    array's own codec, and every value is the rounding of what a lossless extraction stores."""
    store = tmp_path / "s.zarr"
    extract(subject, store, backbone="dinov2_q", splits=["train"], codec="bitround-5", **TINY)
    meta = store / "dinov2_q_last/01/train/zarr.json"
    before = json.loads(meta.read_text())["codecs"]
    fa = FeatureStore(store, mode="a").get("dinov2_q_last", "01", "train")
    fa.mark_undone([1, 4])
    r = cli_here(capsys, "extract", "--data_dir", str(subject), "--output_dir", str(store), "--arch", "tiny",
                 "--weights", "random", "--device", "cpu", "--num_workers", "0")
    assert r.returncode == 0, r.stderr
    assert "computed 2, skipped 4" in r.stdout, r.stdout
    assert json.loads(meta.read_text())["codecs"] == before
    extract(subject, tmp_path / "lossless.zarr", backbone="dinov2_q", splits=["train"], codec="none", **TINY)
    exact = FeatureStore(tmp_path / "lossless.zarr").get("dinov2_q_last", "01", "train").read(0, 6)
    got = FeatureStore(store).get("dinov2_q_last", "01", "train").read(0, 6)
    np.testing.assert_array_equal(got.view(np.uint16), bitround_ref(exact, 5).view(np.uint16))
