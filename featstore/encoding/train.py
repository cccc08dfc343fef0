"""Training the reference encoders on a feature store: features reach the model only through FeatureDataset and a
DataLoader (workers read samples lazily, the array is never loaded whole), the legacy 90/10 split, the model's loss,
AdamW, gradient clipping, StepLR halving, the epoch with the best val_perf kept; then validation scores,
metrics.json, a plot and the test-split predictions in the Algonauts submission format. On CUDA the loader delivers
float16 features by default (feature_dtype auto): pinned, copied with non_blocking=True, converted to float32 on the
device, so the copy moves half the bytes; on a CPU auto keeps float32 items.

Before training: both arrays must be complete (their completion records), and the test split, read only at the end,
has its checksums verified (it is small); every training chunk is read in the first epoch. A corrupt chunk stops the
run with the store's one-line CorruptChunkError, also when a DataLoader worker met it."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from .._progress import tqdm
from ..dataset import FeatureDataset, train_val_split
from ..devices import cpu_count, resolve_device
from ..errors import BadArgumentError, CorruptChunkError, FeatstoreError, NotFoundInStoreError
from ..layout import SPLIT_DIRS, normalize_subj
from ..storage import FeatureStore
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .metrics import pearson_r, plot_roi_r, save_submission, summarize, val_perf, write_metrics
from .models import build_encoder
from .names import FEATURE_ALIASES
from .rois import HEMIS, READOUTS, ROI_DIR, SubjectRois, load_rois, make_readout

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    loss: float
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class EncodingResult:
    """What a run produced: metrics (as written to metrics.json), the model at its best validation epoch,
    per-vertex validation r per hemisphere, the test-split predictions (None without a synt split), the files."""

    metrics: dict
    model: nn.Module
    val_r: dict[str, np.ndarray]
    test_pred: dict[str, np.ndarray] | None
    files: dict[str, Path]


class PermutedTargets(Dataset):
    """Items of `ds` with the fMRI targets of item perm[i]: the shuffled-target control keeps the images and the
    target distribution but breaks their pairing."""

    def __init__(self, ds: FeatureDataset, perm: np.ndarray):
        self.ds, self.perm = ds, np.asarray(perm)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i][0], self.ds.targets(int(self.perm[i]))


def _to(targets: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in targets.items()}


def _features_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Features on the device, float16 ones converted there: the (pinned) copy moves half the bytes and the
    conversion runs on the device; the values are exactly those of float32 items of the same float16 store."""
    x = x.to(device, non_blocking=True)
    return x.float() if x.dtype == torch.float16 else x


