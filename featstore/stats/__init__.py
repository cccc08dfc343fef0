"""Feature statistics out of core: per-block kernels (kernels.py), the dask pass and its merge (reduce.py), saving
next to the array (persist.py), tables and figures (report.py). Loaded on first use: the tables need no dask."""
from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {
    "feature_stats": "reduce",
    "histogram_from_f16_counts": "reduce",
    "load_feature_stats": "persist",
    **dict.fromkeys(("format_stats", "plot_stats", "plot_token_maps", "pca_rgb", "token_norm_map",
                     "constant_channels"), "report"),
}

__all__ = [*sorted(_LAZY)]  # noqa: PLE0604


__getattr__ = lazy_getattr(__name__, _LAZY)
