"""Presenting `feature_stats` results: a short terminal table and one matplotlib figure (imported lazily)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadArgumentError


# ---- presentation ---------------------------------------------------------------------------------------------------
def _g(v: float) -> str:
    return f"{v:.4g}"


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

    def top(c):
        score = np.abs(c["mean"]) / np.where(c["std"] > 0, c["std"], np.inf)
        return ", ".join(f"{i}:{score[i]:.2g}" for i in np.argsort(-score)[:5])

    rows.append(("top-5 |mean|/std (ch:val)", *[top(c) for c in cols]))
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines += ["  " + "  ".join(s.ljust(w[i]) for i, s in enumerate(row)).rstrip() for row in rows]
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


def require_plotting() -> None:
    """BadArgumentError unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadArgumentError("--plot needs matplotlib, which is not installed: pip install 'featstore[plot]'") from None


def plot_stats(r: dict[str, Any], path: str | Path) -> Path:
    """One figure: channel means/stds, the token-norm map, the histogram, and the PCA spectrum when computed.
    Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend switch."""
    require_plotting()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(12, 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    fig.suptitle(f"{r['array']}  {'x'.join(map(str, r['shape']))} {r['dtype']}")

    ax = axes[0]
    ch = np.arange(len(r["patch"]["mean"]))
    order = np.argsort(r["patch"]["mean"])
    for part, color in (("patch", "C0"), ("cls", "C1")):
        m, s = r[part]["mean"][order], r[part]["std"][order]
        ax.plot(ch, m, color=color, lw=1, label=f"{part} mean")
        ax.fill_between(ch, m - s, m + s, color=color, alpha=0.25, lw=0, label=f"{part} +-std")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
