"""Remote stores: every command against a real S3-compatible server (moto, on 127.0.0.1), with and without
--pack, compared with the same extraction on local disk. Credentials and endpoint come from the environment only.

Per pack value, one store is made the hard way: a `featstore extract` subprocess is SIGKILLed after the objects of
its second unit run were PUT but before their done markers, then the extraction is resumed.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from s3server import s3_keys
from torch.utils.data import DataLoader

from featstore.dataset import FeatureDataset
from featstore.export import export_npy
from featstore.extraction import ExtractResult, extract
from featstore.sample import make_sample_subject
from featstore.stats import feature_stats, load_feature_stats
from featstore.stats.report import format_info
from featstore.storage import FeatureStore
from tests.conftest import TINY, run_cli

N_TRAIN, N_TEST, BATCH = 6, 2, 2  # --pack 4: a full and an edge shard
ARR = ("dinov2_q_last", "01", "train")

# the CLI in a subprocess, killed (SIGKILL) when the 2nd unit run is about to be marked done: its objects are PUT
CRASH = """
import os, signal, sys
from featstore.storage import CompletionRecord
orig, calls = CompletionRecord.mark_done, [0]
def mark_done(self, units, durable):
    calls[0] += 1
    if calls[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, units, durable)
CompletionRecord.mark_done = mark_done
from featstore.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Made:
    pack: int
    url: str
    local: Path
    done_at_kill: int  # units of train marked done when the extraction was killed
    keys_at_kill: list[str]
    resumed: ExtractResult


@pytest.fixture(scope="module")
def subj(tmp_path_factory) -> Path:
    return make_sample_subject(tmp_path_factory.mktemp("s3data"), subj="01", n_train=N_TRAIN, n_test=N_TEST, seed=11)


@pytest.fixture(scope="module")
def local(subj, tmp_path_factory) -> Path:
    """The same extraction on local disk, unpacked: values do not depend on the layout."""
    out = tmp_path_factory.mktemp("local") / "s.zarr"
    extract(subj, out, backbone="dinov2_q", batch_size=BATCH, **TINY)
    return out


PACKS = [1, 4]


