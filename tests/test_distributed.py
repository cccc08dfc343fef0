"""Distributed extraction: a real dask LocalCluster of 2 worker processes fills the arrays.

One cluster for the module (created by featstore's own `_dask.client`); tests pass its address as `scheduler=`, as
`--scheduler ADDRESS` does.
"""
from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import get_task_stream
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.utils import get_mp_context

import featstore.extraction.cluster as fdist
from featstore import _dask
from featstore.errors import BadArgumentError
from featstore.extraction import extract
from featstore.sample import make_sample_subject
from featstore.storage import FeatureStore
from tests.conftest import TINY, run_cli

N_TRAIN, N_TEST = 10, 2


@pytest.fixture(scope="module")
def subj(tmp_path_factory) -> Path:
    return make_sample_subject(tmp_path_factory.mktemp("dist"), subj="01", n_train=N_TRAIN, n_test=N_TEST, seed=7)


@pytest.fixture(scope="module")
def client():
    """Workers come from a forkserver that imported torch, timm and featstore once (spawned workers would import
    them each, ~10 s apiece here, again for the restarted one). Not plain fork: this process has run OpenMP
    (torch) by now, and a forked child that runs OpenMP hangs."""
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        get_mp_context().set_forkserver_preload(["distributed", "featstore.extraction.cluster", "timm"])  # after dask's
        with _dask.client(None, 2, daemon=False) as c:
            yield c


def _read_all(store, split: str, **kw) -> np.ndarray:
    fa = FeatureStore(store, **kw).get("dinov2_q_last", "01", split)
    assert fa.is_complete()
    return fa.read(0, fa.shape[0])


