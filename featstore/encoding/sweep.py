"""Which layer predicts which brain area: a ridge encoding sweep over every stored layer, out of core.

Per feature (an array `{feature}/{subj}/train` of the store):

1. Projection, streamed: every image's (T, C) tokens, flattened, are projected to `dims` numbers (default 1,024) by a
   seeded sparse random projection, a *count sketch* (feature hashing): token t adds its C channels, each with a
   random sign, to the `dims` outputs starting at a random offset o_t (cyclically):
   ``y[(o_t + c) % dims] += s_tc * x_tc``. As a matrix R (T*C, dims) it has exactly one +-1 per row, so
   E[R R^T] = I and inner products between images are kept in expectation, as with a Gaussian projection; the
   sparse random projections of Li et al. (2006), which layer-wise encoding sweeps of the field use on flattened
   features, have ~1 non-zero per row at this width too. Flattened tokens rather than a pooled grid: pooling would
   throw away exactly the fine retinotopy that separates V1 from the category areas. The offsets and signs of
   tokens [16b, 16b + 16) come from ``np.random.default_rng([seed, b])``, so R is never materialised (its state is
   T offsets and T*C sign bits) and the projection of an image does not depend on which other images share its task.
   The kernel only adds (float32, tokens in order), so every row is bit-identical whatever the chunk size, --pack,
   task size or --workers; it runs on dask blocks of whole storage units (~100 MB), like `featstore stats`.
   Memory: a task's block plus (images, dims) floats, and the (N, dims) result.
2. Cache: the (N, dims) float32 result is stored in the store at `_sweep/{feature}/{subj}/train/k{dims}_seed{seed}`
   with the method, dims, seed and the source array's uid, shape and dtype as attributes; a rerun (or a run after an
   interruption) reuses every projection whose attributes match and computes only the rest.
3. Regression: the projected columns are z-scored with the training part's mean and std, then himalaya's RidgeCV
   (fit_intercept, 5-fold unshuffled KFold on the training part, alphas 10^-1 .. 10^8, the best alpha chosen per
   vertex) is fitted to all vertices of both hemispheres at once; the score is the Pearson r per vertex on the
   validation part of the legacy 90/10 split (seed 5). himalaya's numpy backend by default (float32); `backend`
   "torch" or "torch_cuda" for its torch backends, `dtype="float64"` for exact comparisons.

himalaya is imported only here. Outputs (sweep.json, per-vertex r, figures, the best-feature table): sweep_report.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import re
import time
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BadArgumentError, FeatstoreError, LayoutError, StoreError, one_line
from ..layout import normalize_subj, read_subject
from .rois import HEMIS, load_rois

if TYPE_CHECKING:  # the store (zarr) loads on first use: `featstore.encoding` imports this module eagerly
    from ..store import FeatureArray, FeatureStore

log = logging.getLogger(__name__)

METHOD = "count-sketch-v1"  # changes whenever the projection's numbers would change
TOKEN_BLOCK = 16  # tokens per generator: offsets and signs of tokens [16b, 16b + 16) come from default_rng([seed, b])
ALPHAS = tuple(10.0 ** np.arange(-1, 9))
BACKENDS = ("numpy", "torch", "torch_cuda")
TARGETS_BATCH = 4096  # vertices per himalaya batch: bounds its (alphas, val images, vertices) predictions
CACHE_GROUP = "_sweep"
INSTALL_HINT = "featstore sweep needs himalaya, which is not installed: pip install 'featstore[sweep]'"


@dataclass
class SweepConfig:
    """Everything a sweep is configured by (the CLI flags, in Python)."""

    features: str | list[str] | None = None  # names or glob patterns; None: every complete train array of the subject
    subj: str | None = None  # None: from the subject folder's name (subjXX)
    dims: int = 1024
    seed: int = 0
    backend: str = "numpy"  # himalaya backend
    dtype: str = "float32"  # of the fit
    alphas: tuple[float, ...] = ALPHAS
    cv: int = 5
    val_fraction: float = 0.1
    cache: bool = True
    plots: bool = True
    progress: bool = False
    task_mb: float = 100.0
    storage_options: dict[str, Any] | None = None

    def validate(self) -> SweepConfig:
        for name in ("dims", "task_mb"):
            if not getattr(self, name) > 0:
                raise BadArgumentError(f"--{name} {getattr(self, name)}: must be positive")
        if int(self.seed) < 0:
            raise BadArgumentError(f"--seed {self.seed}: must be >= 0")
        if self.backend not in BACKENDS:
            raise BadArgumentError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.dtype not in ("float32", "float64"):
            raise BadArgumentError(f"--dtype {self.dtype!r}: choose float32 or float64")
        if int(self.cv) < 2:
            raise BadArgumentError(f"cv {self.cv}: need at least 2 folds")
        alphas = tuple(float(a) for a in np.atleast_1d(self.alphas))
        if not alphas or min(alphas) <= 0:
            raise BadArgumentError(f"alphas {self.alphas!r}: need positive values")
        features = self.features.split(",") if isinstance(self.features, str) else self.features
        features = [f.strip() for f in features if f.strip()] if features is not None else None
        if features is not None and not features:
            raise BadArgumentError("--features: give at least one feature name")
        subj = normalize_subj(self.subj) if self.subj is not None else None
        return replace(self, features=features, subj=subj, dims=int(self.dims), seed=int(self.seed), cv=int(self.cv),
                       alphas=alphas)


@dataclass
class SweepResult:
    output_dir: Path
    summary: dict[str, Any]  # what sweep.json holds
    r: dict[str, dict[str, np.ndarray]]  # feature -> hemi -> per-vertex r
    alphas: dict[str, dict[str, np.ndarray]]  # feature -> hemi -> the alpha chosen per vertex
    table: str  # the best feature per ROI
    files: list[Path] = field(default_factory=list)


# ---- the projection (runs on dask workers: numpy only, shipped by value) --------------------------------------------
@functools.cache
def _kernel():
    """The per-block projection as a closure, so cloudpickle ships it by value: workers need numpy, not featstore."""
    import numpy as np

    keep = np.int32(np.uint32(0x8FFF_FFFF).view(np.int32))  # sign bit + the 28 bits below the 3 sign copies
    rescale = np.float32(2.0**112)
    flip = np.int32(np.iinfo(np.int32).min)

    def hashes(seed, b, dims, C, token_block):
        """Offsets (token_block,) and sign-bit masks (token_block, C) of tokens [b*token_block, (b+1)*token_block)."""
        rng = np.random.default_rng([seed, b])
        return rng.integers(0, dims, size=token_block), rng.integers(0, 2, size=(token_block, C), dtype=np.int32) * flip

    def project(block, seed, dims, token_block):
        """(n, T, C) float16/float32 -> (n, dims) float32. (float16 inf/NaN, which extraction never stores, would come
        out finite.)"""
        x = np.asarray(block)
        n, T, C = x.shape
        y = np.zeros((n, dims + C), np.float32)  # outputs dims.. are folded back at the end (the cyclic wrap)
        buf = np.empty((n, min(token_block, T), C), np.float32)
        bits = buf.view(np.int32)
        for b, t0 in enumerate(range(0, T, token_block)):
            k = min(T, t0 + token_block) - t0
            offsets, signs = hashes(seed, b, dims, C, token_block)
            v, i = buf[:, :k], bits[:, :k]
            if x.dtype == np.float16:  # exact: float16 bits moved into float32's fields (numpy's cast is 4x slower)
                np.copyto(i, x[:, t0 : t0 + k].view(np.int16))
                np.left_shift(i, 13, out=i)
                np.bitwise_and(i, keep, out=i)
                np.multiply(v, rescale, out=v)
            else:
                np.copyto(v, x[:, t0 : t0 + k], casting="same_kind")
            np.bitwise_xor(i, signs[:k], out=i)  # the random signs, as sign-bit flips
            for j in range(k):
                o = int(offsets[j])
                dst = y[:, o : o + C]
                np.add(dst, v[:, j], out=dst)
        for w0 in range(dims, dims + C, dims):
            w = min(dims, dims + C - w0)
            y[:, :w] += y[:, w0 : w0 + w]
        return np.ascontiguousarray(y[:, :dims])

    return project


def project_tokens(x: np.ndarray, dims: int = 1024, seed: int = 0) -> np.ndarray:
    """The sweep's projection of in-memory features: (n, T, C) -> (n, dims) float32, the rows the sweep caches."""
    x = np.asarray(x)
    if x.ndim != 3 or x.dtype not in (np.float16, np.float32):
        raise BadArgumentError(f"project_tokens needs (images, tokens, channels) float16/float32, got {x.dtype} {x.shape}")
    return _kernel()(x, int(seed), int(dims), TOKEN_BLOCK)


