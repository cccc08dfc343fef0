"""Presenting a store and its statistics: the `featstore info` table, the `feature_stats` table, and figures
(the statistics; a stimulus next to its token-norm map and a PCA-to-RGB image of its patch tokens).

matplotlib is imported lazily and only through its object API (no pyplot, no global backend switch).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadArgumentError
from ..table import format_table

CONSTANT_ULPS = 4  # a channel whose std is below 4 units in the last place of its largest |value| is constant


# ---- the store --------------------------------------------------------------------------------------------------------
def format_info(store) -> str:
    """The `featstore info` table: one row per array with shape, dtype, chunks, codec (the --codec name: bitround-K
    is lossy), bytes on disk, compression ratios, completion and weights. The ratios count the done chunks only (raw bytes against the stored bytes of those same
    chunks), so an incomplete array is not flattered; they show "-" while no chunk is done. Completion counts the
    unit a done marker covers, named: "40/40 chunks", or "5/5 packs" where --pack put K chunks in one object."""
    from ..storage import FeatureStore, path_in_use

    fs = FeatureStore.open(store)
    header = ("array", "shape", "dtype", "chunks", "codec", "on disk", "ratio", "vs f32 npy", "done", "weights")
    rows, arrays = [], list(fs.arrays())
    for fa in arrays:
        a = fa.summary()
        w = a["weights"]
        wdesc = w.get("kind", "?") + (f" seed={w['seed']}" if w.get("kind") == "random" else f" {w.get('name', '')}")
        rows.append((
            fa.path, "x".join(map(str, a["shape"])), a["dtype"],
            "x".join(map(str, a["chunks"])) + (f" ({a['chunks_per_unit']}/pack)" if a["unit"] == "pack" else ""),
            a["codec"], f"{a['bytes_on_disk'] / 1e6:.1f} MB", _ratio(a["ratio"]), _ratio(a["ratio_vs_float32"]),
            f"{a['done']}/{a['total']} {a['unit']}s", wdesc.strip(),
        ))
    if not rows:
        return f"{fs.location}: no arrays"
    head = f"{fs.location}  (ratio = raw bytes / bytes on disk, over the done chunks only)"
    return head + "\n" + format_table(rows, header, rule=False) + _precision_lines(arrays) + f"\nchunk I/O: {path_in_use()}"


def _precision_lines(arrays) -> str:
    """One line per array computed in a half precision (--precision): its measured error against float32."""
    from ..extraction.precision import error_line

    lines = []
    for fa in arrays:
        if fa.meta.get("precision", "float32") != "float32":
            e = fa.meta.get("precision_error")
            lines.append(error_line(fa.path, e) if e else f"{fa.path}: {fa.meta['precision']} (error not measured yet)")
    return "".join(f"\nprecision: {line}" for line in lines)


def _ratio(v: float) -> str:
    return "-" if not np.isfinite(v) else f"{v:.2f}x"


# ---- statistics -------------------------------------------------------------------------------------------------------
def _g(v: float) -> str:
    return f"{v:.4g}"


def constant_channels(part: dict[str, Any], dtype: str) -> np.ndarray:
    """Boolean per channel: its std is below `CONSTANT_ULPS` units in the last place of the stored dtype at the
    channel's largest |value|, i.e. the channel is constant at stored precision (e.g. the CLS token over a few
    images). |mean|/std means nothing there, so the table lists such channels apart instead of ranking them."""
    eps = float(np.finfo(np.dtype(dtype)).eps) if np.dtype(dtype).kind == "f" else 0.0
    scale = np.maximum(np.abs(np.asarray(part["min"], np.float64)), np.abs(np.asarray(part["max"], np.float64)))
    return np.asarray(part["std"], np.float64) <= CONSTANT_ULPS * eps * scale


def format_stats(r: dict[str, Any]) -> str:
    """A short table for the terminal."""
    N, T, C = r["shape"]
    lines = [f"{r['array']}: {N} images x {T} tokens x {C} channels ({r['dtype']})"]
    t = r.get("timing")
    if t:
        mbs = t["decoded_bytes"] / 1e6 / max(t["pass_s"], 1e-9)
        lines[0] += f"; pass {t['pass_s']:.3g} s ({mbs:.3g} MB/s decoded), total {t['total_s']:.3g} s"
    rows = [("", "patch tokens", "CLS token")]
    cols = [r["patch"], r["cls"]]
    rows.append(("values", *[f"{c['count']}" for c in cols]))
    rows.append(("mean of means", *[_g(c["mean"].mean()) for c in cols]))
    rows.append(("std (min/median/max)", *[f"{_g(c['std'].min())} / {_g(np.median(c['std']))} / {_g(c['std'].max())}" for c in cols]))
    rows.append(("min / max", *[f"{_g(c['min'].min())} / {_g(c['max'].max())}" for c in cols]))

    const = [constant_channels(c, r["dtype"]) for c in cols]

    def top(c, skip):
        score = np.abs(c["mean"]) / np.where(c["std"] > 0, c["std"], np.inf)
        order = [i for i in np.argsort(-score) if not skip[i]][:5]
        return ", ".join(f"{i}:{score[i]:.2g}" for i in order) or "-"

    def listed(skip):
        ix = np.flatnonzero(skip)
        return f"{ix.size}" + (f" ({', '.join(map(str, ix[:6]))}{', ...' if ix.size > 6 else ''})" if ix.size else "")

    rows.append(("top-5 |mean|/std (ch:val)", *[top(c, k) for c, k in zip(cols, const)]))
    rows.append((f"constant (std < {CONSTANT_ULPS} ulp)", *[listed(k) for k in const]))
    lines.append(format_table(rows, indent="  "))
    tn = np.asarray(r["token_norm"])
    where = np.unravel_index(np.argmax(tn), tn.shape)
    lines.append(
        f"token norm: patch mean {_g(tn.mean())} (positions {_g(tn.min())}..{_g(tn.max())}, max at {tuple(int(i) for i in where)}"
        f" of the {'x'.join(map(str, tn.shape))} grid); CLS {_g(r['cls_norm'])}"
    )
    o = r["outliers"]
    if "threshold" in o:
        lines.append(
            f"outlier tokens: {100 * o['share']:.3g}% of patch tokens ({o['count']}) have norm > {_g(o['threshold'])}"
            f" = median {_g(o['median'])} + {o['z']:g} x 1.4826 x MAD {_g(o['mad'])}; {100 * o['image_share']:.3g}% of images have one"
        )
    h = r["hist"]
    lines.append(
        f"histogram: {len(h['counts'])} bins over [{_g(h['edges'][0])}, {_g(h['edges'][-1])}] (0.01%..99.99% quantiles)"
        + (f" of 1 image in {h['every']} ({h['images']} images)" if h.get("every", 1) > 1 else "")
        + f"; {h['below']} below, {h['above']} above" + (f", {h['nan']} nan" if h["nan"] else "")
    )
    if "pca" in r:
        ratio = r["pca"]["explained_variance_ratio"]
        head = ", ".join(f"{100 * v:.3g}%" for v in ratio[:5])
        lines.append(f"PCA: top-{len(ratio)} components explain {100 * ratio.sum():.3g}% of the patch variance (PC1.. {head})")
    if r.get("saved_to"):
        lines.append(f"saved to {r['saved_to']}")
    return "\n".join(lines)


def require_plotting(path: str | Path | None = None) -> Path | None:
    """BadArgumentError unless matplotlib can be imported and can write `path`'s format; returns the file name
    that will be written (`.png` added to a name without an extension, as matplotlib itself does)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise BadArgumentError("--plot needs matplotlib, which is not installed: pip install 'featstore[plot]'") from None
    if path is None:
        return None
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise BadArgumentError(f"--plot {path}: matplotlib cannot write {path.suffix} files; use one of "
                               f"{', '.join('.' + f for f in sorted(formats))}")
    if path.is_dir():
        raise BadArgumentError(f"--plot {path}: is a folder; give a file name such as {path / 'stats.png'}")
    probe = path.parent.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BadArgumentError(f"--plot {path}: cannot write there ({probe} is not a writable folder)")
    return path


