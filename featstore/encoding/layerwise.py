"""Which layer predicts which brain area: a ridge encoding sweep over every stored layer, out of core.

Per feature (an array `{feature}/{subj}/train` of the store): the streamed, seeded projection of its tokens, cached
in the store (projection.py); a multi-target ridge per layer on all vertices, Pearson r per vertex on the legacy
validation split (ridge.py); outputs: sweep.json, per-vertex r, figures and the best-feature table (sweep_report.py).
"""
from __future__ import annotations

import fnmatch
import logging
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BadArgumentError, FeatstoreError, LayoutError, StoreError
from ..layout import read_subject
from . import projection, ridge
from .rois import HEMIS, load_rois
from .sweep_config import SweepConfig

if TYPE_CHECKING:  # the store (zarr) loads on first use: `featstore.encoding` imports this module eagerly
    from ..storage import FeatureArray, FeatureStore

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    output_dir: Path
    summary: dict[str, Any]  # what sweep.json holds
    r: dict[str, dict[str, np.ndarray]]  # feature -> hemi -> per-vertex r
    alphas: dict[str, dict[str, np.ndarray]]  # feature -> hemi -> the alpha chosen per vertex
    table: str  # the best feature per ROI
    files: list[Path] = field(default_factory=list)


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
    from ..storage import image_list_diff

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
        raise BadArgumentError(f"{data_dir}: cannot tell the subject from the folder name; give --subj", param="data_dir")
    if cfg.subj is not None and m and m.group(1) != cfg.subj:
        raise BadArgumentError(f"{cfg.subj} does not match --data_dir {data_dir} (subject {m.group(1)})", param="subj")
    return cfg.subj or m.group(1)


def _open(store, cfg: SweepConfig) -> FeatureStore:
    from ..storage import FeatureStore

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
    from .. import _dask
    from .._progress import tqdm
    from ..dataset import LEGACY_SEED, train_val_split
    from ..storage import image_list_diff
    from . import sweep_report

    known = {f.name for f in fields(SweepConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise TypeError(f"sweep() got unknown option(s) {', '.join(bad)}; options are: {', '.join(sorted(known))}")
    cfg = replace(config or SweepConfig(), **options).validate()
    ridge.require_himalaya()
    with ridge.backend(cfg.backend):
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
        cached = fs.load_derived(projection.cache_key(fa, cfg.dims, cfg.seed), projection.fingerprint(fa, cfg.dims, cfg.seed)) if cfg.cache else None
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
        with _dask.client(scheduler, workers) as client, tqdm(
            total=sum(projection.n_tasks(fa, cfg.task_mb) for fa in todo), desc="project", unit="task",
            disable=None if cfg.progress else True,
        ) as bar:
            for fa in todo:
                t0 = time.perf_counter()
                y = projection.project_array(fa, cfg.dims, cfg.seed, cfg.task_mb, client, bar)
                if not np.isfinite(y).all():  # a data fault (exit 1), not a user mistake
                    err = StoreError(f"{fa.path}: the projection is not finite (the array holds inf or NaN values); "
                                     f"check it with `featstore stats {fs.location} --feature {fa.feature}`")
                    err.exit_code = 1
                    raise err
                if cfg.cache:
                    fs.save_derived(projection.cache_key(fa, cfg.dims, cfg.seed), y, projection.fingerprint(fa, cfg.dims, cfg.seed))
                projections[fa.feature] = y
                info[fa.feature] = {"cached": False, "seconds": time.perf_counter() - t0}

    r: dict[str, dict[str, np.ndarray]] = {}
    alphas: dict[str, dict[str, np.ndarray]] = {}
    split = np.cumsum([0, n_vertices["lh"]])[1]
    with ridge.backend(cfg.backend) as backend, tqdm(arrays, desc="fit", unit="feature",
                                                disable=None if cfg.progress else True) as bar:
        for fa in bar:
            bar.set_postfix_str(fa.feature)
            t0 = time.perf_counter()
            rr, aa = ridge.fit_and_score(projections[fa.feature], Y, train, val, backend, alphas=cfg.alphas, cv=cfg.cv,
                                           dtype=cfg.dtype)
            r[fa.feature] = {"lh": rr[:split], "rh": rr[split:]}
            alphas[fa.feature] = {"lh": aa[:split], "rh": aa[split:]}
            info[fa.feature]["fit_seconds"] = time.perf_counter() - t0
            info[fa.feature]["array"] = fa.path
            info[fa.feature]["shape"] = list(fa.shape)

    summary = sweep_report.summarize_sweep(r, alphas, rois, info, {
        "store": fs.location, "data_dir": str(data_dir), "subj": subj, "dims": cfg.dims, "seed": cfg.seed,
        "method": projection.METHOD, "backend": cfg.backend, "dtype": cfg.dtype, "alphas": list(cfg.alphas), "cv": cfg.cv,
        "split": {"train": len(train), "val": len(val), "val_fraction": cfg.val_fraction, "seed": LEGACY_SEED},
        "n_vertices": n_vertices, "skipped_incomplete": skipped,
    })
    files = sweep_report.write_outputs(out, summary, r, alphas, rois, plots=cfg.plots)
    return SweepResult(output_dir=out, summary=summary, r=r, alphas=alphas,
                       table=sweep_report.format_table(summary), files=files)


__all__ = ["SweepConfig", "SweepResult", "sweep"]