def _fingerprint(fa: FeatureArray, cfg: SweepConfig) -> dict[str, Any]:
    return {"kind": "featstore.sweep.projection", "method": METHOD, "dims": cfg.dims, "seed": cfg.seed,
            "token_block": TOKEN_BLOCK, "source": fa.path, "source_uid": fa.uid or fa.fingerprint,
            "source_shape": list(fa.shape), "source_dtype": str(fa.dtype)}


def _cache_key(fa: FeatureArray, cfg: SweepConfig) -> str:
    return f"{CACHE_GROUP}/{fa.path}/k{cfg.dims}_seed{cfg.seed}"


def _project_array(fa: FeatureArray, cfg: SweepConfig, client, bar) -> np.ndarray:
    """One read of the array in chunk order, as dask tasks of whole storage units; the rows in order."""
    import dask

    from ..stats import _corrupt_chunks_named, _dask_array, _task_rows, _TaskProgress

    x = _dask_array(fa, _task_rows(fa, fa.dtype.itemsize, cfg.task_mb))
    prefix = f"featstore-sweep-{uuid.uuid4().hex[:8]}-"
    project = _kernel()
    parts = [dask.delayed(project, pure=False)(b, cfg.seed, cfg.dims, TOKEN_BLOCK, dask_key_name=f"{prefix}{i}")
             for i, b in enumerate(x.to_delayed().ravel())]
    with _corrupt_chunks_named(fa):
        if client is None:
            with _TaskProgress(bar, prefix):
                blocks = dask.compute(*parts)
        else:
            import distributed

            futures = client.compute(parts)
            for _ in distributed.as_completed(futures, loop=client.loop):
                bar.update(1)
            blocks = client.gather(futures)
    return np.concatenate(blocks, axis=0)


