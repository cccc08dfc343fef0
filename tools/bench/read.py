"""read: what a training step receives from each side, batches of 16 as contiguous tensors, in random order.

batch-f32, batch-f32-2workers   FeatureDataset (float32 items) + channels_last_collate vs the legacy recipe
batch-f16, loader               FeatureDataset(dtype="float16") + channels_last_collate vs the same legacy recipe
read, read-2workers             per sample (single process) / default_collate batches: information, not counted

The legacy recipe is the older training code's: LegacyNpy over np.load(mmap_mode="r") of the float32 npy export
+ DataLoader's default_collate (a contiguous NCHW float32 batch). The store side's batch is one contiguous
(B, H, W, C) buffer seen as (B, C, H, W) (channels_last), which the models read without a transpose.
"""
from __future__ import annotations

import time

import numpy as np

from .common import BATCH, FEATURE, GRID, SPLIT, SUBJ, C, ensure_read_store, log, row, unavailable, warm

NAMES = ("batch-f32", "batch-f32-2workers", "batch-f16", "loader", "read", "read-2workers")
BATCH_ROWS = {  # name: (store item dtype, DataLoader workers, bound on store batches/s over memmap batches/s)
    "batch-f32": ("float32", 0, 1.0),
    "batch-f32-2workers": ("float32", 2, 1.0),
    "batch-f16": ("float16", 0, 2.0),
    "loader": ("float16", 2, 2.0),
}


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


def _time_loader(ds, order, workers: int, collate=None, check=None) -> float:
    """Seconds per sample in steady state: the clock starts when the first batch arrives (worker start-up excluded)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=BATCH, sampler=[int(i) for i in order], num_workers=workers,
                        collate_fn=collate)
    it = iter(loader)
    first = next(it)
    t0 = time.perf_counter()
    n = 0
    for x in it:
        n += len(x)
    assert first.shape[1:] == (C, *GRID), first.shape
    if check is not None:
        check(first)
    return (time.perf_counter() - t0) / max(n, 1)


def _contiguous(dtype, channels_last: bool):
    """What a batch must be for the row to count: the dtype, and one contiguous buffer (no strided views)."""
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def check(x) -> None:
        assert x.dtype == dtype and x.is_contiguous(memory_format=fmt), (x.dtype, x.stride())

    return check


def rows_read(ctx) -> list[dict]:
    targets = {name: f">= {bound:.1f}x memmap batches/s" for name, (_, _, bound) in BATCH_ROWS.items()}
    targets.update({"read": ">= 0.5x memmap samples/s (information)",
                    "read-2workers": ">= 1.0x memmap samples/s (information)"})
    try:
        import torch

        from featstore.dataset import FeatureDataset
        from featstore.encoding import channels_last_collate
    except Exception as e:  # noqa: BLE001 - the dataset's imports may be missing
        return [unavailable(name, targets[name], f"featstore.dataset: {e}") for name in NAMES]
    store, npy = ensure_read_store(ctx)
    warm([npy, *sorted(p for p in (store / FEATURE / SUBJ / SPLIT / "c").rglob("*") if p.is_file())])
    order = np.random.default_rng(1).permutation(ctx.n)
    reps = 2 * ctx.reps  # passes are short and very sensitive to other load on the machine
    legacy_check = _contiguous(torch.float32, channels_last=False)
    sides = {  # side: (dataset, collate, batch check)
        "memmap": (lambda: LegacyNpy(str(npy)), None, legacy_check),
        "float32": (lambda: FeatureDataset(store, FEATURE, SUBJ, SPLIT), channels_last_collate,
                    _contiguous(torch.float32, channels_last=True)),
        "float16": (lambda: FeatureDataset(store, FEATURE, SUBJ, SPLIT, dtype="float16"), channels_last_collate,
                    _contiguous(torch.float16, channels_last=True)),
    }
    best = {(side, w): np.inf for side in sides for w in (0, 2)}
    for r in range(reps):
        for workers in (0, 2):
            for side, (make, collate, check) in sides.items():
                log(f"read: {side} batches of {BATCH}, {workers} workers, {ctx.n} random samples (rep {r + 1}/{reps})")
                best[side, workers] = min(best[side, workers], _time_loader(make(), order, workers, collate, check))
    out = []
    for name, (dtype, workers, bound) in BATCH_ROWS.items():
        fs_rate, mm_rate = 1 / best[dtype, workers] / BATCH, 1 / best["memmap", workers] / BATCH
        how = "single process" if workers == 0 else f"DataLoader(num_workers={workers})"
        out.append(row(name, fs_rate / mm_rate, targets[name], (">=", bound),
                       f"{fs_rate:.1f} batches/s ({fs_rate * BATCH:.0f} samples/s)",
                       f"memmap {mm_rate:.1f} batches/s ({mm_rate * BATCH:.0f} samples/s)",
                       f"{how}, batch_size={BATCH}, random order, steady state after the first batch; store "
                       f"(float16): FeatureDataset(dtype={dtype!r}) + channels_last_collate, one contiguous {dtype} "
                       "(B, 31, 31, 768) buffer; memmap: the legacy LegacyNpy + default_collate, a contiguous float32 NCHW batch; "
                       "page cache warm (both files read once before)",
                       featstore_rate=fs_rate * BATCH, baseline_rate=mm_rate * BATCH, unit="batches/s"))
    out += _per_sample_rows(ctx, store, npy, order, targets, FeatureDataset)
    return out


def _per_sample_rows(ctx, store, npy, order, targets, FeatureDataset) -> list[dict]:
    """The earlier rows, kept as information: one sample at a time, and default_collate batches on both sides."""
    out = []
    for name, workers, thr in (("read", 0, 0.5), ("read-2workers", 2, 1.0)):
        best = {"featstore": np.inf, "memmap": np.inf}
        for r in range(ctx.reps):
            for side in ("featstore", "memmap"):
                log(f"{name}: {side}, {ctx.n} random samples (rep {r + 1}/{ctx.reps})")
                ds = FeatureDataset(store, FEATURE, SUBJ, SPLIT) if side == "featstore" else LegacyNpy(str(npy))
                s = _time_items(ds, order) / len(order) if workers == 0 else _time_loader(ds, order, workers)
                best[side] = min(best[side], s)
        fs_rate, mm_rate = 1 / best["featstore"], 1 / best["memmap"]
        how = ("single process, a new dataset object per pass (memmap: a new mapping, its page faults included)"
               if workers == 0 else f"DataLoader(num_workers=2, batch_size={BATCH}, default_collate on both sides), "
               "steady state after the first batch")
        out.append(row(name, fs_rate / mm_rate, targets[name], (">=", thr), f"{fs_rate:.0f} samples/s",
                       f"memmap {mm_rate:.0f} samples/s",
                       f"information (the batch rows count); {how}; page cache warm; float32 (768, 31, 31) items",
                       counted=False, featstore_rate=fs_rate, baseline_rate=mm_rate))
    return out