def encoding_loss(model: nn.Module, out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss (the encoders carry the reference's); MSE of both hemispheres, summed, for others."""
    if hasattr(model, "loss"):
        return model.loss(out, targets)
    return F.mse_loss(out["lh_f_pred"], targets["lh_f"]) + F.mse_loss(out["rh_f_pred"], targets["rh_f"])


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, device: torch.device,
                    clip_max_norm: float = 0.1, bar: tqdm | None = None) -> EpochStats:
    """One pass over (features, {"lh_f", "rh_f"}) batches; the clock includes waiting for the loader."""
    model.train()
    total, n = 0.0, 0
    t0 = time.perf_counter()
    for x, targets in batches:
        x, targets = _features_to(x, device), _to(targets, device)
        loss = encoding_loss(model, model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_max_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        optimizer.step()
        total += float(loss.detach()) * len(x)
        n += len(x)
        if bar is not None:
            bar.update(len(x))
            bar.set_postfix(loss=f"{total / n:.4f}", refresh=False)
    return EpochStats(total / max(n, 1), n, time.perf_counter() - t0)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable, device: torch.device) -> tuple[dict, dict | None]:
    """Predictions {"lh", "rh": (N, V) float32} over batches of features or (features, targets); the targets too
    when the batches carry them."""
    model.eval()
    preds: dict[str, list] = {h: [] for h in HEMIS}
    targets: dict[str, list] = {h: [] for h in HEMIS}
    for batch in batches:
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        out = model(_features_to(x, device))
        for h in HEMIS:
            preds[h].append(out[f"{h}_f_pred"].float().cpu().numpy())
            if y is not None:
                targets[h].append(y[f"{h}_f"].numpy())
    cat = {h: np.concatenate(preds[h]) for h in HEMIS}
    return cat, ({h: np.concatenate(targets[h]) for h in HEMIS} if targets["lh"] else None)


def channels_last_collate(batch: list):
    """default_collate of (C, H, W) features into a channels-last (B, C, H, W) batch.

    FeatureDataset items are (C, H, W) views of (H, W, C) buffers; default_collate would transpose every sample into
    a contiguous NCHW batch (the dearest step of loading, more than decoding). Stacking the (H, W, C) buffers instead
    is a plain copy into one contiguous (B, H, W, C) buffer (in shared memory in a worker, whatever the dtype: float16
    items make a float16 batch of half the bytes), and the models read channels-last batches without a transpose.
    """
    if isinstance(batch[0], (tuple, list)):
        return _stack_hwc([item[0] for item in batch]), default_collate([item[1] for item in batch])
    return _stack_hwc(batch)


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _stack_hwc(imgs: list) -> torch.Tensor:
    """Stack the (H, W, C) buffers behind (C, H, W) views; (B, C, H, W) view of the contiguous (B, H, W, C) batch.

    In a DataLoader worker default_collate stacks into shared memory (what the worker sends). In the main process
    the batch buffer comes from numpy, which asks the kernel for transparent huge pages on large arrays: a float32
    batch of 16 x 768 x 31 x 31 (47 MB) costs ~11,500 page faults in 4 KB pages, more than copying the data (3.7x
    the stack time measured on the development VM)."""
    hwc = [img.permute(1, 2, 0) for img in imgs]
    first = hwc[0]
    dtype = _NUMPY_DTYPES.get(first.dtype)
    if (dtype is None or first.device.type != "cpu" or torch.utils.data.get_worker_info() is not None
            or any(t.shape != first.shape or t.dtype != first.dtype for t in hwc)):
        return default_collate(hwc).permute(0, 3, 1, 2)
    out = torch.from_numpy(np.empty((len(hwc), *first.shape), dtype=dtype))
    return torch.stack(hwc, out=out).permute(0, 3, 1, 2)


class _Failed:
    """A featstore error met while loading an item, carried to the main process as data: a DataLoader worker would
    re-raise it wrapped in its own multi-line traceback text, and the user must see featstore's one line."""

    def __init__(self, error: FeatstoreError):
        self.error: FeatstoreError | None = error

    def take(self) -> FeatstoreError:
        """The error, no longer held here: raised from the loop that holds this object, a reference back would make
        a cycle (error -> traceback -> frame -> this -> error) that keeps the DataLoader and its workers alive until
        a garbage collection."""
        error, self.error = self.error, None
        return error


class _Guarded(Dataset):
    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            return self.ds[i]
        except FeatstoreError as e:
            return _Failed(e)


def _guarded_collate(batch: list):
    failed = next((item for item in batch if isinstance(item, _Failed)), None)
    return failed if failed is not None else channels_last_collate(batch)


def _raise_failures(loader: DataLoader):
    for batch in loader:
        if isinstance(batch, _Failed):
            raise batch.take()
        yield batch


def _loader(ds: Dataset, cfg: TrainConfig, device: torch.device, shuffle: bool) -> DataLoader:
    """Workers end with each pass (not persistent): persistent ones outlive the run wherever a reference to the
    loader lingers, and were then joined at interpreter exit after seconds of timeouts; a new pass forks them again
    at a cost of milliseconds."""
    gen = torch.Generator().manual_seed(cfg.seed) if shuffle else None
    workers = min(cfg.num_workers, cpu_count())
    return DataLoader(_Guarded(ds), batch_size=cfg.batch_size, shuffle=shuffle, num_workers=workers,
                      persistent_workers=False, pin_memory=device.type == "cuda", generator=gen,
                      collate_fn=_guarded_collate)


def _check_arrays(store, feature: str, subj: str, test: bool) -> None:
    """Both splits complete; the test split's chunks decode and pass their checksums (it is read only after
    training, and small). A corrupt chunk raises the same one line as any other read of it."""
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store, mode="r")
    train = fs.get(feature, subj, "train")
    train.require_complete("training an encoder on it")
    if not test:
        return
    synt = fs.get(feature, subj, "synt")
    synt.require_complete("training an encoder on it (its test predictions are the submission)")
    corrupt = synt.verify().corrupt
    if corrupt:
        first, _ = synt.chunk_range(corrupt[0])
        synt.read_sample(first)  # raises the store's CorruptChunkError line for that chunk
        raise CorruptChunkError(
            f"{synt.path}: chunk {corrupt[0]} is corrupt (a sample reads as never written); run `featstore verify "
            f"--repair {fs.location}`, then rerun the extract command to recompute it"
        )