def _n_tasks(fa: FeatureArray, task_mb: float) -> int:
    from ..stats import _task_rows

    return -(-fa.shape[0] // _task_rows(fa, fa.dtype.itemsize, task_mb))


# ---- inputs -----------------------------------------------------------------------------------------------------
def _natural(name: str) -> list:
    """Sort key: numbers as numbers, and a variant's `_last` block after its `_layerK` ones (layer order)."""
    name = re.sub(r"_last$", "_layer999999", name)
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _select(fs: FeatureStore, subj: str, wanted: list[str] | None) -> tuple[list[FeatureArray], list[str]]:
    """The train arrays to sweep, and the incomplete ones left out (only when features were not named)."""
    have = {fa.feature: fa for fa in fs.arrays(subj=subj, split="train")}
    if wanted is None:
        chosen = [have[f] for f in sorted(have, key=_natural)]
        skipped = [fa for fa in chosen if not fa.is_complete()]
        chosen = [fa for fa in chosen if fa not in skipped]
        if skipped:
            log.warning("skipping %d incomplete array%s: %s", len(skipped), "s" * (len(skipped) > 1), ", ".join(
                f"{fa.path} ({int(fa.done_mask().sum())}/{fa.nchunks} chunks done)" for fa in skipped))
        if not chosen:
            raise BadArgumentError(f"{fs.location} has no complete train array of subject {subj} to sweep")
        return chosen, [fa.path for fa in skipped]
    chosen: list[FeatureArray] = []
    for pattern in wanted:
        hits = [f for f in sorted(have, key=_natural) if fnmatch.fnmatchcase(f, pattern)]
        if not hits:
            raise BadArgumentError(f"--features {pattern}: no train array of subject {subj} in {fs.location} "
                                   f"matches; there are: {', '.join(sorted(have, key=_natural)) or 'none'}")
        chosen += [have[f] for f in hits if have[f] not in chosen]
    for fa in chosen:
        fa.require_complete("sweeping it")
    return chosen, []


def _targets(data_dir: Path, fa: FeatureArray) -> tuple[np.ndarray, dict[str, int]]:
    """(N, lh + rh vertices) float32 fMRI of the training images, checked to belong to the array's images."""
    from ..store import image_list_diff

    subject = read_subject(data_dir, splits=["train"])
    names = [p.name for p in subject.images["train"]]
    if fa.image_names and names != fa.image_names:
        raise BadArgumentError(f"--data_dir {data_dir} holds other images than {fa.path} was extracted from "
                               f"({image_list_diff(fa.image_names, names)}); is it the same subject?")
    parts, nv = [], {}
    for hemi in HEMIS:
        f = subject.fmri(hemi)
        if not f.is_file():
            raise LayoutError(f"--data_dir {data_dir}: no fMRI file {f}")
        a = np.load(f, mmap_mode="r")
        if a.ndim != 2 or a.shape[0] != fa.shape[0]:
            raise BadArgumentError(f"{f} has shape {a.shape}, expected ({fa.shape[0]}, vertices) to match {fa.path}")
        parts.append(np.asarray(a, dtype=np.float32))
        nv[hemi] = int(a.shape[1])
    return np.concatenate(parts, axis=1), nv


def _subj(cfg: SweepConfig, data_dir: Path) -> str:
    m = re.fullmatch(r"subj(\d{2})", data_dir.resolve().name)
    if cfg.subj is None and not m:
        raise BadArgumentError(f"--data_dir {data_dir}: cannot tell the subject from the folder name; give --subj")
    if cfg.subj is not None and m and m.group(1) != cfg.subj:
        raise BadArgumentError(f"--subj {cfg.subj} does not match --data_dir {data_dir} (subject {m.group(1)})")
    return cfg.subj or m.group(1)


def _open(store, cfg: SweepConfig) -> FeatureStore:
    from ..store import FeatureStore

    fs = store if isinstance(store, FeatureStore) else FeatureStore(store, mode="r",
                                                                     storage_options=cfg.storage_options)
    if not cfg.cache or not fs.read_only:
        return fs
    hint = "rerun with --no_cache (cache=False) to project without caching"
    try:
        wfs = fs.reopen("a")
        if wfs.local_root is not None:
            import tempfile

            with tempfile.TemporaryFile(dir=wfs.local_root):
                pass
    except (FeatstoreError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e).split(": ", 1)[-1]
        raise StoreError(f"cannot cache the projections in the store {fs.location} ({reason}); {hint}") from None
    return wfs


def _require_himalaya():
    try:
        import himalaya  # noqa: F401
    except ImportError:
        raise BadArgumentError(INSTALL_HINT) from None


@contextlib.contextmanager
def _backend(name: str):
    """himalaya's backend for the duration (its choice is process-wide, so the previous one is restored)."""
    from himalaya.backend import get_backend, set_backend

    previous = get_backend()
    try:
        module = set_backend(name, on_error="raise")
        if name == "torch_cuda":
            module.zeros(1)  # fails here, in one line, when CUDA is absent
    except Exception as e:  # noqa: BLE001 - missing torch, no CUDA
        set_backend(previous)
        raise BadArgumentError(f"--backend {name}: not available here ({one_line(e)})") from None
    try:
        yield module
    finally:
        set_backend(previous)


# ---- the fit ------------------------------------------------------------------------------------------------------
def fit_and_score(X: np.ndarray, Y: np.ndarray, train: np.ndarray, val: np.ndarray, cfg: SweepConfig, backend):
    """z-score X with the training rows' statistics, RidgeCV on the training rows, Pearson r per target on the
    validation rows. Returns (r (targets,), alpha chosen per target)."""
    import warnings

    from himalaya.ridge import RidgeCV

    from .metrics import pearson_r

    dt = np.dtype(cfg.dtype)
    mean = X[train].mean(axis=0, dtype=np.float64)
    std = X[train].std(axis=0, dtype=np.float64)
    Xs = ((X - mean) / np.where(std > 0, std, 1.0)).astype(dt)
    model = RidgeCV(alphas=np.asarray(cfg.alphas, dt), cv=cfg.cv, fit_intercept=True,
                    solver_params={"n_targets_batch": TARGETS_BATCH, "warn": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # himalaya: "n_samples < n_features" on tiny subjects
        model.fit(Xs[train], Y[train].astype(dt, copy=False))
        pred = backend.to_numpy(model.predict(Xs[val]))
    chosen = np.log(np.asarray(backend.to_numpy(model.best_alphas_), dtype=np.float64))
    grid = np.asarray(cfg.alphas, dtype=np.float64)  # the grid's own values, not their float32 round trip
    return pearson_r(pred, Y[val]), grid[np.abs(chosen[:, None] - np.log(grid)[None, :]).argmin(axis=1)]


# ---- the sweep ----------------------------------------------------------------------------------------------------
def sweep(
    store: str | Path | FeatureStore,
    data_dir: str | Path,
    output_dir: str | Path,
    config: SweepConfig | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    **options: Any,
) -> SweepResult:
    """Project every chosen layer (cached in the store), fit a ridge per layer to all vertices, and write sweep.json,
    the per-vertex r, the figures and the best-feature table into `output_dir`. Options are the fields of
    SweepConfig (features, dims, seed, backend, ...); `workers`/`scheduler` as for `featstore stats`."""
    from .._progress import tqdm
    from ..dataset import LEGACY_SEED, train_val_split
    from ..stats import _scheduler
    from ..store import image_list_diff
    from . import sweep_report

    known = {f.name for f in fields(SweepConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise TypeError(f"sweep() got unknown option(s) {', '.join(bad)}; options are: {', '.join(sorted(known))}")
    cfg = replace(config or SweepConfig(), **options).validate()
    _require_himalaya()
    with _backend(cfg.backend):
        pass  # an unavailable backend fails now, not after the projection pass
    data_dir = Path(data_dir)
    subj = _subj(cfg, data_dir)
    fs = _open(store, cfg)
    arrays, skipped = _select(fs, subj, cfg.features)
    Y, n_vertices = _targets(data_dir, arrays[0])
    for fa in arrays[1:]:
        if fa.image_names and fa.image_names != arrays[0].image_names:
            raise BadArgumentError(f"{fa.path} and {arrays[0].path} hold different images "
                                   f"({image_list_diff(arrays[0].image_names, fa.image_names)})")
    rois = load_rois(data_dir, required=()).check_vertices(n_vertices)
    out = sweep_report.prepare_output(output_dir)
    train, val = train_val_split(arrays[0].shape[0], cfg.val_fraction)
    if len(val) < 2 or len(train) < cfg.cv:
        raise BadArgumentError(f"{arrays[0].shape[0]} images give {len(train)} training and {len(val)} validation "
                               f"images: need >= {cfg.cv} (cv folds) and >= 2")

    projections: dict[str, np.ndarray] = {}
    info: dict[str, dict[str, Any]] = {}
    todo = []
    for fa in arrays:
        cached = fs.load_derived(_cache_key(fa, cfg), _fingerprint(fa, cfg)) if cfg.cache else None
        if cached is not None:
            projections[fa.feature] = cached
            info[fa.feature] = {"cached": True, "seconds": 0.0}
        else:
            todo.append(fa)
    gb = sum(fa.shape[0] * int(np.prod(fa.shape[1:])) * fa.dtype.itemsize for fa in todo) / 1e9
    log.info("sweep of %d feature%s: %d projection%s reused from the store, %d to compute (%.2f GB to read)",
             len(arrays), "s" * (len(arrays) > 1), len(arrays) - len(todo), "s" * (len(arrays) - len(todo) != 1),
             len(todo), gb)
    if todo:
        with _scheduler(scheduler, workers) as client, tqdm(
            total=sum(_n_tasks(fa, cfg.task_mb) for fa in todo), desc="project", unit="task",
            disable=None if cfg.progress else True,
        ) as bar:
            for fa in todo:
                t0 = time.perf_counter()
                y = _project_array(fa, cfg, client, bar)
                if not np.isfinite(y).all():  # a data fault (exit 1), not a user mistake
                    err = StoreError(f"{fa.path}: the projection is not finite (the array holds inf or NaN values); "
                                     f"check it with `featstore stats {fs.location} --feature {fa.feature}`")
                    err.exit_code = 1
                    raise err
                if cfg.cache:
                    fs.save_derived(_cache_key(fa, cfg), y, _fingerprint(fa, cfg))
                projections[fa.feature] = y
                info[fa.feature] = {"cached": False, "seconds": time.perf_counter() - t0}

    r: dict[str, dict[str, np.ndarray]] = {}
    alphas: dict[str, dict[str, np.ndarray]] = {}
    split = np.cumsum([0, n_vertices["lh"]])[1]
    with _backend(cfg.backend) as backend, tqdm(arrays, desc="fit", unit="feature",
                                                disable=None if cfg.progress else True) as bar:
        for fa in bar:
            bar.set_postfix_str(fa.feature)
            t0 = time.perf_counter()
            rr, aa = fit_and_score(projections[fa.feature], Y, train, val, cfg, backend)
            r[fa.feature] = {"lh": rr[:split], "rh": rr[split:]}
            alphas[fa.feature] = {"lh": aa[:split], "rh": aa[split:]}
            info[fa.feature]["fit_seconds"] = time.perf_counter() - t0
            info[fa.feature]["array"] = fa.path
            info[fa.feature]["shape"] = list(fa.shape)

    summary = sweep_report.summarize_sweep(r, alphas, rois, info, {
        "store": fs.location, "data_dir": str(data_dir), "subj": subj, "dims": cfg.dims, "seed": cfg.seed,
        "method": METHOD, "backend": cfg.backend, "dtype": cfg.dtype, "alphas": list(cfg.alphas), "cv": cfg.cv,
        "split": {"train": len(train), "val": len(val), "val_fraction": cfg.val_fraction, "seed": LEGACY_SEED},
        "n_vertices": n_vertices, "skipped_incomplete": skipped,
    })
    files = sweep_report.write_outputs(out, summary, r, alphas, rois, plots=cfg.plots)
    return SweepResult(output_dir=out, summary=summary, r=r, alphas=alphas,
                       table=sweep_report.format_table(summary), files=files)


__all__ = ["ALPHAS", "SweepConfig", "SweepResult", "fit_and_score", "project_tokens", "sweep"]
