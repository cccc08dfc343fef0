#!/usr/bin/env python
"""Codec table: bytes, write GB/s and read samples/s of every codec preset, measured on real backbone output.

    python tools/codec_table.py [--images 8] [--tiny-images 64] [--reps 3] [--json FILE] [--dir DIR]
    python tools/codec_table.py --quick                       # tiny architecture only, a few seconds
    python tools/codec_table.py --bitround [--bitround-images 200] [--epochs 4]   # the lossy codec's price

Why real backbone output: what a codec finds in float16 activations depends on their exponent and mantissa
statistics, which synthetic noise does not have. The features come from `featstore.extract` with random weights
(the issue's setting; no download), once per architecture: the tiny test ViT, and the full-size DINOv2 ViT-B/14 at the
guide's 425 px (-> 434 px, 962 tokens x 768 channels), both variants (dinov2_q, dinov2) from one forward pass, and
optionally OpenCLIP ViT-L/14 (`--clip`). They are held in memory; every codec then writes and reads the same arrays:

- bytes: chunk files on disk (blosc headers and the 4-byte crc32c of each chunk included) / the float32 .npy of the
  same values; and the codec's own output (the crc32c, which every choice carries, aside) / the raw float32 data,
  which is what the default rule reads: uncompressed float16 is exactly 0.5x there;
- write: GB/s of the stored dtype's raw bytes through `FeatureArray.write_chunks` (fsync on, chunks of 1 sample,
  runs of 16 units as extract's writer hands them over), best of --reps, codecs interleaved;
- read: samples/s of `FeatureArray.read_sample` in random order, one process, page cache warm, best of --reps.

`--bitround` instead prices the lossy `bitround-K` codecs (K = 3, 5, 7) on the sample subject: bytes vs float16, read
speed, relative error of the features, and the change in validation r of both encoders (see `bitround_main`).

Codecs are the presets of `featstore.storage.CODECS` plus a few candidates (`--candidates`, marked `*`), which are
registered in this process only; a candidate that wins would have to be added to CODECS to be usable.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featstore import table

SUBJ, SPLIT, BATCH = "01", "train", 16
FULL_ARCH = "vit_base_patch14_dinov2.lvd142m"
RULE = 0.5  # the issue: the default is the fastest reader among codecs at <= 0.5x the float32 bytes


def log(msg: str) -> None:
    print(f"[codec_table {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def candidates() -> dict:
    """zstd levels beyond the presets' clevel 1, and lz4hc (lz4's decoder, a slower encoder that finds more)."""
    from zarr.codecs import BloscCodec

    def blosc(cname: str, clevel: int, shuffle: str):
        return lambda itemsize: [BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle, typesize=itemsize)]

    return {"zstd-3*": blosc("zstd", 3, "shuffle"), "zstd-3-bitshuffle*": blosc("zstd", 3, "bitshuffle"),
            "zstd-5-bitshuffle*": blosc("zstd", 5, "bitshuffle"), "lz4hc-bitshuffle*": blosc("lz4hc", 5, "bitshuffle")}


def extract_features(root: Path, label: str, backbone: str, arch: str, n: int, dtype: str) -> dict[str, np.ndarray]:
    """{feature: (n, T, C) array} from a real `extract` run (random weights, no compression, no fsync)."""
    from featstore.extraction import extract
    from featstore.sample import make_sample_subject
    from featstore.storage import FeatureStore

    subj = make_sample_subject(root / f"img-{label}", subj=SUBJ, n_train=n, n_test=0, seed=0)
    store = root / f"src-{label}.zarr"
    log(f"{label}: extracting {backbone} ({arch}, random weights) on {n} images")
    t0 = time.perf_counter()
    extract(subj, store, backbone=backbone, arch=arch, weights="random", device="cpu", dtype=dtype, codec="none",
            durable=False, progress=False, batch_size=2 if arch != "tiny" else BATCH, num_workers=0)
    log(f"{label}: extracted in {time.perf_counter() - t0:.1f} s")
    fs = FeatureStore(store)
    out = {fa.feature: np.asarray(fa.read(0, n)) for fa in fs.arrays(subj=SUBJ, split=SPLIT)}
    shutil.rmtree(store)
    shutil.rmtree(subj.parent)
    return out


def npy_bytes(x: np.ndarray) -> int:
    """Size of the legacy float32 .npy of these values (header included)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(x[:0].astype(np.float32)))
    return buf.tell() + x.size * 4


