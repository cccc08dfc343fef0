"""Saving statistics next to their array (`{split}_stats`) and loading them back."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FeatstoreError, NotFoundInStoreError, StoreError
from ..storage import FeatureArray, FeatureStore

HIST_QUANTILES = (1e-4, 1.0 - 1e-4)

_PARTS = ("patch", "cls")
_FIELDS = ("mean", "std", "min", "max")
_PCA_FIELDS = ("components", "explained_variance", "explained_variance_ratio", "singular_values")
_HIST_SCALARS = ("below", "above", "nan", "every", "images")


_NO_SAVE_HINT = "rerun with --no_save (save=False) to compute them without saving"


def open_for_saving(fs: FeatureStore, fa: FeatureArray) -> tuple[FeatureStore, FeatureArray]:
    """The store opened for writing the results, checked before the pass: a read-only store fails at once."""
    if fs.local_root is not None and not os.access(fs.local_root, os.W_OK | os.X_OK):
        raise StoreError(f"cannot save the statistics: the store {fs.location} is not writable; {_NO_SAVE_HINT}")
    if not fs.read_only:
        return fs, fa
    try:
        wfs = fs.reopen("a")
    except FeatstoreError as e:
        raise StoreError(f"cannot save the statistics into the store {fs.location} ({e}); {_NO_SAVE_HINT}") from None
    return wfs, wfs.get(fa.feature, fa.subj, fa.split)


def save_stats(fs: FeatureStore, fa: FeatureArray, r: dict[str, Any]) -> str:
    arrays: dict[str, np.ndarray] = {f"{p}_{f}": r[p][f] for p in _PARTS for f in _FIELDS}
    arrays.update(
        token_norm=r["token_norm"],
        cls_norm=np.float64(r["cls_norm"]),
        hist_counts=r["hist"]["counts"],
        hist_edges=r["hist"]["edges"],
        hist_f16_counts=r["hist"]["f16_counts"],
    )
    if "position_share" in r["outliers"]:
        arrays["outlier_position_share"] = r["outliers"]["position_share"]
    for f in _PCA_FIELDS if "pca" in r else ():
        arrays[f"pca_{f}"] = r["pca"][f]
    attrs = {
        "kind": "featstore.stats",
        "shape": list(r["shape"]),
        "dtype": r["dtype"],
        "grid": list(r["grid"]),
        "counts": {p: r[p]["count"] for p in _PARTS},
        "hist": {k: r["hist"][k] for k in _HIST_SCALARS} | {"quantiles": list(HIST_QUANTILES)},
        "outliers": {k: v for k, v in r["outliers"].items() if k != "position_share"},
        "pca": {"k": len(r["pca"]["singular_values"]), "n_power_iter": r["pca"]["n_power_iter"]} if "pca" in r else None,
        "timing": r["timing"],
    }
    try:
        fs.save_stats(fa, arrays, attrs)
    except OSError as e:
        raise StoreError(f"cannot save the statistics into the store {fs.location} ({e}); {_NO_SAVE_HINT}") from None
    return f"{fs.location}/{fa.path}_stats"


def load_feature_stats(store: str | Path | FeatureStore, feature: str, subj: str, split: str) -> dict[str, Any]:
    """The saved result of `feature_stats` (same structure, without timing), or NotFoundInStoreError."""
    fs = FeatureStore.open(store)
    fa = fs.get(feature, subj, split)
    raw = fs.load_stats(fa)
    if raw is None or raw.get("attrs", {}).get("kind") != "featstore.stats":
        raise NotFoundInStoreError(
            f"no statistics saved for {fa.path} (or the array changed since); run: featstore stats {fs.location} "
            f"--feature {feature} --subj {subj} --split {split}"
        )
    a = raw["attrs"]
    r: dict[str, Any] = {"array": fa.path, "shape": tuple(a["shape"]), "dtype": a["dtype"], "grid": tuple(a["grid"])}
    for p in _PARTS:
        r[p] = {f: raw[f"{p}_{f}"] for f in _FIELDS} | {"count": a["counts"][p]}
    r["token_norm"] = raw["token_norm"]
    r["cls_norm"] = float(raw["cls_norm"][0])
    r["hist"] = {"counts": raw["hist_counts"], "edges": raw["hist_edges"], "f16_counts": raw["hist_f16_counts"]}
    r["hist"].update({k: a["hist"][k] for k in _HIST_SCALARS})
    r["outliers"] = dict(a["outliers"])
    if "outlier_position_share" in raw:
        r["outliers"]["position_share"] = raw["outlier_position_share"]
    if a.get("pca"):
        r["pca"] = {f: raw[f"pca_{f}"] for f in _PCA_FIELDS} | {"n_power_iter": a["pca"]["n_power_iter"]}
    r["timing"] = a.get("timing")
    r["saved_to"] = f"{fs.location}/{fa.path}_stats"
    return r
