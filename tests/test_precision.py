"""--precision: half-precision forward passes under autocast, their measured error in the provenance, and resume
refusing to mix precisions in one array."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, cli_here

from featstore import FeatureStore, extract
from featstore.errors import BadArgumentError, FingerprintMismatchError
from featstore.extraction.precision import check_precision, no_tf32

ARR = ("dinov2_q_last", "01", "train")
B = 4  # batch size: the first batch is what the error is measured on


@pytest.fixture(scope="module")
def stores(tmp_path_factory, subject):
    """The same tiny extraction in float32 and in bfloat16 (stored float16 both)."""
    root = tmp_path_factory.mktemp("precision")
    for precision in ("float32", "bfloat16"):
        extract(subject, root / f"{precision}.zarr", backbone="dinov2_q", batch_size=B, precision=precision,
                splits=["train"], **TINY)
    return root


def test_bfloat16_records_its_error_against_the_float32_store(stores):
    ref = FeatureStore(stores / "float32.zarr").get(*ARR)
    half = FeatureStore(stores / "bfloat16.zarr").get(*ARR)
    assert ref.provenance["precision"] == "float32" and "precision_error" not in ref.provenance
    assert half.provenance["precision"] == "bfloat16" and half.fingerprint["precision"] == "bfloat16"
    e = half.provenance["precision_error"]
    assert e["images"] == B and e["precision"] == "bfloat16" and e["compared"] == "stored float16 values"
    # independent: the stored float16 values of the two runs, first batch
    a, r = half.read(0, B).astype(np.float64), ref.read(0, B).astype(np.float64)
    d = np.abs(a - r)
    rel = np.linalg.norm(a - r, axis=-1) / np.linalg.norm(r, axis=-1)
    assert d.max() > 0  # bfloat16 did change the values
    np.testing.assert_allclose([e["max_abs"], e["mean_abs"], e["max_rel"], e["mean_rel"]],
                               [d.max(), d.mean(), rel.max(), rel.mean()], rtol=1e-5)
    assert e["mean_rel"] < 0.05  # bfloat16 keeps 8 bits: errors of a few 1e-3 per token
    # the rest of the array is the autocast forward, not the float32 one
    assert not np.array_equal(half.read(B, None), ref.read(B, None))


def test_info_shows_the_precision_error(stores, capsys):
    r = cli_here(capsys, "info", str(stores / "bfloat16.zarr"))
    assert r.returncode == 0
    line = next(x for x in r.stdout.splitlines() if x.startswith("precision: dinov2_q_last/01/train"))
    assert f"bfloat16 vs float32 on the first {B} images (cpu, stored float16 values)" in line and "mean" in line
    r = cli_here(capsys, "info", str(stores / "float32.zarr"))
    assert "precision:" not in r.stdout


def test_resume_refuses_another_precision(stores, subject, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    shutil.copytree(stores / "bfloat16.zarr", store)
    before = FeatureStore(store).get(*ARR).read(0, None)
    with pytest.raises(FingerprintMismatchError, match='precision: stored "bfloat16" vs now "float32".*--overwrite'):
        extract(subject, store, backbone="dinov2_q", batch_size=B, splits=["train"], **TINY)
    r = cli_here(capsys, "extract", "--data_dir", str(subject), "--output_dir", str(store), "--arch", "tiny",
                 "--weights", "random", "--device", "cpu", "--num_workers", "0", "--precision", "float16")
    assert r.returncode == 2 and 'precision: stored "bfloat16" vs now "float16"' in r.stderr, r.stderr
    np.testing.assert_array_equal(FeatureStore(store).get(*ARR).read(0, None), before)
    res = extract(subject, store, backbone="dinov2_q", batch_size=B, precision="bfloat16", splits=["train"], **TINY)
    assert all(s.computed == 0 for s in res.splits)  # same precision: resumes, nothing left


def test_array_made_before_precision_resumes_as_float32(stores, subject, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(stores / "float32.zarr", store)
    meta_file = store.joinpath(*ARR, "zarr.json")
    meta = json.loads(meta_file.read_text())
    del meta["attributes"]["featstore"]["fingerprint"]["precision"]  # as an older featstore wrote it
    del meta["attributes"]["featstore"]["precision"]
    meta_file.write_text(json.dumps(meta))
    res = extract(subject, store, backbone="dinov2_q", batch_size=B, splits=["train"], **TINY)
    assert [s.computed for s in res.splits if s.path.endswith("train")] == [0]
    with pytest.raises(FingerprintMismatchError, match='precision: stored null vs now "bfloat16"'):
        extract(subject, store, backbone="dinov2_q", batch_size=B, precision="bfloat16", splits=["train"], **TINY)


def test_precision_checks(caplog):
    with pytest.raises(BadArgumentError, match=r"^precision 'int8': choose float32, bfloat16, float16$"):
        extract("unused", "unused", precision="int8", **TINY)
    with pytest.raises(BadArgumentError, match="bfloat16: torch has no autocast on meta devices; use --precision "
                                               "float32"):
        check_precision("bfloat16", torch.device("meta"))
    check_precision("bfloat16", torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="featstore"):
        check_precision("float16", torch.device("cpu"))
    assert "float16 on the CPU is slower than float32" in caplog.text


def test_float32_runs_with_tf32_off_on_cuda_and_restores_it():
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with no_tf32(torch.device("cuda")):
            with no_tf32(torch.device("cuda")):  # nested (two extractions in one process)
                pass
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with no_tf32(torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32  # nothing changes off CUDA
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c
