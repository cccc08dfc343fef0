"""Crash safety and resume: real subprocesses killed with real signals, real stores on disk."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from zarr.storage import LocalStore, WrapperStore

from featstore import extract
from featstore.errors import CorruptImageError, StoreWriteError
from featstore.sample import make_sample_subject
from featstore.storage import FeatureStore
from tests.conftest import TINY, cli_here

N = 10
CRASHRUN = Path(__file__).with_name("crashrun.py")
ARR = ("dinov2_q_last", "01", "train")


@pytest.fixture(scope="module")
def subj(tmp_path_factory) -> Path:
    return make_sample_subject(tmp_path_factory.mktemp("rs"), subj="01", n_train=N, n_test=2, seed=3)


@pytest.fixture(scope="module")
def reference(subj, tmp_path_factory) -> dict[str, np.ndarray]:
    """An uninterrupted run: what every interrupted-then-resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    extract(subj, out, backbone="dinov2_q", batch_size=4, **TINY)
    fs = FeatureStore(out)
    arrays = {s: fs.get("dinov2_q_last", "01", s) for s in ("train", "synt")}
    return {s: fa.read(0, fa.shape[0]) for s, fa in arrays.items()}


def _assert_equal_to_reference(store: Path, reference) -> None:
    fs = FeatureStore(store)
    for split, ref in reference.items():
        fa = fs.get("dinov2_q_last", "01", split)
        assert fa.is_complete()
        np.testing.assert_array_equal(fa.read(0, fa.shape[0]), ref)
        assert fa.verify().ok
    assert not list(Path(store).rglob("*.partial"))


def _done(store: Path, split: str = "train") -> int:
    return int(FeatureStore(store).get("dinov2_q_last", "01", split).done_mask().sum())


# point, K, chunk, expected done chunks of `train` at the kill (None: depends on the writer thread's lag)
CRASHES = [
    ("forward", 2, 1, None),
    ("mid_write", 6, 1, 4),  # first run done; killed writing the 2nd chunk of the 2nd run
    ("after_write", 2, 1, 4),  # 2nd run's data written but not fsync'ed/marked: must not count
    ("mid_mark", 6, 1, 6),  # 6 markers written: the 2nd run is half marked
    ("mid_write", 2, 3, 1),  # chunks of 3 samples (staged across batches): the 2nd chunk is torn
]
CRASH_IDS = [f"{c[0]}-{c[1]}-chunk{c[2]}" for c in CRASHES]


def _crash_applies(point: str) -> bool:
    from featstore.storage import _zarr_compat

    return point not in ("mid_write", "mid_mark") or _zarr_compat.fast_enabled()