@pytest.fixture(scope="module")
def killed(s3_bucket, subj) -> dict[int, str]:
    """Both killed CLI runs (plain and --pack 4), started together: their start-up (imports) overlaps."""
    urls = {pack: f"{s3_bucket}/made-pack{pack}-{uuid.uuid4().hex[:8]}.zarr" for pack in PACKS}
    procs = {pack: subprocess.Popen(
        [sys.executable, "-c", CRASH, "extract", "--data_dir", str(subj), "--output_dir", url, "--arch", "tiny",
         "--weights", "random", "--device", "cpu", "--num_workers", "0", "--batch_size", str(BATCH), "--pack",
         str(pack)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pack, url in urls.items()}
    for p in procs.values():
        _, err = p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, (p.returncode, err)
    return urls


@pytest.fixture(scope="module", params=PACKS, ids=["plain", "pack4"])
def made(request, killed, subj, local) -> Made:
    pack, url = request.param, killed[request.param]
    done = int(FeatureStore(url).get(*ARR).done_mask().sum())
    keys = s3_keys(url)
    resumed = extract(subj, url, backbone="dinov2_q", batch_size=BATCH, pack=pack, **TINY)
    return Made(pack, url, local, done, keys, resumed)


def test_kill_then_resume_recomputes_only_unmarked_units(made):
    k = made.pack  # rows per unit (chunk 1)
    assert made.done_at_kill == {1: 2, 4: 1}[k]  # the 1st unit run: one batch of 2 units, or one shard of 4 rows
    # the killed run had PUT the objects of its 2nd run: they are in the bucket, but unmarked, so they do not count
    unit = made.done_at_kill
    markers = {key.rsplit("/", 1)[1] for key in made.keys_at_kill if key.startswith("dinov2_q_last/01/train/done-")}
    assert markers == {str(i) for i in range(made.done_at_kill)}
    assert f"dinov2_q_last/01/train/c/{unit}/0/0" in made.keys_at_kill
    train = made.resumed.splits[0]
    assert (train.computed, train.skipped) == (N_TRAIN - made.done_at_kill * k, made.done_at_kill * k)
    for split in ("train", "synt"):
        a, b = (FeatureStore(s).get("dinov2_q_last", "01", split) for s in (made.url, made.local))
        assert a.is_complete() and a.nchunks == -(-b.shape[0] // made.pack)
        np.testing.assert_array_equal(a.read(0, a.shape[0]), b.read(0, b.shape[0]))


def test_objects_verify_and_info(made):
    keys = s3_keys(made.url)
    nunits = -(-N_TRAIN // made.pack)
    chunks = sorted(k for k in keys if k.startswith("dinov2_q_last/01/train/c/"))
    assert chunks == [f"dinov2_q_last/01/train/c/{i}/0/0" for i in range(nunits)]  # --pack 4: 1 object per 4 images
    assert len([k for k in keys if k.startswith("dinov2_q_last/01/train/done-")]) == nunits
    reports = {fa.path: fa.verify() for fa in FeatureStore(made.url).arrays()}  # what `featstore verify` runs
    assert all(rep.ok for rep in reports.values()) and reports["dinov2_q_last/01/train"].done == nunits
    info = format_info(made.url)  # `featstore info`
    assert made.url in info and f"{nunits}/{nunits}" in info


def test_export_npy_to_local_folder(made, tmp_path):
    r = run_cli("export-npy", "--store", made.url, "--output_dir", str(tmp_path / "s3"))
    assert r.returncode == 0, r.stderr
    export_npy(made.local, tmp_path / "local", progress=False)
    for split in ("train", "synt"):
        rel = f"dinov2_q_last/01/{split}.npy"
        assert (tmp_path / "s3" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes()


def test_stats_saved_in_the_bucket(made):
    remote = feature_stats(made.url, *ARR)
    local = feature_stats(made.local, *ARR, save=False)
    assert remote["saved_to"].startswith(made.url)
    loaded = load_feature_stats(made.url, *ARR)
    for r in (remote, loaded):
        for part in ("patch", "cls"):
            for f in ("min", "max"):
                np.testing.assert_array_equal(r[part][f], local[part][f])
            for f in ("mean", "std"):  # tasks follow the storage units (--pack 4: 4 images), so float64 sums group
                # differently than in the unpacked local store: equal up to the last bits
                np.testing.assert_allclose(r[part][f], local[part][f], rtol=1e-13, atol=1e-15)
        np.testing.assert_array_equal(r["token_norm"], local["token_norm"])
        np.testing.assert_array_equal(r["hist"]["counts"], local["hist"]["counts"])


def test_dataset_with_two_loader_workers(made):
    """fork workers: each opens its own S3 client from the URL (the parent's is bound to the parent's loop)."""
    ds = FeatureDataset(made.url, *ARR)
    first = ds[0]  # the parent reads too, before forking
    loader = DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context="fork")
    got = torch.cat(list(loader))
    ref = FeatureDataset(made.local, *ARR)
    want = torch.stack([ref[i] for i in range(len(ref))])
    assert got.shape == (N_TRAIN, *first.shape)
    assert torch.equal(got, want) and torch.equal(first, want[0])


def test_storage_options_flag_instead_of_the_environment(made):
    """verify/info take the endpoint from --storage_options when the environment does not name one."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    opts = json.dumps({"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    r = subprocess.run([sys.executable, "-m", "featstore.cli", "verify", made.url, "--storage_options", opts],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "dinov2_q_last/01/train: ok" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "featstore.cli", "info", made.url, "--storage_options", "[1]"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--storage_options" in r.stderr and "Traceback" not in r.stderr, r.stderr
