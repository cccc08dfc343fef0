"""The sweep's figures in the README ("Which layer?"): the projection pass against a plain read of the same array,
and the ridge fit at full size.

usage: python tools/sweep_bench.py read [--images 400] [--reps 3] [--dir DIR]
       python tools/sweep_bench.py fit [--vertices 2048] [--images 9841] [--dims 1024]

read: a float16 array of (962, 768) tokens per image, chunk 1, no codec, written once into DIR (a temporary folder
by default), then read warm: `FeatureArray.read` in ~100 MB blocks vs the sweep's projection pass (dims 1024, the
threaded dask scheduler, no caching); best of --reps each. fit: the sweep's z-scoring + himalaya RidgeCV + Pearson r
on an (images x dims) random design against --vertices random targets, numpy backend, float32; the time is linear
in the vertices, so two runs give the full-size figure by extrapolation.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T, C = 962, 768


def bench_read(images: int, reps: int, folder: Path) -> None:
    from tqdm import tqdm

    from featstore.encoding.projection import project_array
    from featstore.storage import ArraySpec, FeatureStore

    fs = FeatureStore(folder / "bench.zarr", "a")
    fa, _ = fs.prepare("f", "01", "train", ArraySpec((images, T, C), 1, "float16"),
                             meta={"token_layout": {"cls_index": 0, "grid": [31, 31], "n_tokens": T},
                                   "image_names": [f"i{i:05d}.png" for i in range(images)]}, fingerprint={})
    if not fa.is_complete():
        rng = np.random.default_rng(0)
        for a in range(0, images, 32):
            rows = rng.standard_normal((min(32, images - a), T, C), dtype=np.float32).astype(np.float16)
            fa.write_chunks(a, rows, durable=False)
    step = max(1, (100 << 20) // (T * C * 2))

    def plain():
        for a in range(0, images, step):
            fa.read(a, min(a + step, images))

    def project():
        with tqdm(disable=True) as bar:  # dask's threaded scheduler, as `featstore sweep` without --workers
            project_array(fa, 1024, 0, 100.0, None, bar)

    best = {"read": np.inf, "project": np.inf}
    for _ in range(reps):
        for name, fn in (("read", plain), ("project", project)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    gb = images * T * C * 2 / 1e9
    print(f"{images} images, {gb:.2f} GB float16: plain read {gb / best['read']:.2f} GB/s, projection pass "
          f"{gb / best['project']:.2f} GB/s, ratio {best['read'] / best['project']:.2f}")


def bench_fit(vertices: int, images: int, dims: int) -> None:
    from featstore.dataset import train_val_split
    from featstore.encoding.ridge import backend as ridge_backend
    from featstore.encoding.ridge import fit_and_score

    rng = np.random.default_rng(0)
    X = rng.standard_normal((images, dims), dtype=np.float32)
    Y = rng.standard_normal((images, vertices), dtype=np.float32)
    train, val = train_val_split(images, 0.1)
    with ridge_backend("numpy") as backend:
        t0 = time.perf_counter()
        r, _ = fit_and_score(X, Y, train, val, backend)
        seconds = time.perf_counter() - t0
    print(f"fit {images} x {dims} against {vertices} vertices: {seconds:.1f} s (mean r {np.nanmean(r):+.4f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("read", help="projection pass vs plain read")
    r.add_argument("--images", type=int, default=400)
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--dir", default=None, help="where the array is written (default: a temporary folder)")
    f = sub.add_parser("fit", help="the ridge fit at full size, for a number of vertices")
    f.add_argument("--vertices", type=int, default=2048)
    f.add_argument("--images", type=int, default=9841)
    f.add_argument("--dims", type=int, default=1024)
    a = p.parse_args()
    if a.what == "fit":
        bench_fit(a.vertices, a.images, a.dims)
    elif a.dir:
        bench_read(a.images, a.reps, Path(a.dir))
    else:
        with tempfile.TemporaryDirectory(prefix="featstore-sweep-bench-") as d:
            bench_read(a.images, a.reps, Path(d))


if __name__ == "__main__":
    main()
