"""Scale-out figures for the README: 1 vs 2 dask workers, object counts with and without --pack, and
extract/read throughput on a local S3 server (moto, a separate process on 127.0.0.1) vs local disk.

usage: python tools/scaleout_bench.py [--images 64] [--pack 16] [--reps 2] [--dir DIR]

Tiny random backbone (`--arch tiny`: 962 tokens x 48 channels, float16 = 92 kB per sample), so extraction is
CPU-bound on this machine; the dask rows show the scheduling overhead and the parallel speed-up, not a GPU's.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TINY = {"arch": "tiny", "weights": "random", "device": "cpu", "num_workers": 0, "progress": False}
BUCKET = "bench"


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process, and the standard AWS variables pointing at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true")
    os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"]))
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=30).close()
    return proc, endpoint


def count_objects(url: str) -> dict[str, int]:
    import boto3

    prefix = url.removeprefix(f"s3://{BUCKET}/") + "/"
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    keys = [o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])]
    arr = "dinov2_q_last/01/train/"
    return {"all": len(keys), "data": sum(k.startswith(arr + "c/") for k in keys),
            "markers": sum(k.startswith(arr + "done-") for k in keys)}


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t, out


def best_extract(reps: int, subj: Path, dest, **kw) -> float:
    """Best of `reps` extractions, each into a fresh store (`dest(i)`)."""
    from featstore.extraction import extract

    return min(timed(extract, subj, dest(i), **kw)[0] for i in range(reps))


def read_rates(store: str) -> tuple[float, float]:
    """(whole-array MB/s decoded, FeatureDataset samples/s one by one) for the train array."""
    from featstore.dataset import FeatureDataset
    from featstore.storage import FeatureStore

    fa = FeatureStore(store).get("dinov2_q_last", "01", "train")
    s, x = timed(fa.read, 0, fa.shape[0])
    ds = FeatureDataset(store, "dinov2_q_last", "01", "train")
    s2, _ = timed(lambda: [ds[i] for i in range(len(ds))])
    return x.nbytes / 1e6 / s, len(ds) / s2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--pack", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2, help="best of REPS for the warm timings and the reads")
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import dask
    import distributed

    from featstore.extraction import extract
    from featstore.sample import make_sample_subject

    root = Path(a.dir or tempfile.mkdtemp(prefix="featstore-scaleout-"))
    subj = make_sample_subject(root / "data", subj="01", n_train=a.images, n_test=0, seed=0)
    run = {"backbone": "dinov2_q", "batch_size": a.batch_size, "splits": ["train"], **TINY}
    rows: list[tuple[str, str]] = []

    # ---- 1 vs 2 dask workers (and one process without dask), same extraction ---------------------------------------
    extract(subj, root / "warm.zarr", **run)  # imports and caches warm for the single-process row
    s = best_extract(a.reps, subj, lambda i: root / f"single{i}.zarr", **run)
    rows.append(("single process, no dask", f"{s:.1f} s ({a.images / s:.1f} img/s)"))
    for n in (1, 2):
        t0 = time.perf_counter()
        with dask.config.set({"distributed.worker.daemon": False}), distributed.LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster, distributed.Client(cluster, set_as_default=False) as client:
            start = time.perf_counter() - t0
            cold, _ = timed(extract, subj, root / f"w{n}-cold.zarr", scheduler=client.scheduler.address, **run)
            warm = best_extract(a.reps, subj, lambda i, n=n: root / f"w{n}-warm{i}.zarr",
                                scheduler=client.scheduler.address, **run)
            t1 = time.perf_counter()
        stop = time.perf_counter() - t1
        rows.append((f"--workers {n}: tasks, workers warm", f"{warm:.1f} s ({a.images / warm:.1f} img/s)"))
        rows.append((f"--workers {n}: first run (workers import + build)", f"{cold:.1f} s"))
        rows.append((f"--workers {n}: cluster start / stop", f"{start:.1f} s / {stop:.1f} s"))
    s, _ = timed(extract, subj, root / "cli-w2.zarr", workers=2, **run)
    rows.append(("extract(workers=2) end to end (start, run, stop)", f"{s:.1f} s"))

    # ---- S3 (moto) vs local disk: objects, extract, read -----------------------------------------------------------
    proc, endpoint = start_moto()
    try:
        for pack in (1, a.pack):
            se = best_extract(a.reps, subj, lambda i, p=pack: f"s3://{BUCKET}/p{p}-{i}.zarr", pack=pack, **run)
            sl = best_extract(a.reps, subj, lambda i, p=pack: root / f"p{p}-{i}.zarr", pack=pack, **run)
            url, local = f"s3://{BUCKET}/p{pack}-0.zarr", root / f"p{pack}-0.zarr"
            c = count_objects(url)
            files = sum(1 for p in (local / "dinov2_q_last/01/train/c").rglob("*") if p.is_file())
            rows.append((f"--pack {pack}: objects of the array (data + markers), S3",
                         f"{c['data']} + {c['markers']} ({c['all']} in the store); local disk {files} chunk files"))
            rows.append((f"--pack {pack}: extract S3 vs local", f"{a.images / se:.1f} vs {a.images / sl:.1f} img/s"))
            for name, store in (("S3", url), ("local", str(local))):
                read_rates(store)  # first touch: opens clients, imports
                mb, sps = (max(v) for v in zip(*(read_rates(store) for _ in range(a.reps))))
                text = f"whole array {mb:.0f} MB/s; FeatureDataset {sps:.0f} samples/s (one by one)"
                rows.append((f"--pack {pack}: read {name}", text))
    finally:
        proc.terminate()
        proc.wait()
    width = max(len(r[0]) for r in rows)
    print(f"scale-out: {a.images} images, tiny dinov2_q (962 x 48 float16 = 92 kB/sample), batch {a.batch_size}, "
          f"{os.cpu_count()} CPUs, best of {a.reps}, moto S3 at {endpoint}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if not a.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
