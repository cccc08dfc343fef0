"""Extractions that SIGKILL themselves at chosen points; used by test_resume.py.

usage: python crashrun.py DATA_DIR JOBS
JOBS is a JSON list of {"store", "point", "k", "chunk", "batch"}. This interpreter imports torch and featstore once,
then forks one child per job, all at once: each child is a real process that arms its kill point, runs the
extraction and SIGKILLs itself. One interpreter start and import instead of one per job (torch and timm cost more
than a tiny run). Nothing runs a torch operation before the fork, so no thread pool is inherited half-alive. Prints one JSON object {store: the child's exit status, -N when killed by signal N};
each child's stdout and stderr go to STORE.log.

POINT names where the kill lands, on the K-th occurrence (1-based):
  forward      inside the K-th forward pass
  before_write before the K-th chunk-run write starts
  mid_write    in the middle of writing the K-th chunk file (a truncated *.partial file is left behind)
  after_write  after the K-th chunk-run's files are written, before the folder fsync and the done markers
  before_mark  after the K-th fsync, before the done markers are written
  mid_mark     after the K-th done marker is written (others of the same run not yet)
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import timm  # noqa: F401 - imported here, once, for every child (get_backbone imports it on first use)

import featstore.backbones.dinov2
import featstore.storage._zarr_compat as local
import featstore.storage.array
import featstore.storage.completion
from featstore import extract, get_backbone
from featstore.storage import FeatureArray


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def run(data_dir: str, store: str, point: str, k: int, chunk: int = 1, batch: int = 4) -> None:
    """Arm the kill point, then extract (in a forked child: the patches stay in that process)."""
    count = {"n": 0}

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

        featstore.storage.array.fsync_all = fsync  # the name the write path calls
    elif point == "mid_mark":
        orig_touch = local.touch

        def touch(path):
            orig_touch(path)
            if "/done-" in str(path) and hit():
                die()

        featstore.storage.completion.touch = touch  # the name the completion record calls
    else:
        raise SystemExit(f"unknown point {point}")
    extract(data_dir, store, backbone=bb, device="cpu", num_workers=0, progress=False, chunk=chunk, batch_size=batch)
    print("finished without being killed")


def main(data_dir: str, jobs: list[dict]) -> dict[str, int]:
    pids = {}
    for job in jobs:
        Path(job["store"]).parent.mkdir(parents=True, exist_ok=True)
        pid = os.fork()
        if pid == 0:  # the child: its own log, its own kill point; never returns into the parent's code
            code = 0
            try:
                fd = os.open(job["store"] + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                run(data_dir, **job)
            except BaseException:  # noqa: BLE001 - reported through the exit status and the log
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids[pid] = job["store"]
    statuses = {}
    while pids:
        pid, status = os.wait()
        statuses[pids.pop(pid)] = os.waitstatus_to_exitcode(status)
    return statuses


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
