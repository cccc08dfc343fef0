"""What a sweep leaves in its output folder: sweep.json, the per-vertex r and alphas (.npy), a feature x ROI heatmap,
r by feature per ROI class, and the best feature per ROI as a table.

ROI means pool the vertices of both hemispheres ("all") and are also given per hemisphere; vertices whose r is not
defined (a constant prediction or target) are left out. matplotlib is optional: without it the figures are skipped
with one warning. Figures use matplotlib's object API (no pyplot, no global backend switch).
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadArgumentError
from ..table import format_table as format_rows
from .rois import HEMIS, SubjectRois

log = logging.getLogger(__name__)

FILES = {"json": "sweep.json", "heatmap": "heatmap.png", "by_feature": "r_by_feature.png"}


def prepare_output(output_dir: str | Path) -> Path:
    """The output folder, created, and checked writable before any work is done."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".featstore-sweep-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BadArgumentError(f"{out}: cannot write there ({e.strerror or e})", param="output_dir") from None
    return out


def _mean(values: np.ndarray) -> float | None:
    v = values[np.isfinite(values)]
    return float(v.mean()) if v.size else None


def roi_order(rois: SubjectRois) -> list[tuple[str, str]]:
    """(class, ROI name) of every ROI with vertices in either hemisphere, in class and label order."""
    out = []
    for cls, names in rois.names.items():
        for label, name in sorted(names.items()):
            if label != 0 and any((rois.labels[h][cls] == label).any() for h in HEMIS):
                out.append((cls, name))
    return out


def summarize_sweep(r: dict, alphas: dict, rois: SubjectRois, info: dict, meta: dict) -> dict[str, Any]:
    """The content of sweep.json: the run's settings, per feature the mean r per hemisphere and per ROI and the
    chosen alphas, and the best feature per ROI."""
    masks = {h: rois.roi_vertices(h) for h in HEMIS}
    order = roi_order(rois)
    grid = np.asarray(meta["alphas"])
    features: dict[str, Any] = {}
    for feat, per_hemi in r.items():
        both = np.concatenate([per_hemi[h] for h in HEMIS])
        roi_r = {}
        for _, name in order:
            sel = {h: per_hemi[h][masks[h][name]] if name in masks[h] else np.empty(0) for h in HEMIS}
            roi_r[name] = {**{h: _mean(sel[h]) for h in HEMIS}, "all": _mean(np.concatenate(list(sel.values()))),
                           "n": int(sum(v.size for v in sel.values()))}
        a = np.concatenate([alphas[feat][h] for h in HEMIS])
        features[feat] = {
            **{k: info[feat][k] for k in ("array", "shape")},
            "mean_r": {**{h: _mean(per_hemi[h]) for h in HEMIS}, "all": _mean(both)},
            "roi_mean_r": roi_r,
            "alphas": {"grid": grid.tolist(), "vertices_per_alpha": [int((a == g).sum()) for g in grid],
                       "median": float(np.median(a))},
            "projection": {"cached": info[feat]["cached"], "seconds": round(info[feat]["seconds"], 3)},
            "fit_seconds": round(info[feat]["fit_seconds"], 3),
            "files": {f"{kind}_{h}": f"{kind}/{feat}.{h}.npy" for kind in ("r", "alpha") for h in HEMIS},
        }
    sizes = {name: int(sum(masks[h][name].sum() for h in HEMIS if name in masks[h])) for _, name in order}
    sizes["all vertices"] = int(sum(meta["n_vertices"].values()))
    best = {}
    for cls, name in order + [("", "all vertices")]:
        ranked = sorted(features, key=lambda f: _sort_key(_roi_r(features[f], name)), reverse=True)
        best[name] = {"class": cls, "n": sizes[name], "feature": ranked[0], "r": _roi_r(features[ranked[0]], name),
                      "runner_up": ranked[1] if len(ranked) > 1 else None,
                      "runner_up_r": _roi_r(features[ranked[1]], name) if len(ranked) > 1 else None}
    return {**meta, "features": features, "rois": [{"class": c, "name": n, "n": sizes[n]} for c, n in order],
            "best_feature_per_roi": best}


def _sort_key(v: float | None) -> float:
    return -math.inf if v is None else v


def _roi_r(feat: dict, name: str) -> float | None:
    return feat["mean_r"]["all"] if name == "all vertices" else feat["roi_mean_r"][name]["all"]