def train_encoder(config: TrainConfig) -> EncodingResult:
    """Train, keep the epoch of best val_perf, score it, predict the test split and write the files of the run.

    An epoch is the best only if its val_perf beats every earlier one and 0 (the reference's rule): a model never
    better than 0 keeps no checkpoint, and its scores and test predictions are the last epoch's.
    """
    cfg = config.check()
    feature = FEATURE_ALIASES.get(cfg.feature, cfg.feature)
    subj = normalize_subj(cfg.subj)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    feature_dtype = cfg.loader_dtype(device.type)

    def dataset(split: str = "train", indices=None, data_dir=cfg.data_dir) -> FeatureDataset:
        return FeatureDataset(cfg.store, feature, subj, split, indices=indices, data_dir=data_dir, dtype=feature_dtype)

    full = dataset()
    try:  # built now (metadata only), so that a problem with it stops the run before training, not after
        has_test_images = (Path(cfg.data_dir) / SPLIT_DIRS["synt"]).is_dir()  # else the train split vouches for it
        test_ds = dataset("synt", data_dir=cfg.data_dir if has_test_images else None)
    except NotFoundInStoreError:
        test_ds = None
        log.warning("%s has no %s/%s/synt array: no test predictions", cfg.store, feature, subj)
    _check_arrays(cfg.store, feature, subj, test=test_ds is not None)
    train_idx, val_idx = train_val_split(len(full), cfg.val_fraction)
    if len(train_idx) < 1 or len(val_idx) < 2:
        raise BadArgumentError(f"{len(full)} training images give {len(val_idx)} for validation; at least 2 are needed")
    needed = READOUTS[cfg.model.readout_res]
    rois = load_rois(cfg.data_dir, needed) if needed or (Path(cfg.data_dir) / ROI_DIR).is_dir() else None
    if rois is not None:
        rois.check_vertices(full.n_vertices)
    readout = make_readout(cfg.model.readout_res, full.n_vertices, rois)
    model = build_encoder(cfg.model, full.channels, full.grid, readout)
    if cfg.resume is not None:
        load_checkpoint(cfg.resume, model)
    model = model.to(device)
    train_ds: Dataset = dataset(indices=train_idx)
    if cfg.shuffle_targets:
        train_ds = PermutedTargets(train_ds, np.random.default_rng(cfg.seed).permutation(len(train_ds)))
    train_loader = _loader(train_ds, cfg, device, shuffle=True)
    val_loader = _loader(dataset(indices=val_idx), cfg, device, shuffle=False)
    if cfg.num_workers > cpu_count():
        log.info("--num_workers %d: this machine has %d CPUs, so %d loader workers per DataLoader", cfg.num_workers,
                 cpu_count(), cpu_count())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_drop, gamma=0.5)
    log.info("training %s/%s on %s: %d train, %d val images, %s readout with %d queries, %d parameters, on %s "
             "(%s features from the loader)", cfg.model.encoder_arch, feature, subj, len(train_idx), len(val_idx),
             cfg.model.readout_res, readout.num_queries, sum(p.numel() for p in model.parameters()), device,
             feature_dtype)

    history, best_perf, best_epoch, best_state = [], 0.0, None, None
    samples, seconds = 0, 0.0
    for epoch in range(1, cfg.epochs + 1):
        with tqdm(total=len(train_ds), desc=f"epoch {epoch}/{cfg.epochs}", unit="samples", disable=not cfg.progress,
                  leave=False, dynamic_ncols=True) as bar:
            stats = train_one_epoch(model, _raise_failures(train_loader), optimizer, device, cfg.clip_max_norm, bar)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        samples, seconds = samples + stats.samples, seconds + stats.seconds
        pred, target = predict(model, _raise_failures(val_loader), device)
        r = {h: pearson_r(pred[h], target[h]) for h in HEMIS}
        perf = val_perf(r)
        history.append({"epoch": epoch, "lr": lr, "train_loss": stats.loss, "val_perf": perf,
                        "val_mean_r": summarize(r)["mean_r"], "samples_per_s": stats.samples_per_s})
        log.info("epoch %d/%d: train loss %.4f, val_perf %.4f, %.1f samples/s", epoch, cfg.epochs, stats.loss, perf,
                 stats.samples_per_s)
        if perf > best_perf:
            best_perf, best_epoch = perf, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        log.warning("no epoch reached a val_perf above 0 (last: %.4f): no checkpoint is kept; the scores and test "
                    "predictions are the last epoch's", history[-1]["val_perf"])

    pred, target = predict(model, _raise_failures(val_loader), device)
    val_r = {h: pearson_r(pred[h], target[h]) for h in HEMIS}
    test_pred = None
    if test_ds is not None:
        test_pred, _ = predict(model, _raise_failures(_loader(test_ds, cfg, device, shuffle=False)), device)

    metrics = {
        **summarize(val_r, rois), "val_perf": val_perf(val_r),
        "feature": feature, "subj": subj, "encoder_arch": cfg.model.encoder_arch,
        "readout_res": cfg.model.readout_res, "num_queries": readout.num_queries if cfg.model.encoder_arch ==
        "transformer" else None, "n_train": len(train_idx), "n_val": len(val_idx),
        "n_test": None if test_pred is None else len(test_pred["lh"]), "epochs": cfg.epochs, "best_epoch": best_epoch,
        "samples_per_s": samples / seconds if seconds > 0 else None, "train_seconds": seconds,
        "shuffle_targets": cfg.shuffle_targets, "device": str(device), "feature_dtype": feature_dtype,
        "history": history,
        "config": {**{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "model"}, "feature": feature},
        "model": cfg.model.to_dict(),
    }
    files = _write_outputs(cfg, metrics, model, test_pred, rois) if cfg.output_path is not None else {}
    return EncodingResult(metrics, model, val_r, test_pred, files)


