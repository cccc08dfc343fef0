"""Lazy torch Dataset over a feature store: CLS strip, grid reshape, CLIP CLS channels, fMRI targets, splits.

Item i is the legacy `torch.reshape(img[1:, :], (H, W, C)).permute(2, 0, 1)` of sample `indices[i]`, as float32,
with the grid (H, W) read from the array's token layout. With dtype="float16" items are float16: the stored float16
values copied as they are (half the bytes of float32 to collate, pin and send to the device, where the model converts
them), and every other value (normalised, CLIP channels, a float32 store) rounded once from the float32 item, so a
float16 item always equals `float32_item.half()`. Like the legacy tensor it is a permuted view of an
(H, W, C) buffer: no per-sample transpose; `default_collate` makes the batch contiguous in its one copy (a
transpose; `featstore.encoding.channels_last_collate` stacks the (H, W, C) buffers instead, a plain copy).

Construction reads metadata only (array zarr.json, one listing of the completion record, the small saved
statistics for `normalize`; with data_dir also one listing of the split's image folder, to check it holds the
stored images), so apart from that listing its cost does not depend on N. Samples in chunks that were not written yet
raise IncompleteArrayError when asked for (never zeros), so a dataset over a partly extracted array still serves
the finished part.

Process safety: the dataset holds strings and small numpy arrays. Store, arrays and fMRI memmaps are opened
lazily in whichever process reads (checked by pid) and dropped when pickled, so DataLoader workers work under
fork and spawn alike.
"""
from __future__ import annotations

import operator
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .backbones.registry import backbone_config
from .errors import BadArgumentError, IncompleteArrayError, LayoutError, NotFoundInStoreError, StoreError
from .layout import SPLIT_DIRS, Subject, read_subject
from .storage import FeatureArray, FeatureStore, image_list_diff

CLIP_FEATURE = backbone_config("clip").legacy_last  # clip_vit_512: the registry names it
NORMALIZE_MODES = (None, "channel")
TARGET_FORMATS = ("tensor", "legacy")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
SPLIT_ALIASES = {"test": "synt"}  # the Algonauts name of the test split; the store keeps the legacy name
LEGACY_SEED = 5  # `rand_seed = 5` of the Algonauts 2023 tutorial, which the legacy training code copied