def plot_stats(r: dict[str, Any], path: str | Path) -> Path:
    """One figure: channel means/stds, the token-norm map, the histogram, and the PCA spectrum when computed.
    Returns the file written (`.png` is added to a name without an extension)."""
    path = require_plotting(path)
    return _save_figure(stats_figure(r), path)


def stats_figure(r: dict[str, Any]):
    """The matplotlib Figure that `plot_stats` writes."""
    require_plotting()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    fig.suptitle(f"{r['array']}  {'x'.join(map(str, r['shape']))} {r['dtype']}")

    ax = axes[0]
    ch = np.arange(len(r["patch"]["mean"]))
    order = np.argsort(r["patch"]["mean"])
    parts = {part: (np.asarray(r[part]["mean"])[order], np.asarray(r[part]["std"])[order]) for part in ("patch", "cls")}
    span = np.ptp(np.concatenate([np.r_[m - s, m + s] for m, s in parts.values()])) or 1.0
    for (part, (m, s)), color in zip(parts.items(), ("C0", "C1")):
        if 2 * s.max() >= 0.01 * span:
            ax.plot(ch, m, color=color, lw=1, label=f"{part} mean")
            ax.fill_between(ch, m - s, m + s, color=color, alpha=0.25, lw=0, label=f"{part} +-std")
        else:  # a band under 1% of the panel's height would be an empty legend entry (e.g. a constant CLS token)
            ax.plot(ch, m, color=color, lw=1, label=f"{part} mean (std <= {s.max():.2g}: too thin to draw)")
    ax.set(title="channel means +- std (sorted by patch mean)", xlabel="channel (sorted)", ylabel="value")
    ax.legend(fontsize="small")

    ax = axes[1]
    tn = np.asarray(r["token_norm"])
    im = ax.imshow(tn if tn.ndim == 2 else tn[None, :], cmap="viridis")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set(title=f"mean token L2 norm (CLS {_g(r['cls_norm'])})")

    ax = axes[2]
    h = r["hist"]
    ax.stairs(h["counts"], h["edges"], fill=True)
    ax.set_yscale("log")
    ax.set(title=f"values ({h['below']} below, {h['above']} above range)", xlabel="value", ylabel="count")

    if "pca" in r:
        ax = axes[3]
        ratio = r["pca"]["explained_variance_ratio"]
        k = np.arange(1, len(ratio) + 1)
        ax.bar(k, ratio, label="per component")
        ax.plot(k, np.cumsum(ratio), "o-", color="C3", ms=3, label="cumulative")
        ax.set(title="PCA of patch tokens", xlabel="component", ylabel="explained variance ratio")
        ax.legend(fontsize="small")
    elif "position_share" in r["outliers"]:
        ax = axes[3]
        ps = np.asarray(r["outliers"]["position_share"])
        im = ax.imshow(ps if ps.ndim == 2 else ps[None, :], cmap="magma")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set(title=f"share of images with an outlier token here (norm > {_g(r['outliers']['threshold'])})")
    return fig