def _write_outputs(cfg: TrainConfig, metrics: dict, model: nn.Module, test_pred: dict | None,
                   rois: SubjectRois | None) -> dict[str, Path]:
    out = Path(cfg.output_path)
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": write_metrics(out / "metrics.json", metrics)}
    ckpt = out / "checkpoint.pt"
    if metrics["best_epoch"] is None and ckpt.exists():  # an earlier run's, which did not make these predictions
        ckpt.unlink()
        log.info("removed %s of an earlier run", ckpt)
    if metrics["best_epoch"] is not None:
        torch.save({"model": model.state_dict(), "model_config": cfg.model.to_dict(), "epoch": metrics["best_epoch"],
                    "feature": metrics["feature"], "subj": metrics["subj"], "val_perf": metrics["val_perf"],
                    "mean_r": metrics["mean_r"]}, ckpt)
        files["checkpoint"] = ckpt
    if rois is not None:
        title = f"{metrics['feature']} {cfg.model.encoder_arch} ({cfg.model.readout_res}), subj {metrics['subj']}"
        try:
            files["plot"] = plot_roi_r(metrics["roi_mean_r"], out / "roi_r.png", title)
        except ImportError:  # matplotlib is the `plot` extra, not a core dependency
            log.warning("matplotlib is not installed (pip install 'featstore[plot]'): no roi_r.png")
    if test_pred is not None:
        files["lh_pred_test"], files["rh_pred_test"] = save_submission(out, test_pred["lh"], test_pred["rh"])
    return files