def write_once(root: Path, codec: str, x: np.ndarray) -> tuple[float, int]:
    """Seconds of write_chunks (fsync on) for all samples, and the bytes of the chunk files."""
    from featstore.storage import ArraySpec, FeatureStore

    shutil.rmtree(root, ignore_errors=True)
    fs = FeatureStore(root, mode="a")
    n = len(x)
    meta = {"token_layout": {"cls_index": 0, "grid": [1, 1], "n_tokens": x.shape[1]},
            "image_names": [f"img{i:05d}.png" for i in range(n)]}
    fa, _ = fs.prepare("f", SUBJ, SPLIT, ArraySpec(x.shape, 1, str(x.dtype), codec), meta=meta, fingerprint={})
    fa.write_chunks(0, x[:1], durable=True)  # first write: the I/O pool and codec set-up are not the codec's cost
    t0 = time.perf_counter()
    for a in range(1, n, BATCH):
        fa.write_chunks(a, x[a : a + BATCH], durable=True)
    s = time.perf_counter() - t0
    chunks = sum(p.stat().st_size for p in (root / fa.path / "c").rglob("*") if p.is_file())
    return s * n / max(n - 1, 1), chunks


def read_once(root: Path, x: np.ndarray, passes: int) -> float:
    """Seconds per sample of read_sample in a random order (a fresh FeatureStore; values checked once)."""
    from featstore.storage import FeatureStore

    fa = FeatureStore(root).get("f", SUBJ, SPLIT)
    order = np.random.default_rng(1).permutation(len(x))
    assert np.array_equal(fa.read_sample(int(order[0])), x[order[0]], equal_nan=True)
    t0 = time.perf_counter()
    for _ in range(passes):
        for j in order:
            fa.read_sample(int(j))
    return (time.perf_counter() - t0) / (passes * len(x))


