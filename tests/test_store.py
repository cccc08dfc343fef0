"""The store as other tools see it (format version 1), both chunk I/O paths, old stores, and the write side of
failures (locks, --overwrite, fingerprint messages, unusable output folders)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import TINY, cli_here

from featstore import FeatureDataset, FeatureStore, export_npy, extract
from featstore.errors import StoreError
from featstore.storage import FORMAT_VERSION, _zarr_compat, fingerprint_diff, nsd_ids

DATA = Path(__file__).parent / "data"


def _one_error(stderr: str) -> bool:
    """One error line (a RANDOM-weights warning may precede it), no traceback."""
    return stderr.count("featstore: error:") == 1 and "Traceback" not in stderr and stderr.endswith("\n")


@pytest.fixture(scope="module")
def store(subject, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("st") / "s.zarr"
    extract(subject, path, backbone="dinov2_q", batch_size=4, **TINY)
    return path


def _files(root: Path) -> dict[str, bytes]:
    """Every data file of a store (chunks and metadata), minus the parts that are random by design (uids, dates)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and "/c/" in f"/{rel}":
            out[rel] = p.read_bytes()
    return out


def test_fast_and_public_chunk_paths_write_identical_bytes_and_read_identical_values(subject, store, tmp_path):
    if not _zarr_compat.fast_enabled():
        pytest.skip("only the public path runs here (this zarr lacks the fast path's internals, or FEATSTORE_CHUNKIO=public)")
    with _zarr_compat.public_path():
        extract(subject, tmp_path / "pub.zarr", backbone="dinov2_q", batch_size=4, **TINY)
        pub = FeatureStore(tmp_path / "pub.zarr").get("dinov2_q_last", "01", "train")
        assert pub._steps is None
        pub_sample = pub.read_sample(3)
    fast = FeatureStore(store).get("dinov2_q_last", "01", "train")
    assert fast._steps is not None
    assert _files(store) == _files(tmp_path / "pub.zarr")
    np.testing.assert_array_equal(fast.read_sample(3), pub_sample)
    np.testing.assert_array_equal(fast.read(0, 6), pub.read(0, 6))


def test_environment_switch_selects_the_public_path(store):
    code = ("import featstore.storage._zarr_compat as c; from featstore.storage import FeatureStore; "
            f"fa = FeatureStore({str(store)!r}).get('dinov2_q_last', '01', 'train'); print(c.fast_enabled(), fa._steps); "
            "print(c.path_in_use())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FEATSTORE_CHUNKIO": "public"}, check=True).stdout
    first, said = out.splitlines()
    assert first.split() == ["False", "None"] and said.endswith("public API (configuration chunkio: public)"), out


def test_plain_zarr_sees_nan_for_unwritten_samples_and_dimension_names(subject, tmp_path):
    path = tmp_path / "p.zarr"
    extract(subject, path, backbone="dinov2_q", shard="0/2", splits=["train"], **TINY)  # first half only
    a = zarr.open_array(path, path="dinov2_q_last/01/train", mode="r")
    assert a.metadata.dimension_names == ("train_image", "token", "channel")
    values = a[...]
    assert np.isfinite(values[:3]).all() and np.isnan(values[3:]).all()
    fa = FeatureStore(path).get("dinov2_q_last", "01", "train")
    assert fa.format_version == FORMAT_VERSION == 1 and fa.provenance["format_version"] == 1


def test_xarray_opens_a_labelled_dataset_with_both_splits(store):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(store, group="dinov2_q_last/01", consolidated=False)
    fa = FeatureStore(store).get("dinov2_q_last", "01", "train")
    assert ds["train"].dims == ("train_image", "token", "channel") and ds["synt"].dims[0] == "synt_image"
    assert list(ds["train_image"].values) == fa.image_names
    assert list(ds["train_nsd_id"].values) == list(nsd_ids(fa.image_names)) and (ds["train_nsd_id"] >= 0).all()
    np.testing.assert_array_equal(ds["train"].sel(train_image=fa.image_names[2]).values, fa.read_sample(2))