def format_table(summary: dict[str, Any]) -> str:
    """The best feature per ROI (mean validation r over the ROI's vertices of both hemispheres), with the runner-up."""
    rows = []
    for name, b in summary["best_feature_per_roi"].items():
        up = f"{b['runner_up']} ({_fmt(b['runner_up_r'])})" if b["runner_up"] else "-"
        rows.append((b["class"], name, str(b["n"]), b["feature"], _fmt(b["r"]), up))
    table = format_rows(rows, ("class", "roi", "vertices", "best feature", "r", "runner-up (r)"), rule=False)
    n = len(summary["features"])
    head = (f"best feature per ROI, of {n} feature{'s' * (n > 1)} (mean validation r, both hemispheres; "
            f"{summary['split']['train']} training / {summary['split']['val']} validation images, dims {summary['dims']})")
    return head + "\n" + table


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_outputs(out: Path, summary: dict, r: dict, alphas: dict, rois: SubjectRois, plots: bool = True) -> list[Path]:
    files = []
    for kind, values in (("r", r), ("alpha", alphas)):
        (out / kind).mkdir(exist_ok=True)
        for feat, per_hemi in values.items():
            for h in HEMIS:
                f = out / kind / f"{feat}.{h}.npy"
                np.save(f, np.asarray(per_hemi[h], np.float32 if kind == "r" else np.float64))
                files.append(f)
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning("matplotlib is not installed: no figures (pip install 'featstore[plot]')")
        else:
            files += [plot_heatmap(summary, out / FILES["heatmap"]), plot_by_feature(summary, out / FILES["by_feature"])]
    path = out / FILES["json"]
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, path)
    return [path, *files]


def _matrix(summary: dict) -> tuple[list[str], list[dict], np.ndarray]:
    feats = list(summary["features"])
    rois = summary["rois"]
    m = np.array([[summary["features"][f]["roi_mean_r"][r["name"]]["all"] for r in rois] for f in feats], dtype=float)
    return feats, rois, m


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_heatmap(summary: dict, path: str | Path) -> Path:
    """Feature (rows) x ROI (columns, grouped by class) mean validation r; a dot marks each ROI's best feature."""
    feats, rois, m = _matrix(summary)
    fig = _figure((max(6.0, 0.32 * len(rois) + 3), max(3.0, 0.3 * len(feats) + 2)))
    ax = fig.subplots()
    finite = m[np.isfinite(m)]
    vmax = max(float(np.abs(finite).max()) if finite.size else 1.0, 1e-3)
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="mean validation r")
    ax.set_xticks(range(len(rois)), [r["name"] for r in rois], rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(feats)), feats, fontsize=7)
    best = [(j, int(np.nanargmax(m[:, j]))) for j in range(len(rois)) if np.isfinite(m[:, j]).any()]
    if best:
        ax.scatter(*zip(*best), s=18, c="k", edgecolors="w", linewidths=0.8, zorder=3)
    classes = [r["class"] for r in rois]
    starts = [j for j in range(len(rois)) if j == 0 or classes[j] != classes[j - 1]]
    for a, b in zip(starts, starts[1:] + [len(rois)]):
        if a:
            ax.axvline(a - 0.5, color="k", lw=1.5)
        ax.text((a + b - 1) / 2, -0.6, classes[a], ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"which feature predicts which ROI (subject {summary['subj']}, dims {summary['dims']}); "
                 "dot: best feature of the ROI", fontsize=9)
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_by_feature(summary: dict, path: str | Path) -> Path:
    """One panel per ROI class: mean validation r of each of its ROIs along the features (in sweep order)."""
    feats, rois, m = _matrix(summary)
    classes = list(dict.fromkeys(r["class"] for r in rois))
    cols = min(3, max(1, len(classes)))
    rows = max(1, -(-len(classes) // cols))
    fig = _figure((4.2 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    x = np.arange(len(feats))
    for ax, cls in zip(axes, classes):
        for j, r in enumerate(rois):
            if r["class"] == cls:
                ax.plot(x, m[:, j], "o-", ms=3, lw=1, label=r["name"])
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_xticks(x, feats, rotation=70, ha="right", fontsize=6)
        ax.set_title(cls, fontsize=9)
        ax.set_ylabel("mean validation r", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
    for ax in axes[len(classes):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=100)
    return Path(path)