def measure(work: Path, feats: dict[str, tuple[str, np.ndarray]], codecs: list[str], reps: int) -> list[dict]:
    rows = []
    for key, (label, x) in feats.items():
        ref = npy_bytes(x)
        raw = x.nbytes
        best: dict[str, dict] = {c: {"write_s": np.inf, "read_s": np.inf} for c in codecs}
        passes = max(1, (3000 if x.shape[-1] < 256 else 800) // len(x))  # ~0.3 s of reads per codec and rep
        for r in range(reps):
            order = codecs[r % len(codecs):] + codecs[: r % len(codecs)]  # a different codec first each rep
            log(f"{key}: rep {r + 1}/{reps}, {len(codecs)} codecs")
            for c in order:
                root = work / "w.zarr"
                ws, size = write_once(root, c, x)
                rs = read_once(root, x, passes)
                b = best[c]
                b["write_s"], b["read_s"], b["bytes"] = min(b["write_s"], ws), min(b["read_s"], rs), size
                shutil.rmtree(root)
        for c in codecs:
            b = best[c]
            rows.append({"features": key, "source": label, "codec": c, "shape": list(x.shape), "dtype": str(x.dtype),
                         "bytes": int(b["bytes"]), "npy_float32_bytes": int(ref), "ratio_vs_float32": b["bytes"] / ref,
                         "codec_ratio": (b["bytes"] - 4 * len(x)) / (x.size * 4),
                         "write_gbs": raw / b["write_s"] / 1e9, "read_samples_s": 1 / b["read_s"],
                         "read_gbs": raw / len(x) / b["read_s"] / 1e9})
    return rows


def choose(rows: list[dict]) -> dict[str, str | None]:
    """Per feature set: the fastest reader among codecs at <= 0.5x the float32 bytes (None if no codec is), on the
    codec's output: the 4-byte crc32c per chunk and the npy header are the same whatever the codec, and counting them
    would put uncompressed float16 just over or under 0.5x depending on N alone."""
    out: dict[str, str | None] = {}
    for key in dict.fromkeys(r["features"] for r in rows):
        ok = [r for r in rows if r["features"] == key and r["codec_ratio"] <= RULE]
        out[key] = max(ok, key=lambda r: r["read_samples_s"])["codec"] if ok else None
    return out


def format_table(rows: list[dict], header: str) -> str:
    cols = ("features", "codec", "bytes vs f32 npy", "codec out vs f32", "write GB/s", "read samples/s", "read GB/s")
    cells = [[r["features"], r["codec"], f"{r['ratio_vs_float32']:.5f}x", f"{r['codec_ratio']:.4f}x",
              f"{r['write_gbs']:.2f}",
              f"{r['read_samples_s']:.0f}", f"{r['read_gbs']:.2f}"] for r in rows]
    lines = table.format_table(cells, cols, right=range(2, len(cols))).splitlines()
    out = [header, *lines[:2]]
    prev = None
    for c, line in zip(cells, lines[2:]):
        if prev is not None and c[0] != prev:
            out.append("")  # a blank line between features
        out.append(line)
        prev = c[0]
    winners = choose(rows)
    out.append("")
    out += [f"fastest reads at <= {RULE}x float32 bytes, {k}: {v or 'none qualifies'}" for k, v in winners.items()]
    return "\n".join(out)


# ---- the lossy codecs: bitround-K --------------------------------------------------------------------------------
BITROUND_KS = (3, 5, 7)
R_TOLERANCE = 0.001  # the issue: the smallest K whose validation r moves by at most this much is recommended
SMALL_TRANSFORMER = {"hidden_dim": 64, "nheads": 4, "dim_feedforward": 128}


def chunk_bytes(store: Path, path: str) -> int:
    return sum(p.stat().st_size for p in (store / path / "c").rglob("*") if p.is_file())


def read_rate(store: Path, feature: str, n: int, passes: int) -> float:
    """Samples/s of read_sample in a random order, page cache warm (a fresh FeatureStore; one warm-up read)."""
    from featstore.storage import FeatureStore

    fa = FeatureStore(store).get(feature, SUBJ, SPLIT)
    order = np.random.default_rng(1).permutation(n)
    fa.read_sample(int(order[0]))
    t0 = time.perf_counter()
    for _ in range(passes):
        for j in order:
            fa.read_sample(int(j))
    return passes * n / (time.perf_counter() - t0)


def relative_error(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Max and mean of |y - x| / |x| over the finite normal values of x (float64). Subnormals (|x| < 6.1e-5 in
    float16) have fewer mantissa bits to begin with, so K bits of them is an absolute, not a relative, precision."""
    x64, y64 = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
    ok = np.isfinite(x64) & (np.abs(x64) >= np.finfo(x.dtype).tiny)
    rel = np.abs(y64[ok] - x64[ok]) / np.abs(x64[ok])
    return float(rel.max()), float(rel.mean())


def train_r(store: Path, data_dir: Path, arch: str, epochs: int, seed: int = 0) -> float:
    """Validation mean r over all vertices of one encoder trained on the store (CPU, no loader workers)."""
    from featstore.encoding import EncoderConfig, TrainConfig, train_encoder

    model = EncoderConfig(encoder_arch=arch, **(SMALL_TRANSFORMER if arch == "transformer" else {}))
    res = train_encoder(TrainConfig(store=store, data_dir=data_dir, model=model, epochs=epochs, num_workers=0,
                                    seed=seed, device="cpu", progress=False))
    return float(res.metrics["mean_r"])


def bitround_rows(work: Path, n: int, epochs: int, ks: tuple[int, ...]) -> tuple[list[dict], dict]:
    """One row per codec (lossless float16 first, then bitround-K), each from its own `featstore.extract` of the same
    sample subject (tiny dinov2_q, random weights), and the seed-to-seed change of r on the lossless features (the
    training noise the r changes are to be read against)."""
    from featstore.extraction import extract
    from featstore.sample import make_sample_subject
    from featstore.storage import FeatureStore

    subj = make_sample_subject(work / "data", subj=SUBJ, n_train=n, n_test=0, seed=0)
    feature, rows, ref = "dinov2_q_last", [], None
    passes = max(1, 3000 // n)
    for codec in ["none", *(f"bitround-{k}" for k in ks)]:
        store = work / f"{codec}.zarr"
        log(f"{codec}: extract (tiny dinov2_q, random weights) of {n} images")
        extract(subj, store, backbone="dinov2_q", arch="tiny", weights="random", device="cpu", codec=codec,
                durable=False, progress=False, num_workers=0)
        fa = FeatureStore(store).get(feature, SUBJ, SPLIT)
        y = np.asarray(fa.read(0, n))
        ref = y if ref is None else ref
        row = {"codec": codec, "shape": list(y.shape), "bytes": chunk_bytes(store, fa.path),
               "read_samples_s": read_rate(store, feature, n, passes)}
        row["max_rel_err"], row["mean_rel_err"] = relative_error(ref, y)
        for arch in ("transformer", "linear"):
            log(f"{codec}: train {arch} ({epochs} epochs)")
            row[f"r_{arch}"] = train_r(store, subj, arch, epochs)
        rows.append(row)
    noise = {}
    for arch in ("transformer", "linear"):
        log(f"none: train {arch} with seed 1 (training noise)")
        noise[arch] = train_r(work / "none.zarr", subj, arch, epochs, seed=1) - rows[0][f"r_{arch}"]
    return rows, noise


def recommend(rows: list[dict]) -> str | None:
    """The smallest K (fewest bits, so fewest bytes) whose r of both encoders moves by at most R_TOLERANCE."""
    base = rows[0]
    ok = [r for r in rows[1:] if all(abs(r[f"r_{a}"] - base[f"r_{a}"]) <= R_TOLERANCE
                                     for a in ("transformer", "linear"))]
    return min(ok, key=lambda r: int(r["codec"].split("-")[1]))["codec"] if ok else None


def format_bitround(rows: list[dict], noise: dict, header: str) -> str:
    base = rows[0]
    cols = ("codec", "bytes vs float16", "read samples/s", "max rel err", "(bound)", "mean rel err", "transformer r",
            "d r", "linear r", "d r ")
    cells = [[r["codec"], f"{r['bytes'] / base['bytes']:.3f}x", f"{r['read_samples_s']:.0f}",
              f"{r['max_rel_err']:.2e}", f"{2.0 ** -(int(r['codec'].split('-')[1]) + 1):.2e}" if "-" in r["codec"]
              else "0", f"{r['mean_rel_err']:.2e}",
              f"{r['r_transformer']:.4f}", f"{r['r_transformer'] - base['r_transformer']:+.4f}",
              f"{r['r_linear']:.4f}", f"{r['r_linear'] - base['r_linear']:+.4f}"] for r in rows]
    out = [header, table.format_table(cells, cols, right=range(1, len(cols))), ""]
    out.append("training noise (lossless features, seed 1 vs seed 0): d r transformer "
               f"{noise['transformer']:+.4f}, linear {noise['linear']:+.4f}")
    best = recommend(rows)
    out.append(f"smallest K with |d r| <= {R_TOLERANCE} for both encoders: {best or 'none of these'}")
    return "\n".join(out)


def bitround_main(a: argparse.Namespace) -> int:
    """The lossy codecs' price on the sample subject's tiny random-weight features: the planted signal makes r
    meaningful (about 0.5-0.6), and extraction plus 2 x (len(K) + 2) short trainings fit in minutes on 2 cores."""
    ks = BITROUND_KS if a.k is None else tuple(a.k)
    if a.dir is not None:
        Path(a.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="featstore-bitround-", dir=a.dir))
    t_start = time.perf_counter()
    try:
        rows, noise = bitround_rows(work, a.bitround_images, a.epochs, ks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from featstore.dataset import train_val_split

    n_val = len(train_val_split(a.bitround_images, 0.1)[1])  # TrainConfig's default val_fraction
    header = (f"bitround table: sample subject, {a.bitround_images} train images ({n_val} validation), tiny dinov2_q "
              f"(random weights) {tuple(rows[0]['shape'])} float16, chunks of 1 sample; encoders {a.epochs} epochs on "
              f"CPU (transformer {SMALL_TRANSFORMER}); r = validation mean r over all vertices; "
              f"relative error over normal float16 values (bound 2^-(K+1)); "
              f"{time.perf_counter() - t_start:.0f} s")
    print(format_bitround(rows, noise, header))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "noise": noise, "recommended": recommend(rows)}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8, help="images for the full-size architectures (default 8)")
    p.add_argument("--tiny-images", type=int, default=64, help="images for the tiny architecture (default 64)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, best kept (default 3)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored dtype (default float16)")
    p.add_argument("--no-candidates", dest="candidates", action="store_false",
                   help="measure the CODECS presets only")
    p.add_argument("--clip", action="store_true", help="also OpenCLIP ViT-L/14 (clip_vit_512), ~1 img/s")
    p.add_argument("--quick", action="store_true", help="tiny architecture only, 16 images, 1 rep")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument("--dir", default=None, help="make the working folder in DIR (default: the system's temp folder)")
    p.add_argument("--bitround", action="store_true", help="price the lossy bitround-K codecs instead (see above)")
    p.add_argument("--bitround-images", type=int, default=200, help="--bitround: sample subject images (default 200)")
    p.add_argument("--epochs", type=int, default=4, help="--bitround: training epochs per encoder (default 4)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="--bitround: mantissa bits kept (default 3 5 7)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.bitround:
        return bitround_main(a)
    from featstore import store

    codecs = list(store.CODECS)
    if a.candidates:
        extra = candidates()
        store.CODECS.update(extra)  # this process only
        codecs += list(extra)
    sources = [("tiny", "dinov2_q,dinov2", "tiny", 16 if a.quick else a.tiny_images)]
    if not a.quick:
        sources.append(("ViT-B/14", "dinov2_q,dinov2", FULL_ARCH, a.images))
        if a.clip:
            sources.append(("ViT-L/14", "clip", "ViT-L-14", a.images))
    reps = 1 if a.quick else a.reps
    if a.dir is not None:
        Path(a.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="featstore-codecs-", dir=a.dir))
    t_start = time.perf_counter()
    try:
        feats: dict[str, tuple[str, np.ndarray]] = {}
        for label, backbone, arch, n in sources:
            for feature, x in extract_features(work, label.replace("/", ""), backbone, arch, n, a.dtype).items():
                feats[f"{label} {feature} {tuple(x.shape)}"] = (label, x)
        rows = measure(work, feats, codecs, reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = (f"codec table: {a.dtype} output of featstore.extract (random weights, 425 px images), chunks of 1 sample, "
              f"fsync on; best of {reps}; {time.perf_counter() - t_start:.0f} s ('*': candidate, not in CODECS)")
    print(format_table(rows, header))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