def test_tensorstore_reads_the_same_values(store):
    ts = pytest.importorskip("tensorstore")
    t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / "dinov2_q_last/01/train")}}).result()
    fa = FeatureStore(store).get("dinov2_q_last", "01", "train")
    np.testing.assert_array_equal(t.read().result(), fa.read(0, 6))


def test_nsd_ids_from_names():
    assert list(nsd_ids(["train-0001_nsd-00013.png", "other.png"])) == [13, -1]


def test_format0_store_stays_readable(tmp_path):
    """A store written by the previous format (fill 0, one 'image' dimension, no coordinates), committed as data."""
    expected = json.loads((DATA / "format0_store.json").read_text())
    fs = FeatureStore(DATA / "format0_store")
    for split, want in expected.items():
        fa = fs.get("dinov2_q_last", "01", split)
        assert fa.format_version == 0 and fa.is_complete()
        values = fa.read(0, fa.shape[0])
        assert list(values.shape) == want["shape"] and hashlib.sha256(values.tobytes()).hexdigest() == want["sha256"]
    ds = FeatureDataset(fs, feature="dinov2_q_last", subj="01", split="train")
    assert tuple(ds[0].shape) == (48, 31, 31)
    out = export_npy(fs, tmp_path / "npy", progress=False)
    assert {p.name for p in out} == {"train.npy", "synt.npy"}


def test_interrupted_format0_store_resumes_in_its_own_format_and_codec(tmp_path, capsys):
    """An extraction begun by the previous featstore (format 0, lz4 codec, then the default) and interrupted is
    finished by rerunning the same command: only the missing sample is computed, in the array's own format and codec.
    The samples it kept are the old version's exact bytes; the recomputed one equals, bit for bit, what this
    environment computes for it in an uninterrupted run, and the old version's value within one float16 step (the
    fixture was written by another torch build: CPU and CUDA builds of torch differ in the last bits of a few
    elements, so values stored by another build are compared within a tolerance, never by their bytes)."""
    import shutil

    from featstore.sample import make_sample_subject

    store = tmp_path / "old.zarr"
    shutil.copytree(DATA / "format0_store", store)
    subj = make_sample_subject(tmp_path / "data", n_train=3, n_test=1, seed=0)  # the fixture's images
    fa = FeatureStore(store, mode="a").get("dinov2_q_last", "01", "train")
    old = fa.read(0, 3)
    fa.mark_undone([1])
    (store / "dinov2_q_last/01/train/c/1/0/0").unlink()  # as if killed before sample 1 was written
    codecs_before = json.loads((store / "dinov2_q_last/01/train/zarr.json").read_text())["codecs"]
    r = cli_here(capsys, "extract", "--data_dir", str(subj), "--output_dir", str(store), "--arch", "tiny",
                 "--weights", "random", "--device", "cpu", "--num_workers", "0")
    assert r.returncode == 0, r.stderr
    assert "dinov2_q_last/01/train: N=3" in r.stdout and "computed 1, skipped 2" in r.stdout, r.stdout
    assert "dinov2_q_last/01/synt: N=1" in r.stdout and "computed 0, skipped 1" in r.stdout, r.stdout
    fa = FeatureStore(store).get("dinov2_q_last", "01", "train")
    assert fa.format_version == 0 and fa.is_complete() and fa.verify().ok
    assert json.loads((store / "dinov2_q_last/01/train/zarr.json").read_text())["codecs"] == codecs_before
    got = fa.read(0, 3)
    np.testing.assert_array_equal(got[[0, 2]], old[[0, 2]])  # untouched: the old version's bytes
    extract(subj, tmp_path / "new.zarr", backbone="dinov2_q", splits=["train"], **TINY)  # this build, uninterrupted
    np.testing.assert_array_equal(got[1], FeatureStore(tmp_path / "new.zarr").get("dinov2_q_last", "01", "train")
                                  .read_sample(1))
    # one float16 step relative (2**-10), plus 1e-6 absolute near zero, where the builds' float32 sums differ by more
    # than a step of the tiny value (measured: CUDA vs CPU build of torch 2.14.1, 0.14% of elements, max 2.4e-4)
    np.testing.assert_allclose(got[1].astype(np.float32), old[1].astype(np.float32), rtol=2**-10, atol=1e-6)
    # a codec asked for explicitly is a different configuration
    r = cli_here(capsys, "extract", "--data_dir", str(subj), "--output_dir", str(store), "--arch", "tiny",
                 "--weights", "random", "--device", "cpu", "--num_workers", "0", "--codec", "none")
    assert r.returncode == 2 and "codec: stored blosc lz4 shuffle vs now none" in r.stderr, r.stderr
    assert "--overwrite" in r.stderr and fa.is_complete()


