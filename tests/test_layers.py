"""Many layers and both DINOv2 variants from one forward pass: each array equals its single-output run,
a killed multi-output run resumes bit-identically, and a rerun that adds a layer writes only the new arrays."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, cli_here

from featstore import FeatureStore, extract

MULTI = {"backbone": "dinov2_q,dinov2", "enc_layer": "0:3"}  # the tiny DINOv2 has 3 blocks: 6 arrays
FEATURES = [f"{v}_{k}" for v in ("dinov2_q", "dinov2") for k in ("layer0", "layer1", "last")]


def _values(store: Path) -> dict[str, np.ndarray]:
    fs = FeatureStore(store)
    return {p: fs.get(*p.split("/")).read(0, fs.get(*p.split("/")).shape[0]) for p in fs.list_arrays()}


def _files(store: Path, feature: str) -> dict[str, tuple[int, bytes]]:
    root = store / feature
    return {p.relative_to(store).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def multi(subject, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("multi") / "m.zarr"
    res = extract(subject, store, batch_size=4, **MULTI, **TINY)
    assert sorted({s.path.split("/")[0] for s in res.splits}) == sorted(FEATURES)
    return store


def test_each_array_equals_its_single_output_run(subject, multi, tmp_path):
    got = _values(multi)
    assert len(got) == 12  # 6 features x 2 splits
    for variant, layer, feature in (("dinov2_q", 0, "dinov2_q_layer0"), ("dinov2", 1, "dinov2_layer1"),
                                    ("dinov2_q", -1, "dinov2_q_last"), ("dinov2", 2, "dinov2_last")):
        single = tmp_path / f"{feature}.zarr"
        extract(subject, single, backbone=variant, enc_layer=layer, batch_size=4, **TINY)
        for split in ("train", "synt"):
            np.testing.assert_array_equal(got[f"{feature}/01/{split}"], _values(single)[f"{feature}/01/{split}"])
        meta = FeatureStore(multi).get(feature, "01", "train").provenance
        assert meta["backbone"] == variant and meta["head"] == ("qkv.query" if variant == "dinov2_q" else "norm")


def test_adding_a_layer_writes_only_the_new_arrays(subject, multi, tmp_path):
    import shutil

    store = tmp_path / "m.zarr"
    shutil.copytree(multi, store)
    before = {f: _files(store, f) for f in FEATURES}
    time.sleep(0.01)
    res = extract(subject, store, backbone="dinov2_q,dinov2", enc_layer="0:3,-1", batch_size=4, **TINY)
    assert {s.path: s.computed for s in res.splits if s.computed} == {}  # nothing new asked: nothing computed
    res = extract(subject, store, backbone="dinov2", enc_layer="0,1", batch_size=4, **TINY)  # no new layer either
    assert all(s.computed == 0 for s in res.splits)
    res = extract(subject, store, backbone="dinov2_q", enc_layer="1,-1", batch_size=4, chunk=1, **TINY)
    assert all(s.computed == 0 for s in res.splits)
    # a store made without layer1 of dinov2: add it, and only it is written
    partial = tmp_path / "p.zarr"
    extract(subject, partial, backbone="dinov2_q,dinov2", enc_layer="0,-1", batch_size=4, **TINY)
    kept = {f: _files(partial, f) for f in ("dinov2_q_layer0", "dinov2_q_last", "dinov2_layer0", "dinov2_last")}
    res = extract(subject, partial, backbone="dinov2_q,dinov2", enc_layer="0:3", batch_size=4, **TINY)
    computed = {s.path: s.computed for s in res.splits}
    assert computed == {f"{f}/01/{sp}": (6 if sp == "train" else 2) * ("layer1" in f)
                        for f in FEATURES for sp in ("train", "synt")}
    for f, files in kept.items():
        assert _files(partial, f) == files, f"{f} was rewritten"
    assert before == {f: _files(store, f) for f in FEATURES}
    np.testing.assert_equal(_values(partial), _values(multi))


def test_kill_and_resume_of_a_multi_output_run_is_bit_identical(multi, tmp_path, capsys):
    from featstore.sample import make_sample_subject

    subj = make_sample_subject(tmp_path / "d", n_train=24, n_test=0, seed=4)
    store = tmp_path / "k.zarr"
    args = [sys.executable, "-m", "featstore.cli", "extract", "--data_dir", str(subj), "--output_dir", str(store),
            "--arch", "tiny", "--weights", "random", "--device", "cpu", "--num_workers", "0", "--batch_size", "2",
            "--backbone", "dinov2_q,dinov2", "--enc_layer", "0:3"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker_dir = store / "dinov2_last/01/train"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(marker_dir.glob("done-*/*"))) < 4:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    fs = FeatureStore(store)
    done = {a: int(fs.get(*a.split("/")).done_mask().sum()) for a in fs.list_arrays()}
    assert 0 < min(done.values()) and min(done.values()) < 24, done
    r = cli_here(capsys, *args[3:])  # the rerun: the same command
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():  # each array computes exactly what it lacked at the kill
        path = line.split(":")[0]
        assert f"computed {24 - done[path]}," in line, (line, done[path])
    ref = tmp_path / "ref.zarr"
    extract(subj, ref, batch_size=6, **MULTI, **TINY)
    np.testing.assert_equal(_values(store), _values(ref))
