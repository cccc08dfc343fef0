"""SweepConfig: everything a layer sweep is configured by (the `featstore sweep` flags), importable without dask
or himalaya, so the command line builds its parser from it cheaply."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import BadArgumentError
from ..flags import flag
from ..layout import normalize_subj
from . import ridge


@dataclass
class SweepConfig:
    """Everything a sweep is configured by (the CLI flags, in Python)."""

    features: str | list[str] | None = flag(
        None, "features to sweep, names or patterns such as 'dinov2_q_layer*' (default: every feature whose train "
        "array of the subject is complete)", metavar="F1,F2,...")
    subj: str | None = flag(None, "subject id (default: from the --data_dir folder name, subjXX)")
    dims: int = flag(1024, "projected dimensions per layer", metavar="K")
    seed: int = flag(0, "seed of the random projection")
    backend: str = flag("numpy", "himalaya backend of the ridge fits", choices=ridge.BACKENDS)
    dtype: str = flag("float32", "precision of the fits", choices=("float32", "float64"))
    alphas: tuple[float, ...] = ridge.ALPHAS
    cv: int = 5
    val_fraction: float = 0.1
    cache: bool = flag(True, "do not store the projections in the store (needed for a read-only store)",
                       flag="no_cache", negate=True)
    plots: bool = flag(True, "skip the figures", flag="no_plots", negate=True)
    progress: bool = False
    task_mb: float = 100.0
    storage_options: dict[str, Any] | None = None

    def validate(self) -> SweepConfig:
        for name in ("dims", "task_mb"):
            if not getattr(self, name) > 0:
                raise BadArgumentError(f"--{name} {getattr(self, name)}: must be positive")
        if int(self.seed) < 0:
            raise BadArgumentError(f"{self.seed}: must be >= 0", param="seed")
        if self.backend not in ridge.BACKENDS:
            raise BadArgumentError(f"{self.backend!r}: choose one of {', '.join(ridge.BACKENDS)}", param="backend")
        if self.dtype not in ("float32", "float64"):
            raise BadArgumentError(f"{self.dtype!r}: choose float32 or float64", param="dtype")
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