def test_fingerprint_message_names_the_differing_codec_part():
    old = {"codecs": [{"name": "bytes"}, {"name": "blosc", "configuration": {"typesize": 2, "cname": "lz4"}}]}
    new = {"codecs": [{"name": "bytes"}, {"name": "blosc", "configuration": {"typesize": 4, "cname": "lz4"}}]}
    assert fingerprint_diff(old, new) == "codecs[1].configuration.typesize: stored 2 vs now 4"


def test_changed_dtype_message_shows_what_differs(subject, store, capsys):
    r = cli_here(capsys, "extract", "--data_dir", str(subject), "--output_dir", str(store), "--arch", "tiny", "--weights",
                "random", "--device", "cpu", "--num_workers", "0", "--dtype", "float32")
    assert r.returncode == 2 and _one_error(r.stderr), r.stderr
    assert "dtype: stored \"float16\" vs now \"float32\"" in r.stderr


def test_overwrite_says_what_it_discards_and_keeps_an_unchanged_array(subject, tmp_path, caplog):
    path = tmp_path / "o.zarr"
    extract(subject, path, backbone="dinov2_q", splits=["train"], **TINY)
    uid = FeatureStore(path).get("dinov2_q_last", "01", "train").uid
    with caplog.at_level(logging.WARNING):
        res = extract(subject, path, backbone="dinov2_q", splits=["train"], overwrite=True, **TINY)
    assert res.splits[0].computed == 0 and FeatureStore(path).get("dinov2_q_last", "01", "train").uid == uid
    assert not [r for r in caplog.records if "discarding" in r.message]
    with caplog.at_level(logging.WARNING):
        extract(subject, path, backbone="dinov2_q", splits=["train"], overwrite=True, dtype="float32", **TINY)
    msgs = [r.message for r in caplog.records if "discarding" in r.message]
    assert len(msgs) == 1 and "dinov2_q_last/01/train (6/6 chunks done)" in msgs[0] and "dtype" in msgs[0]


# Hold the whole-array lock of dinov2_q_last/01/train in STORE as extract does; with FORK=1 also fork a child that
# inherits the lock file's descriptor (as DataLoader workers do), then SIGKILL this process and leave the child alive.
_HOLD_LOCK = """
import os, signal, sys, time
from pathlib import Path
from featstore.storage import WriterLock
WriterLock(Path(sys.argv[1]), "dinov2_q_last/01/train", (0, 1)).acquire()
if sys.argv[2] == "1" and os.fork() == 0:
    time.sleep(60)
    os._exit(0)
print("locked", os.getpid(), flush=True)
if sys.argv[2] == "1":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)
"""


