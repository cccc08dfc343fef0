"""Run an extraction in this (sub)process and SIGKILL ourselves at a chosen point; used by test_resume.py.

usage: python crashrun.py DATA_DIR STORE POINT K [CHUNK] [BATCH]
POINT names where the kill lands, on the K-th occurrence (1-based):
  forward      inside the K-th forward pass
  before_write before the K-th chunk-run write starts
  mid_write    in the middle of writing the K-th chunk file (a truncated *.partial file is left behind)
  after_write  after the K-th chunk-run's files are written, before the folder fsync and the done markers
  before_mark  after the K-th fsync, before the done markers are written
  mid_mark     after the K-th done marker is written (others of the same run not yet)
"""
from __future__ import annotations

import os
import signal
import sys

import featstore.storage._zarr_compat as local
from featstore import extract, get_backbone
from featstore.storage import FeatureArray

data_dir, store, point, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
chunk = int(sys.argv[5]) if len(sys.argv) > 5 else 1
batch = int(sys.argv[6]) if len(sys.argv) > 6 else 4
count = {"n": 0}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def hit() -> bool:
    count["n"] += 1
    return count["n"] == k


bb = get_backbone("dinov2_q", arch="tiny", weights="random", seed=0)

if point == "forward":
    orig_fwd = bb.forward_features
    bb.forward_features = lambda x: die() if hit() else orig_fwd(x)
elif point == "before_write":
    orig_write = FeatureArray.write_chunks
    FeatureArray.write_chunks = lambda self, *a, **kw: die() if hit() else orig_write(self, *a, **kw)
elif point == "mid_write":
    orig_put = local._zarr_put

    def put(path, value, exclusive=False):
        if "/c/" in str(path) and hit():
            data = value.as_buffer_like()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(str(path) + ".deadbeef.partial", "wb") as f:
                f.write(bytes(data)[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        return orig_put(path, value, exclusive)

    local._zarr_put = put
elif point in ("after_write", "before_mark"):
    orig_fsync = local.fsync_all

    def fsync(paths, files=True):
        if point == "after_write" and hit():
            die()
        orig_fsync(paths, files)
        if point == "before_mark" and hit():
            die()

    local.fsync_all = fsync
elif point == "mid_mark":
    orig_put = local._zarr_put

    def put(path, value, exclusive=False):
        r = orig_put(path, value, exclusive)
        if "/done-" in str(path) and hit():
            die()
        return r

    local._zarr_put = put
else:
    raise SystemExit(f"unknown point {point}")

extract(data_dir, store, backbone=bb, device="cpu", num_workers=0, progress=False, chunk=chunk, batch_size=batch)
print("finished without being killed")