@pytest.mark.parametrize("pack", [1, 3])
def test_two_workers_equal_single_process(subj, client, tmp_path, pack):
    ref, out = tmp_path / "ref.zarr", tmp_path / "dist.zarr"
    extract(subj, ref, backbone="dinov2_q", batch_size=4, pack=pack, **TINY)
    with get_task_stream(client) as ts:
        res = extract(subj, out, backbone="dinov2_q", batch_size=4, pack=pack, scheduler=client.scheduler.address,
                      **TINY)
    workers = {t["worker"] for t in ts.data if str(t["key"]).startswith("featstore-")}
    assert len(workers) == 2, "both workers should have run tasks"
    assert [(s.path, s.computed, s.skipped) for s in res.splits] == [
        ("dinov2_q_last/01/train", N_TRAIN, 0), ("dinov2_q_last/01/synt", N_TEST, 0)]
    for split in ("train", "synt"):
        np.testing.assert_array_equal(_read_all(out, split), _read_all(ref, split))
    # the arrays, their attributes' fingerprints and their unit layout are those of a single-process run
    a, b = (FeatureStore(p).get("dinov2_q_last", "01", "train") for p in (ref, out))
    assert a.fingerprint == b.fingerprint and a.nchunks == b.nchunks == -(-N_TRAIN // pack)
    again = extract(subj, out, backbone="dinov2_q", batch_size=4, pack=pack, scheduler=client.scheduler.address,
                    **TINY)
    assert [s.computed for s in again.splits] == [0, 0]  # nothing left: no task submitted


class KillOnceAfterWrite(WorkerPlugin):
    """Logs every unit run a worker writes (after it is marked done) and SIGKILLs the first worker that writes a
    train run while the `arm` file exists (claimed by an atomic rename, so exactly one worker dies, once)."""

    name = "featstore-test-kill"

    def __init__(self, log: str, arm: str):
        self.log, self.arm = log, arm

    def setup(self, worker):
        from featstore.storage import FeatureArray

        self.orig = orig = FeatureArray.write_chunks
        log, arm = self.log, self.arm

        def write_chunks(fa, first, data, durable=True):
            units = orig(fa, first, data, durable=durable)
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {fa.split} {' '.join(map(str, units))}\n")
            if fa.split == "train":
                try:
                    os.rename(arm, arm + ".taken")
                except FileNotFoundError:
                    return units
                with open(log, "a") as f:
                    f.write(f"{os.getpid()} killed\n")
                os.kill(os.getpid(), signal.SIGKILL)
            return units

        FeatureArray.write_chunks = write_chunks

    def teardown(self, worker):
        from featstore.storage import FeatureArray

        FeatureArray.write_chunks = self.orig


def test_killed_worker_range_is_retried_without_recomputing_done_units(subj, client, tmp_path, monkeypatch):
    ref, out = tmp_path / "ref.zarr", tmp_path / "dist.zarr"
    extract(subj, ref, backbone="dinov2_q", batch_size=2, **TINY)
    log, arm = tmp_path / "writes.log", tmp_path / "arm"
    arm.touch()
    monkeypatch.setattr(fdist, "RANGES_PER_WORKER", 1)  # train: two ranges of 5 units, written 2 + 2 + 1
    client.register_plugin(KillOnceAfterWrite(str(log), str(arm)))
    try:
        res = extract(subj, out, backbone="dinov2_q", batch_size=2, scheduler=client.scheduler.address, **TINY)
    finally:
        client.unregister_worker_plugin(KillOnceAfterWrite.name)
    assert not arm.exists() and Path(str(arm) + ".taken").exists(), "no worker was killed"
    rows = [line.split() for line in log.read_text().splitlines()]
    (killed_pid,) = [pid for pid, what, *_ in rows if what == "killed"]
    train = [(pid, [int(u) for u in units]) for pid, split, *units in rows if split == "train"]
    killed_units = [u for pid, units in train if pid == killed_pid for u in units]
    assert killed_units, train
    written = sorted(u for _, units in train for u in units)
    assert written == list(range(N_TRAIN)), f"a unit marked done was written twice (or never): {train}"
    # the killed worker's range was finished elsewhere, and the run reports what its finished tasks computed
    assert res.splits[0].computed == N_TRAIN - len(killed_units)
    for split in ("train", "synt"):
        np.testing.assert_array_equal(_read_all(out, split), _read_all(ref, split))
    assert len(client.scheduler_info()["workers"]) == 2  # the nanny restarted the killed worker


def test_cli_flags_and_errors(subj, tmp_path):
    r = run_cli("extract", "--data_dir", str(subj), "--output_dir", str(tmp_path / "s.zarr"), "--arch", "tiny",
                "--weights", "random", "--device", "cpu", "--workers", "1", "--scheduler", "tcp://127.0.0.1:1")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr, r.stderr
    with pytest.raises(BadArgumentError, match="--workers 0"):
        extract(subj, tmp_path / "s.zarr", backbone="dinov2_q", workers=0, **TINY)


def test_each_split_reports_its_own_time(client, tmp_path):
    """Each split's seconds lie within the compute time of its own tasks, as dask's task stream records it (the
    synt line used to report the time from the start of the run, train's work included, to its last task)."""
    subj = make_sample_subject(tmp_path / "d", subj="01", n_train=12, n_test=1, seed=3)
    with get_task_stream(client) as ts:
        res = extract(subj, tmp_path / "s.zarr", backbone="dinov2_q", scheduler=client.scheduler.address, **TINY)
    assert [s.computed for s in res.splits] == [12, 1]
    for s in res.splits:
        split = s.path.rsplit("/", 1)[1]
        computes = [ss for t in ts.data if str(t["key"]).startswith(f"featstore-{split}-")
                    for ss in t["startstops"] if ss["action"] == "compute"]
        window = max(c["stop"] for c in computes) - min(c["start"] for c in computes)
        assert 0 < s.seconds <= window + 0.05, (split, s.seconds, window)  # dask reads its clock elsewhere


def test_local_cluster_scratch_space_is_featstores_own_folder(client):
    """Workers keep dask-scratch-space/ in a folder featstore removes with the cluster, not in the temporary
    directory itself, where it used to be left behind."""
    tmp = Path(tempfile.gettempdir()).resolve()
    dirs = client.run(lambda dask_worker: dask_worker.local_directory)
    for d in map(Path, dirs.values()):
        rel = d.resolve().relative_to(tmp)
        assert rel.parts[0].startswith("featstore-dask-"), d


def test_half_precision_on_workers_records_its_error(subj, client, tmp_path):
    """--precision reaches the workers: each checks it on its own device, and the first task records the error."""
    out = tmp_path / "bf16.zarr"
    extract(subj, out, backbone="dinov2_q", batch_size=4, precision="bfloat16", splits=["train"],
            scheduler=client.scheduler.address, **TINY)
    fa = FeatureStore(out).get("dinov2_q_last", "01", "train")
    assert fa.is_complete() and fa.fingerprint["precision"] == "bfloat16"
    e = fa.provenance["precision_error"]
    assert e["precision"] == "bfloat16" and e["device"] == "cpu" and 1 <= e["images"] <= 4
    assert 0 < e["mean_rel"] < 0.05  # a task's first batch: its range may hold fewer images than --batch_size