def train_val_split(n: int, val_fraction: float = 0.1, seed: int = LEGACY_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The legacy shuffled split of range(n) into (train, val) index arrays.

    Same numbers as `np.random.seed(seed); np.random.shuffle(idxs); num_train = int(np.round(n / 100 * 90))`
    for val_fraction=0.1, without touching numpy's global random state.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise BadArgumentError(f"val_fraction must be in [0, 1), got {val_fraction}")
    idxs = np.arange(int(n))
    np.random.RandomState(seed).shuffle(idxs)
    train_percent = round((1.0 - val_fraction) * 100, 9)  # 0.9 * 100 != 90.0 in floats; the legacy used 90
    num_train = int(np.round(int(n) / 100 * train_percent))
    return idxs[:num_train], idxs[num_train:]


class FeatureDataset(Dataset):
    """Samples of `{feature}/{subj}/{split}` as float32 (or float16) (C, H, W) tensors, optionally with fMRI targets.

    store: a store folder or an open FeatureStore. indices: which samples, in order (default all).
    split: "train" or "synt" ("test" is accepted for "synt").
    data_dir: the subject folder, checked to hold the same images as the array; with split "train" items are
    `(img, {"lh_f": lh, "rh_f": rh})` (float32 tensors), with "synt" bare images (the test split has no fMRI).
    target_format: "legacy" gives the older training code's items instead: `(img, {"lh_f": [lh], "rh_f": [rh]})`
    with each fMRI row a float32 numpy array in a one-element list (its collate and `targets[0]["lh_f"]` rely on it).
    cat_clip: append the clip_vit_512 CLS embedding of the same image, tiled over the grid, as extra channels.
    normalize: "channel" z-scores each channel with the train split's saved statistics (`featstore stats`: patch
    token mean/std; for appended CLIP channels the clip_vit_512 CLS mean/std), for both splits, so test features
    are never normalised with their own statistics.
    dtype: "float32" (the legacy items) or "float16": the stored float16 values without conversion, for training on
    a GPU (convert there, after the copy); with normalize or cat_clip the float32 item is computed, then rounded once.
    """

    def __init__(
        self,
        store: str | Path | FeatureStore,
        feature: str = "dinov2_q_last",
        subj: str = "01",
        split: str = "train",
        indices: Any = None,
        data_dir: str | Path | None = None,
        cat_clip: bool = False,
        normalize: str | None = None,
        target_format: str = "tensor",
        dtype: str = "float32",
    ):
        if normalize not in NORMALIZE_MODES:
            raise BadArgumentError(f"normalize={normalize!r}: choose one of {', '.join(map(repr, NORMALIZE_MODES))}")
        if target_format not in TARGET_FORMATS:
            raise BadArgumentError(f"target_format={target_format!r}: choose one of {', '.join(TARGET_FORMATS)}")
        if dtype not in DTYPES:
            raise BadArgumentError(f"{dtype!r}: choose one of {', '.join(map(repr, DTYPES))}", param="dtype")
        self.target_format, self.dtype = target_format, dtype
        split = SPLIT_ALIASES.get(split, split)
        fs = FeatureStore.open(store)
        # what a worker reopens: the folder or URL (with its fsspec options), else the (picklable) zarr Store object;
        # never the parent's open S3 client, which is bound to the parent's event loop (fails after a fork)
        self._source, self._storage_options = fs.source, fs.storage_options
        self.feature, self.subj, self.split = feature, subj, split
        fa = fs.get(feature, subj, split)
        n_total, n_tokens, c = fa.shape
        h, w = fa.grid
        self._first = n_tokens - h * w  # grid tokens are the last H*W; CLS (and any registers) come first
        if not 0 <= fa.cls_index < self._first:
            raise BadArgumentError(f"{fa.path}: grid {h}x{w} with cls {fa.cls_index} does not fit T={n_tokens}")
        self.grid = (h, w)
        self._c, self._chunk_len = c, fa.chunk_len
        self._undone = _undone_chunks(fa)

        self._indices = None if indices is None else _as_indices(indices, n_total, fa.path)
        self._len = n_total if self._indices is None else len(self._indices)

        self.cat_clip = bool(cat_clip)
        self._clip_c = 0
        clip = None
        if self.cat_clip:
            clip = self._open_clip(fs, fa)
            self._clip_c, self._clip_cls = clip.shape[2], clip.cls_index
            self._clip_chunk_len, self._clip_undone = clip.chunk_len, _undone_chunks(clip)
        self.channels = c + self._clip_c

        self.normalize = normalize
        self._scale = self._shift = self._clip_scale = self._clip_shift = None
        if normalize == "channel":
            self._scale, self._shift = self._zscore(fs, fa, "patch")
            if clip is not None:
                self._clip_scale, self._clip_shift = self._zscore(fs, clip, "cls")

        self._fmri: tuple[str, str] | None = None
        self.n_vertices: dict[str, int] = {}  # {"lh": V_lh, "rh": V_rh} when the items carry fMRI
        if data_dir is not None:
            _check_images(data_dir, fa)
            if split == "train":
                self._fmri, self.n_vertices = _check_fmri(data_dir, n_total, fa.path)

        self._uids = (fa.uid, clip.uid if clip is not None else None)
        self._pid = os.getpid()
        self._fa, self._clip, self._mm = fa, clip, None  # per-process handles, never pickled

    # ---- construction helpers ---------------------------------------------------------------------------------
    def _open_clip(self, fs: FeatureStore, fa: FeatureArray) -> FeatureArray:
        try:
            clip = fs.get(CLIP_FEATURE, self.subj, self.split)
        except NotFoundInStoreError as e:
            raise NotFoundInStoreError(f"cat_clip=True needs {CLIP_FEATURE}/{self.subj}/{self.split}: {e}") from None
        if clip.shape[0] != fa.shape[0]:
            raise BadArgumentError(f"cat_clip: {clip.path} has {clip.shape[0]} images but {fa.path} has {fa.shape[0]}")
        if clip.image_names != fa.image_names:
            diff = image_list_diff(fa.image_names, clip.image_names)
            raise BadArgumentError(f"cat_clip: {clip.path} and {fa.path} hold different images ({diff})")
        return clip

    def _zscore(self, fs: FeatureStore, fa: FeatureArray, part: str) -> tuple[np.ndarray, np.ndarray]:
        """(1/std, -mean/std) per channel from the saved `{part}_mean`/`{part}_std` of the train split."""
        feature = fa.feature
        source = fa if self.split == "train" else fs.get(feature, self.subj, "train")
        stats = fs.load_stats(source) or {}
        names = (f"{part}_mean", f"{part}_std")
        if not all(k in stats for k in names):
            raise NotFoundInStoreError(
                f"normalize='channel' needs the channel statistics of {source.path}; run "
                f"`featstore stats {fs.location} --feature {feature} --subj {self.subj} --split train` first"
            )
        mean, std = (np.asarray(stats[k], dtype=np.float64).reshape(-1) for k in names)
        if mean.shape != (fa.shape[2],) or std.shape != (fa.shape[2],):
            raise BadArgumentError(f"{source.path}: saved statistics have {mean.size} channels, not {fa.shape[2]}")
        scale = 1.0 / np.where(std > 0, std, 1.0)  # a constant channel is only centred
        return scale.astype(np.float32), (-mean * scale).astype(np.float32)

    # ---- per-process state ------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=None, _fa=None, _clip=None, _mm=None)
        return state

    def _arrays(self) -> tuple[FeatureArray, FeatureArray | None]:
        if self._pid != os.getpid():  # a new worker (spawned or forked): open our own handles, once
            fs = FeatureStore(self._source, mode="r", storage_options=self._storage_options)
            self._fa = fs.get(self.feature, self.subj, self.split)
            self._clip = fs.get(CLIP_FEATURE, self.subj, self.split) if self.cat_clip else None
            uids = (self._fa.uid, self._clip.uid if self._clip is not None else None)
            if uids != self._uids:  # rewritten (--overwrite) since construction: our done mask no longer holds
                raise StoreError(f"{self._fa.path} was rewritten after this FeatureDataset was built; build it again")
            self._mm, self._pid = None, os.getpid()
        return self._fa, self._clip

    def _fmri_rows(self, j: int) -> dict[str, Any]:
        if self._mm is None:
            self._mm = tuple(np.load(p, mmap_mode="r") for p in self._fmri)
        lh, rh = (np.array(m[j], dtype=np.float32) for m in self._mm)
        if self.target_format == "legacy":
            return {"lh_f": [lh], "rh_f": [rh]}
        return {"lh_f": torch.from_numpy(lh), "rh_f": torch.from_numpy(rh)}

    def targets(self, i: int) -> dict[str, Any]:
        """The fMRI targets of item i without reading its features (e.g. to pair features with permuted targets)."""
        if self._fmri is None:
            raise BadArgumentError(f"{self.feature}/{self.subj}/{self.split}: no fMRI targets (pass data_dir, split train)")
        j = self.sample_index(i)
        self._arrays()  # a new process drops the memmaps of the old one
        return self._fmri_rows(j)

    # ---- Dataset ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def sample_index(self, i: int) -> int:
        """Row of the stored array behind item i."""
        i = operator.index(i)
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for a FeatureDataset of {self._len} samples")
        i %= self._len
        return i if self._indices is None else int(self._indices[i])

    def __getitem__(self, i: int):
        j = self.sample_index(i)
        fa, clip = self._arrays()
        _require_done(fa, j, self._chunk_len, self._undone)
        if clip is not None:
            _require_done(clip, j, self._clip_chunk_len, self._clip_undone)
        h, w = self.grid
        raw = fa.read_sample(j)
        x = _as_tensor(raw)[self._first :]
        # float16 out of float16 values is a plain copy; any other value is computed in float32 and rounded once
        as_stored = self.dtype == "float16" and x.dtype == torch.float16 and self._scale is None and clip is None
        if as_stored and raw.flags.writeable and self._chunk_len == 1:  # a buffer of this sample's own: no copy
            return self._item(x, j)
        direct = self.dtype == "float32" or as_stored
        out = torch.empty((h * w, self.channels), dtype=DTYPES[self.dtype] if direct else torch.float32)
        feat = out[:, : self._c]
        if self._scale is None:
            feat.copy_(x)
        else:  # one fused pass: x * (1/std) + (-mean/std)
            torch.addcmul(torch.from_numpy(self._shift), x, torch.from_numpy(self._scale), out=feat)
        if clip is not None:
            cls = _as_tensor(clip.read_sample(j))[self._clip_cls].float()
            if self._clip_scale is not None:
                cls = torch.from_numpy(self._clip_shift).addcmul(cls, torch.from_numpy(self._clip_scale))
            out[:, self._c :] = cls
        if out.dtype != DTYPES[self.dtype]:
            out = out.to(DTYPES[self.dtype])
        return self._item(out, j)

    def _item(self, out: torch.Tensor, j: int):
        """The (C, H, W) view of the contiguous (H*W, C) features, with the fMRI targets where there are."""
        img = out.view(*self.grid, self.channels).permute(2, 0, 1)
        if self._fmri is None:
            return img
        return img, self._fmri_rows(j)

    def __repr__(self) -> str:
        return (
            f"FeatureDataset({self.feature}/{self.subj}/{self.split}, {self._len} samples, "
            f"({self.channels}, {self.grid[0]}, {self.grid[1]}), cat_clip={self.cat_clip}, "
            f"normalize={self.normalize!r}, dtype={self.dtype!r}, fmri={self._fmri is not None})"
        )


def _undone_chunks(fa: FeatureArray) -> frozenset[int]:
    """Chunks not yet written; empty (no memory) for a complete array."""
    return frozenset(int(i) for i in np.flatnonzero(~fa.done_mask()))


def _require_done(fa: FeatureArray, j: int, chunk_len: int, undone: frozenset[int]) -> None:
    if undone and j // chunk_len in undone:
        raise IncompleteArrayError(
            f"{fa.path}: sample {j} is in {fa.unit} {j // chunk_len}, which is not written yet "
            f"({fa.progress(fa.nchunks - len(undone))} done); finish the extraction (rerun the same "
            "extract command) or pass indices of finished samples"
        )


def _as_indices(indices: Any, n: int, path: str) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
        raise BadArgumentError(f"indices must be a 1-D sequence of integers, got shape {idx.shape} {idx.dtype}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise BadArgumentError(f"indices: {bad} is out of range for {path} with {n} samples")
    return idx


def _check_images(data_dir: str | Path, fa: FeatureArray) -> None:
    """data_dir must hold the images the array was extracted from (names in order), or its fMRI rows and ROI
    masks would silently belong to another subject with the same image count."""
    stored = fa.image_names
    if not stored:  # a store that did not record its images: nothing to compare against
        return
    if fa.split not in SPLIT_DIRS or not (Path(data_dir) / SPLIT_DIRS[fa.split]).is_dir():
        where = SPLIT_DIRS.get(fa.split, f"a folder for split {fa.split!r}")
        raise LayoutError(f"data_dir {data_dir}: no {where}/ to match the images of {fa.path}")
    names = [p.name for p in read_subject(data_dir, splits=[fa.split]).images[fa.split]]
    if names != stored:
        raise BadArgumentError(
            f"data_dir {data_dir} holds other images than {fa.path} was extracted from "
            f"({image_list_diff(stored, names)}); is it the same subject?"
        )


def _check_fmri(data_dir: str | Path, n: int, path: str) -> tuple[tuple[str, str], dict[str, int]]:
    subject = Subject(root=Path(data_dir))
    files, vertices = [], {}
    for hemi in ("lh", "rh"):
        f = subject.fmri(hemi)
        if not f.is_file():
            raise LayoutError(f"data_dir {data_dir}: no fMRI file {f}")
        rows = np.load(f, mmap_mode="r").shape  # header only
        if len(rows) != 2 or rows[0] != n:
            raise BadArgumentError(f"{f} has shape {rows}, expected ({n}, vertices) to match the {n} images of {path}")
        files.append(str(f))
        vertices[hemi] = int(rows[1])
    return (files[0], files[1]), vertices


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor over a possibly read-only decoded chunk; it is only ever read from."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about read-only arrays; we never write
        return torch.from_numpy(a)