@pytest.fixture(scope="module")
def crashed(subj, tmp_path_factory):
    """Every crash run started at once, each a real process forked from one interpreter (crashrun.py) into its own
    store; `crashed(id)` waits for them and gives (store, exit status, the run's output)."""
    root = tmp_path_factory.mktemp("crash")
    jobs = {cid: {"store": str(root / cid / "s.zarr"), "point": point, "k": k, "chunk": chunk, "batch": 4}
            for cid, (point, k, chunk, _) in zip(CRASH_IDS, CRASHES) if _crash_applies(point)}
    p = subprocess.Popen([sys.executable, str(CRASHRUN), str(subj), json.dumps(list(jobs.values()))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done: dict[str, int] = {}

    def result(cid: str) -> tuple[Path, int, str]:
        if not done:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, (out, err)
            done.update(json.loads(out.strip().splitlines()[-1]))
        store = jobs[cid]["store"]
        return Path(store), done[store], Path(store + ".log").read_text()

    yield result
    if p.poll() is None:
        p.kill()
        p.communicate()


@pytest.mark.parametrize("point,k,chunk,expected_done", CRASHES, ids=CRASH_IDS)
def test_sigkill_then_resume_is_bit_identical(crashed, subj, reference, request, point, k, chunk, expected_done):
    if not _crash_applies(point):
        pytest.skip("the kill point patches the fast chunk path, which this zarr lacks")
    store, code, log = crashed(request.node.callspec.id)
    assert code == -signal.SIGKILL, (code, log)
    done = _done(store)
    if expected_done is not None:
        assert done == expected_done
    if point == "mid_write":
        assert list(store.rglob("*.partial")), "the kill should leave a torn temporary chunk file"
    res = extract(subj, store, backbone="dinov2_q", batch_size=4, chunk=chunk, **TINY)
    train = res.splits[0]
    chunk_rows = min(chunk, N)
    assert train.computed == N - done * chunk_rows  # nothing already marked done is computed again
    assert train.skipped == done * chunk_rows
    _assert_equal_to_reference(store, reference)


def test_resume_of_finished_store_computes_nothing(subj, reference, tmp_path):
    store = tmp_path / "s.zarr"
    extract(subj, store, backbone="dinov2_q", batch_size=4, **TINY)
    before = sorted((p, p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file())
    res = extract(subj, store, backbone="dinov2_q", batch_size=4, **TINY)
    assert [s.computed for s in res.splits] == [0, 0] and [s.skipped for s in res.splits] == [N, 2]
    assert sorted((p, p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file()) == before


def _cli_args(subj, store, *extra):
    return [sys.executable, "-m", "featstore.cli", "extract", "--data_dir", str(subj), "--output_dir", str(store),
            "--arch", "tiny", "--weights", "random", "--device", "cpu", "--num_workers", "0", *extra]


@pytest.mark.parametrize("sig,code,group", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, True)],
                         ids=["sigint", "sigterm-to-the-group"])
def test_signal_gives_exit_code_and_resumable_store(tmp_path, sig, code, group, capsys):
    """SIGINT to the process; SIGTERM to the whole process group with loader workers, as scancel and
    `kill -- -PGID` send it: one line, no worker traceback, a store that resumes bit-identically."""
    n = 24
    subj = make_sample_subject(tmp_path / "d", n_train=n, n_test=0, seed=5)
    store = tmp_path / "s.zarr"
    workers = ("--num_workers", "2") if group else ()
    p = subprocess.Popen([*_cli_args(subj, store, "--batch_size", "2"), *workers], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=group)
    deadline = time.time() + 120
    while time.time() < deadline:
        done_dir = list(store.glob("dinov2_q_last/01/train/done-*"))
        if done_dir and len(os.listdir(done_dir[0])) >= 4:
            break
        time.sleep(0.02)
    if group:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    _out, err = p.communicate(timeout=120)
    assert p.returncode == code, (p.returncode, err)
    assert "rerun the same command to resume" in err and "Traceback" not in err, err
    done = _done(store)
    assert 4 <= done < n
    r = cli_here(capsys, *_cli_args(subj, store, "--batch_size", "2")[3:])  # the rerun: the same command
    assert r.returncode == 0, r.stderr
    assert f"computed {n - done}, skipped {done}" in r.stdout
    ref = tmp_path / "ref.zarr"
    extract(subj, ref, backbone="dinov2_q", batch_size=8, **TINY)
    a, b = (FeatureStore(x).get(*ARR) for x in (store, ref))
    np.testing.assert_array_equal(a.read(0, n), b.read(0, n))


class DiskFullAfter(WrapperStore):
    """A zarr store that raises ENOSPC once `limit` chunk files have been written."""

    def __init__(self, store, limit: int):
        super().__init__(store)
        self.limit, self.writes = limit, 0

    async def set(self, key, value):
        if "/c/" in key:
            self.writes += 1
            if self.writes > self.limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        return await self._store.set(key, value)


def test_disk_full_then_resume(subj, reference, tmp_path):
    store = tmp_path / "s.zarr"
    faulty = FeatureStore(DiskFullAfter(LocalStore(store), limit=6), mode="a")
    with pytest.raises(StoreWriteError, match="No space left on device"):
        extract(subj, store, backbone="dinov2_q", batch_size=4, store=faulty, **TINY)
    assert _done(store) == 4  # the first run of 4 chunks; the failing run is not marked
    res = extract(subj, store, backbone="dinov2_q", batch_size=4, **TINY)
    assert res.splits[0].computed == N - 4
    _assert_equal_to_reference(store, reference)


def test_two_concurrent_shards_equal_one_process(subj, reference, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    procs = [subprocess.Popen(_cli_args(subj, store, "--shard", f"{k}/2", "--batch_size", "3"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "computed 5, skipped 5" in outs[0][0] and "computed 5, skipped 5" in outs[1][0]
    _assert_equal_to_reference(store, reference)
    info = cli_here(capsys, "info", str(store))
    assert "10/10" in info.stdout and "2/2" in info.stdout


def _snapshot(store: Path):
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in store.rglob("*"))


def test_changed_configuration_is_refused_and_changes_nothing(tmp_path, capsys):
    from featstore.errors import FingerprintMismatchError

    subj = make_sample_subject(tmp_path / "d", n_train=4, n_test=0, seed=2)
    store = tmp_path / "s.zarr"
    extract(subj, store, backbone="dinov2_q", **TINY)
    before = _snapshot(store)
    with pytest.raises(FingerprintMismatchError, match="different configuration.*weights.*--overwrite"):
        extract(subj, store, backbone="dinov2_q", seed=1, **TINY)
    shutil.copy(next((subj / "training_split/training_images").glob("*.png")),
                subj / "training_split/training_images/zz-extra.png")
    r = cli_here(capsys, *_cli_args(subj, store)[3:])
    assert r.returncode == 2 and "image list: stored 4 images vs now 5" in r.stderr, r.stderr
    assert _snapshot(store) == before
    res = extract(subj, store, backbone="dinov2_q", overwrite=True, **TINY)
    assert res.splits[0].computed == 5 and FeatureStore(store).get(*ARR).shape[0] == 5


def test_verify_detects_flipped_byte_and_repair_recomputes(subj, reference, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    extract(subj, store, backbone="dinov2_q", batch_size=4, **TINY)
    assert cli_here(capsys, "verify", str(store)).returncode == 0
    chunk = store / "dinov2_q_last/01/train/c/7/0/0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    r = cli_here(capsys, "verify", str(store))
    assert r.returncode == 1 and "dinov2_q_last/01/train: FAILED" in r.stdout and "corrupt chunks: 7" in r.stdout
    r = cli_here(capsys, "verify", "--repair", str(store))
    assert r.returncode == 1 and "marked not done" in r.stdout
    res = extract(subj, store, backbone="dinov2_q", batch_size=4, **TINY)
    assert res.splits[0].computed == 1
    assert cli_here(capsys, "verify", str(store)).returncode == 0
    _assert_equal_to_reference(store, reference)


def test_corrupt_image_names_file_and_keeps_finished_chunks(tmp_path, capsys):
    subj = make_sample_subject(tmp_path / "d", n_train=12, n_test=0, seed=4)
    bad = sorted((subj / "training_split/training_images").glob("*.png"))[9]
    bad.write_bytes(bad.read_bytes()[:300])  # truncated PNG
    store = tmp_path / "s.zarr"
    r = cli_here(capsys, *_cli_args(subj, store, "--batch_size", "4")[3:])
    assert r.returncode == 1, r.stderr
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("featstore: error:")]
    assert len(errs) == 1 and bad.name in errs[0] and "Traceback" not in r.stderr
    assert _done(store) == 8  # the two batches before the broken one are kept
    with pytest.raises(CorruptImageError):
        extract(subj, store, backbone="dinov2_q", batch_size=4, **TINY)