def _session_alive(sid: int) -> bool:
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(p)) == sid:
                return True
        except OSError:  # exited meanwhile
            pass
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the forked child in /proc")
def test_lock_dies_with_its_holder_not_with_its_forked_children(store, tmp_path):
    """A killed extract's loader workers (forked, so they share its open files) outlive it for a moment; the share
    must be free as soon as the extract itself is gone, so that an immediate rerun is not refused."""
    import signal

    from featstore.storage import WriterLock

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(store), "1"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    line = holder.stdout.readline().split()
    holder.wait(timeout=60)
    try:
        assert line[0] == "locked" and holder.returncode == -signal.SIGKILL
        assert _session_alive(holder.pid), "the forked child should still be alive, holding the inherited descriptor"
        with WriterLock(store, "dinov2_q_last/01/train", (0, 1)):  # free at once, with the child still alive
            pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_second_writer_of_the_same_share_is_refused(subject, tmp_path, capsys):
    path = tmp_path / "l.zarr"
    extract(subject, path, backbone="dinov2_q", splits=["train"], shard="0/2", **TINY)
    holder = subprocess.Popen(  # another process holds the whole-array lock, as a running extract does
        [sys.executable, "-c", _HOLD_LOCK, str(path), "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().startswith("locked")
        before = FeatureStore(path).get("dinov2_q_last", "01", "train").done_mask()
        r = cli_here(capsys, "extract", "--data_dir", str(subject), "--output_dir", str(path), "--arch", "tiny",
                     "--weights", "random", "--device", "cpu", "--num_workers", "0")
        assert r.returncode == 2 and _one_error(r.stderr) and "already writing" in r.stderr, r.stderr
        np.testing.assert_array_equal(FeatureStore(path).get("dinov2_q_last", "01", "train").done_mask(), before)
        # another share is not blocked by it
        extract(subject, path, backbone="dinov2_q", splits=["train"], shard="1/2", **TINY)
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its holder: the same command now finishes the array
    res = extract(subject, path, backbone="dinov2_q", splits=["train"], **TINY)
    assert res.splits[0].done_chunks == 6 and res.splits[0].computed == 0


def test_subj_as_the_guide_writes_it(subject, tmp_path):
    res = extract(subject, tmp_path / "s.zarr", subj="1", backbone="dinov2_q", splits=["synt"], **TINY)
    assert res.splits[0].path == "dinov2_q_last/01/synt"


def test_dry_run_prints_arrays_and_bytes_and_writes_nothing(subject, tmp_path, capsys):
    r = cli_here(capsys, "extract", "--data_dir", str(subject), "--output_dir", str(tmp_path / "s.zarr"), "--arch", "tiny",
                "--weights", "random", "--backbone", "dinov2_q,dinov2", "--enc_layer", "0:2", "--dry_run")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("dinov2")]
    assert len(lines) == 8 and "dinov2_q_layer0/01/train: shape=(6, 962, 48) float16" in r.stdout
    assert "nothing was written" in r.stdout and not (tmp_path / "s.zarr").exists()


def test_free_space_warning(subject, tmp_path, caplog, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with caplog.at_level(logging.WARNING):
        extract(subject, tmp_path / "s.zarr", backbone="dinov2_q", splits=["synt"], **TINY)
    msgs = [r.message for r in caplog.records if "are free" in r.message]
    assert len(msgs) == 1 and "0.00 GB are free" in msgs[0]


def test_progress_counts_written_rows(subject, tmp_path):
    """The bar advances only after rows are durably written and marked done (it used to count computed rows)."""
    from featstore.extraction.writer import BackgroundWriter

    fs = FeatureStore(tmp_path / "w.zarr", mode="a")
    extract(subject, tmp_path / "w.zarr", backbone="dinov2_q", splits=["synt"], shard="1/2", **TINY)
    fa = fs.get("dinov2_q_last", "01", "synt")
    seen = []
    w = BackgroundWriter(durable=False, limit=1, on_written=lambda n: seen.append((n, fa.done_mask().tolist())))
    w.put(fa, 0, np.zeros((1, *fa.shape[1:]), dtype=fa.dtype))
    w.close()
    assert seen == [(1, [True, True])]


def test_lock_is_refused_in_process_too(store):
    fa = FeatureStore(store, mode="a").get("dinov2_q_last", "01", "synt")
    with fa.lock((0, 1)), pytest.raises(StoreError, match="already writing"):
        fa.lock((0, 1)).acquire()
    with fa.lock((0, 1)):  # released on exit
        pass


def test_info_runs_without_importing_torch():
    code = ("import sys, featstore.cli as c; c.main(['info', sys.argv[1]]); "
            "print('heavy:', sorted(m for m in ('torch', 'dask', 'timm', 'open_clip', 'PIL') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(DATA / "format0_store")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout and "dinov2_q_last/01/train" in r.stdout


@pytest.mark.parametrize("flag,value", [("--subj", "abc"), ("--backbone", "resnet"), ("--weights", "missing.pth"),
                                        ("--enc_layer", "x"), ("--data_dir", "nowhere"), ("--codec", "bitround-11")])
def test_extract_argument_errors_come_before_torch(subject, tmp_path, flag, value):
    """A wrong flag is reported without loading torch (a fraction of a second, not a model load)."""
    args = {"--data_dir": str(subject), "--output_dir": str(tmp_path / "s.zarr"), "--weights": "random",
            "--arch": "tiny", flag: value}
    code = ("import sys, featstore.cli as c; rc = c.main(sys.argv[1:]); "
            "print('rc', rc, 'heavy:', sorted(m for m in ('torch', 'timm', 'open_clip') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, "extract", *[x for kv in args.items() for x in kv]],
                       capture_output=True, text=True, cwd=tmp_path)
    assert "rc 2 heavy: []" in r.stdout, (r.stdout, r.stderr)
    assert r.stderr.count("featstore: error:") == 1 and flag in r.stderr, r.stderr
    assert not (tmp_path / "s.zarr").exists()


# ---- what a run leaves behind: no lock file after a clean finish, and removing it races safely -------------------------
def test_a_finished_extract_leaves_no_lock_file(subject, tmp_path):
    path = tmp_path / "s.zarr"
    extract(subject, path, backbone="dinov2_q", **TINY)
    extract(subject, path, backbone="dinov2_q", shard="1/2", **TINY)  # a rerun, and another share
    assert not list(path.rglob(".featstore-lock-*"))


# Hold the lock of dinov2_q_last/01/train in STORE; on "release" from stdin, release it (removing the file) and say so;
# on "try", try to acquire it once more and print whether that was refused.
_LOCK_PEER = """
import sys
from pathlib import Path
from featstore.storage import WriterLock
from featstore.errors import StoreError
lock = WriterLock(Path(sys.argv[1]), "dinov2_q_last/01/train", (0, 1))
if sys.argv[2] == "hold":
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.readline()
    lock.release()
    print("released", flush=True)
    sys.stdin.readline()
else:
    try:
        lock.acquire()
        print("acquired", flush=True)
    except StoreError:
        print("refused", flush=True)
"""


def test_lock_removed_by_its_holder_between_an_acquirers_open_and_lock_is_not_taken_twice(tmp_path):
    """The worst interleaving of removal on release: we open the lock file, then its holder (another process)
    releases and removes it, then we lock the descriptor we opened (which nothing guards any more). We must notice
    and lock the file at the path instead, so that a third process is refused while we hold it."""
    from featstore.storage import WriterLock

    holder = subprocess.Popen([sys.executable, "-c", _LOCK_PEER, str(tmp_path), "hold"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"

        class HolderLeavesAfterOurOpen(WriterLock):
            opened = 0

            def _open(self) -> int:
                fd = super()._open()
                self.opened += 1
                if self.opened == 1:  # the file the holder locks: let it release and remove it now
                    holder.stdin.write("release\n")
                    holder.stdin.flush()
                    assert holder.stdout.readline().strip() == "released"
                return fd

        lock = HolderLeavesAfterOurOpen(tmp_path, "dinov2_q_last/01/train", (0, 1))
        with lock:
            assert lock.opened == 2, "the lock on the removed file was kept"
            assert os.path.samestat(os.fstat(lock._fd), os.stat(lock.path))
            third = subprocess.run([sys.executable, "-c", _LOCK_PEER, str(tmp_path), "try"], capture_output=True,
                                   text=True, timeout=60, check=False)
            assert third.stdout.strip() == "refused", third.stdout + third.stderr
        assert not lock.path.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
