"""Scores and result files of an encoding model: per-vertex Pearson r, per-ROI summaries, metrics.json, the r-per-ROI
plot and the Algonauts submission files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import BadArgumentError
from .rois import HEMIS, SubjectRois


def pearson_r(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-column Pearson correlation of two (n_images, n_vertices) arrays, as the Algonauts challenge scores;
    NaN where either column is constant (no correlation is defined there)."""
    p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise BadArgumentError(f"pearson_r needs two (images, vertices) arrays of one shape, got {p.shape} and {t.shape}")
    p = p - p.mean(0)
    t = t - t.mean(0)
    denom = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (p * t).sum(0) / np.where(denom > 0, denom, 1.0), np.nan)


def val_perf(r: dict[str, np.ndarray]) -> float:
    """The reference's model-selection score: (mean lh r + mean rh r) / 2 over all vertices, NaN r counted as 0 (a
    constant prediction or target scores nothing rather than being left out)."""
    return float((np.nan_to_num(r["lh"], nan=0.0).mean() + np.nan_to_num(r["rh"], nan=0.0).mean()) / 2)


def _stat(fn, r: np.ndarray) -> float | None:
    r = r[np.isfinite(r)]
    return float(fn(r)) if r.size else None


def summarize(r: dict[str, np.ndarray], rois: SubjectRois | None = None) -> dict:
    """`lh_mean_r`, `rh_mean_r`, `lh_median_r`, `rh_median_r`, `mean_r` (all vertices of both hemispheres) and, with
    ROIs, `roi_mean_r` = {ROI name: {"lh": r, "rh": r, "n_lh": vertices, "n_rh": vertices}} (None where empty)."""
    out: dict = {}
    for hemi in HEMIS:
        out[f"{hemi}_mean_r"] = _stat(np.mean, r[hemi])
        out[f"{hemi}_median_r"] = _stat(np.median, r[hemi])
    out["mean_r"] = _stat(np.mean, np.concatenate([r[h] for h in HEMIS]))
    if rois is not None:
        per: dict[str, dict] = {}
        for hemi in HEMIS:
            for name, mask in rois.roi_vertices(hemi).items():
                entry = per.setdefault(name, {})
                entry[hemi] = _stat(np.mean, r[hemi][mask])
                entry[f"n_{hemi}"] = int(mask.sum())
        out["roi_mean_r"] = per
    return out


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if x is None or isinstance(x, (str, bool, int)):
        return x
    return str(x)  # paths, a FeatureStore passed as the store, ...


def write_metrics(path: str | Path, metrics: dict) -> Path:
    """metrics.json; NaN/inf become null so that any JSON reader accepts the file."""
    path = Path(path)
    path.write_text(json.dumps(_json_safe(metrics), indent=1) + "\n")
    return path


def plot_roi_r(roi_mean_r: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Bar plot of the mean validation r per ROI and hemisphere (matplotlib, Agg backend, imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(roi_mean_r)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 3.6), dpi=100)
    try:
        for k, hemi in enumerate(HEMIS):
            vals = [roi_mean_r[n].get(hemi) for n in names]
            ax.bar(x + (k - 0.5) * 0.4, [np.nan if v is None else v for v in vals], width=0.4, label=hemi)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("mean validation r")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)


def save_submission(output_path: str | Path, lh_pred: np.ndarray, rh_pred: np.ndarray) -> tuple[Path, Path]:
    """`lh_pred_test.npy` and `rh_pred_test.npy`: float32 (test images, vertices), the Algonauts submission format."""
    out = Path(output_path)
    files = []
    for hemi, pred in (("lh", lh_pred), ("rh", rh_pred)):
        f = out / f"{hemi}_pred_test.npy"
        np.save(f, np.ascontiguousarray(pred, dtype=np.float32))
        files.append(f)
    return files[0], files[1]
