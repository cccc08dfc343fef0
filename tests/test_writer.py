"""The write path after the forward pass with many arrays at once (extraction.run.write_batches): the files are
byte for byte those of one array written at a time, arrays are written concurrently, a failing array stops the run
with every unit marked done intact, and torch's thread count is left as it was."""
from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from zarr.storage import LocalStore, WrapperStore

from featstore import FeatureStore
from featstore.errors import Float16OverflowError, StoreWriteError
from featstore.extraction import ExtractConfig
from featstore.extraction.run import write_batches
from featstore.storage import ArraySpec

N, T, C, BATCH = 10, 5, 4, 4


def _data(k: int) -> list[np.ndarray]:
    """float32 rows that float16 rounds (and one value that only just stays finite)."""
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((N, T, C)) * 10 ** rng.uniform(-3, 3, (N, T, C))).astype(np.float32)
    x[0, 0, 0] = 65504.0
    return [x * (j + 1) / 7 for j in range(k)]


def _arrays(fs: FeatureStore, features: list[str], chunk: int):
    meta = {"token_layout": {"cls_index": 0, "grid": [2, 2], "n_tokens": T},
            "image_names": [f"img{i}.png" for i in range(N)]}
    return [fs.prepare(f, "01", "train", ArraySpec((N, T, C), chunk, "float16"), meta=meta, fingerprint={})[0]
            for f in features]


def _write(arrays, data: dict[str, np.ndarray], cfg: ExtractConfig, on_written=None, todo=None) -> dict[str, int]:
    batches = ((np.arange(a, min(a + BATCH, N)),
                {fa.feature: torch.from_numpy(data[fa.feature][a : a + BATCH]) for fa in arrays})
               for a in range(0, N, BATCH))
    todo = todo or {fa.path: list(range(fa.nchunks)) for fa in arrays}
    return write_batches(arrays, todo, batches, cfg, on_written=on_written)


def _files(store: Path, path: str) -> dict[str, bytes]:
    """Every chunk file of the array (name -> bytes) and the names of its done markers."""
    root = store / path
    chunks = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "c").rglob("*")) if p.is_file()}
    markers = sorted(p.name for p in root.glob("done-*/*"))
    return {**chunks, "markers": "\n".join(markers).encode()}


@pytest.mark.parametrize("chunk", [1, 3], ids=["chunk1", "chunk3-staged"])
def test_many_arrays_write_the_same_files_as_one_at_a_time(tmp_path, chunk):
    features = [f"f{j}" for j in range(6)]
    data = dict(zip(features, _data(6)))
    together, alone = tmp_path / "together.zarr", tmp_path / "alone.zarr"
    arrays = _arrays(FeatureStore(together, mode="a"), features, chunk)
    lanes: set[str] = set()
    written = _write(arrays, data, ExtractConfig(durable=True),
                     on_written=lambda n: lanes.add(threading.current_thread().name))
    assert written == dict.fromkeys((fa.path for fa in arrays), N)
    assert len(lanes) > 1, lanes  # the arrays were written by several threads at once
    fs_alone = FeatureStore(alone, mode="a")
    for f in features:
        _write(_arrays(fs_alone, [f], chunk), data, ExtractConfig(durable=True))
    for fa in arrays:
        assert fa.is_complete()
        got = _files(together, fa.path)
        assert len(got) == -(-N // chunk) + 1
        assert got == _files(alone, fa.path), fa.path
        np.testing.assert_array_equal(fa.read(0, N), data[fa.feature].astype(np.float16))


class DiskFullFor(WrapperStore):
    """A zarr store that raises ENOSPC for the chunk files of one array after `limit` of them were written."""

    def __init__(self, store, array: str, limit: int):
        super().__init__(store)
        self.array, self.limit, self.writes = array, limit, 0

    async def set(self, key, value):
        if key.startswith(f"{self.array}/") and "/c/" in key:
            self.writes += 1
            if self.writes > self.limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        return await self._store.set(key, value)


def test_a_failing_array_stops_the_run_with_every_done_unit_intact(tmp_path):
    features = [f"f{j}" for j in range(5)]
    data = dict(zip(features, _data(5)))
    store = tmp_path / "s.zarr"
    faulty = FeatureStore(DiskFullFor(LocalStore(store), "f2/01/train", limit=5), mode="a")
    arrays = _arrays(faulty, features, 1)
    with pytest.raises(StoreWriteError, match=r"writing chunk \d+ of f2/01/train failed: No space left on device"):
        _write(arrays, data, ExtractConfig(durable=True))
    fs = FeatureStore(store)
    done = {f: fs.get(f, "01", "train").done_mask() for f in features}
    assert done["f2"].sum() == 4  # the first run of 4 chunks; the failing run is not marked
    for f in features:
        fa = fs.get(f, "01", "train")
        assert fa.verify().corrupt == []
        for i in np.flatnonzero(done[f]):
            np.testing.assert_array_equal(fa.read(int(i)), data[f][i : i + 1].astype(np.float16))


def test_conversions_leave_torch_threads_as_they_were(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        data = dict(zip(["a", "b"], _data(2)))
        arrays = _arrays(FeatureStore(tmp_path / "s.zarr", mode="a"), ["a", "b"], 1)
        _write(arrays, data, ExtractConfig(durable=False))
        assert torch.get_num_threads() == 2
        data["b"] = data["b"].copy()
        data["b"][0, 1, 2] = 1e6  # beyond float16
        arrays = _arrays(FeatureStore(tmp_path / "t.zarr", mode="a"), ["a", "b"], 1)
        with pytest.raises(Float16OverflowError, match="row 0: a feature value of b exceeds the float16 range"):
            _write(arrays, data, ExtractConfig(durable=False))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
