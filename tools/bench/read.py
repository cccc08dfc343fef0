"""read, read-2workers: random-order samples, FeatureDataset vs the legacy dataset's np.load(mmap_mode="r")."""
from __future__ import annotations

import time

import numpy as np

from .common import BATCH, FEATURE, GRID, SPLIT, SUBJ, C, ensure_read_store, log, row, unavailable, warm


class LegacyNpy:
    """The legacy dataset's feature path: `torch.tensor(fts[idx])`, CLS strip, reshape to (H, W, C), permute."""

    def __init__(self, path: str, grid: tuple[int, int] = GRID):
        self.path, self.grid, self.fts = path, grid, None
        self.n = int(np.load(path, mmap_mode="r").shape[0])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int):
        import torch

        if self.fts is None:
            self.fts = np.load(self.path, mmap_mode="r")
        img = torch.tensor(self.fts[idx])
        return torch.reshape(img[1:, :], (*self.grid, img.shape[-1])).permute(2, 0, 1)

    def __getstate__(self):
        return {**self.__dict__, "fts": None}


def _time_items(ds, order) -> float:
    t0 = time.perf_counter()
    for i in order:
        x = ds[int(i)]
    assert x.shape == (C, *GRID), x.shape
    return time.perf_counter() - t0


def _time_loader(ds, order, workers: int) -> float:
    """Seconds per sample in steady state: the clock starts when the first batch arrives (worker start-up excluded)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=BATCH, sampler=[int(i) for i in order], num_workers=workers)
    it = iter(loader)
    first = next(it)
    t0 = time.perf_counter()
    n = 0
    for x in it:
        n += len(x)
    assert first.shape[1:] == (C, *GRID), first.shape
    return (time.perf_counter() - t0) / max(n, 1)


def rows_read(ctx) -> list[dict]:
    targets = (">= 0.5x memmap throughput", ">= 1.0x memmap throughput")
    try:
        from featstore.dataset import FeatureDataset
    except Exception as e:  # noqa: BLE001 - the dataset's imports may be missing
        return [unavailable("read", targets[0], f"featstore.dataset: {e}"),
                unavailable("read-2workers", targets[1], f"featstore.dataset: {e}")]
    store, npy = ensure_read_store(ctx)
    warm([npy, *sorted(p for p in (store / FEATURE / SUBJ / SPLIT / "c").rglob("*") if p.is_file())])
    order = np.random.default_rng(1).permutation(ctx.n)
    out = []
    for name, workers, target, thr in (("read", 0, targets[0], 0.5), ("read-2workers", 2, targets[1], 1.0)):
        best = {"featstore": np.inf, "memmap": np.inf}
        reps = 2 * ctx.reps  # passes are short and very sensitive to other load on the machine
        for r in range(reps):
            for side in ("featstore", "memmap"):
                log(f"{name}: {side}, {ctx.n} random samples (rep {r + 1}/{reps})")
                ds = FeatureDataset(store, FEATURE, SUBJ, SPLIT) if side == "featstore" else LegacyNpy(str(npy))
                s = _time_items(ds, order) / len(order) if workers == 0 else _time_loader(ds, order, workers)
                best[side] = min(best[side], s)
        fs_rate, mm_rate = 1 / best["featstore"], 1 / best["memmap"]
        how = ("single process, a new dataset object per pass (memmap: a new mapping, its page faults included)"
               if workers == 0 else f"DataLoader(num_workers=2, batch_size={BATCH}), steady state after the first batch")
        out.append(row(name, fs_rate / mm_rate, target, (">=", thr), f"{fs_rate:.0f} samples/s",
                       f"memmap {mm_rate:.0f} samples/s",
                       f"{how}; page cache warm (both files read once before); float32 (768, 31, 31) per sample",
                       featstore_rate=fs_rate, baseline_rate=mm_rate))
    return out