def _save_figure(fig, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise BadArgumentError(f"--plot {path}: cannot write it ({e.strerror or e})") from None
    return path


# ---- one image's tokens -------------------------------------------------------------------------------------------
def token_norm_map(features) -> np.ndarray:
    """(C, H, W) patch features (a `FeatureDataset` item) -> (H, W) L2 norm of each token."""
    x = np.asarray(features, dtype=np.float64)
    return np.sqrt(np.einsum("chw,chw->hw", x, x))


def pca_rgb(features, stats: dict[str, Any], robust: float = 1.0) -> np.ndarray:
    """(C, H, W) patch features -> (H, W, 3) image in [0, 1]: the tokens projected on the top-3 principal axes of
    the array's patch tokens (`feature_stats(..., pca=3)` or more), each scaled to its [robust, 100 - robust]
    percentiles within the image. Tokens of similar content get similar colours (the DINOv2 paper's picture)."""
    if "pca" not in stats or len(stats["pca"]["components"]) < 3:
        raise BadArgumentError("pca_rgb needs statistics with at least 3 principal components: feature_stats(..., pca=3)")
    x = np.asarray(features, dtype=np.float64)
    C, H, W = x.shape
    proj = (x.reshape(C, H * W).T - stats["patch"]["mean"]) @ np.asarray(stats["pca"]["components"][:3]).T
    lo, hi = np.percentile(proj, [robust, 100.0 - robust], axis=0)
    rgb = (proj - lo) / np.where(hi > lo, hi - lo, 1.0)
    return np.clip(rgb, 0.0, 1.0).reshape(H, W, 3)


def plot_token_maps(image, features, stats: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """One row: the stimulus (a file name or an (h, w[, 3]) array), the token-norm map and the PCA-to-RGB image of
    its patch tokens (`features`: the (C, H, W) `FeatureDataset` item of that stimulus). Returns the file written."""
    path = require_plotting(path)
    return _save_figure(token_maps_figure(image, features, stats, title), path)


def token_maps_figure(image, features, stats: dict[str, Any], title: str | None = None):
    """The matplotlib Figure that `plot_token_maps` writes."""
    require_plotting()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as im:
            image = np.asarray(im.convert("RGB"))
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    if title:  # bold and apart, so that it does not read as the first line of the middle panel's title
        fig.suptitle(title, fontweight="bold")
        fig.get_layout_engine().set(h_pad=0.15)
    axes[0].imshow(np.asarray(image))
    axes[0].set(title="stimulus")
    norms = token_norm_map(features)
    im = axes[1].imshow(norms, cmap="viridis")
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    axes[1].set(title=f"token L2 norm ({norms.shape[0]}x{norms.shape[1]} patches)")
    axes[2].imshow(pca_rgb(features, stats), interpolation="nearest")
    axes[2].set(title="patch tokens: top-3 PCA as RGB")
    for ax in axes:
        ax.set(xticks=[], yticks=[])
    return fig
