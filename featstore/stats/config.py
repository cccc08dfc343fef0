"""StatsConfig: what `featstore stats` computes and keeps (its flags), importable without dask."""
from __future__ import annotations

from dataclasses import dataclass

from ..flags import flag

OUTLIER_Z = 6.0
PCA_POWER_ITER = 2


@dataclass(frozen=True)
class StatsConfig:
    """What `featstore stats` computes and keeps; fields made with flag() are its flags."""

    pca: int = flag(0, "also the top-K principal components of the patch tokens (0: none)", metavar="K")
    save: bool = flag(True, "only print the statistics; do not save them into the store (needed for a read-only "
                      "store)", flag="no_save", negate=True)
    progress: bool = False
    task_mb: float | None = None  # decoded MB per dask task (None: the config's stats.task_mb)
    outlier_z: float = OUTLIER_Z
    pca_power_iter: int = PCA_POWER_ITER
    hist_every: int | None = None  # count every k-th image in the histogram (None: all of 256 or fewer)
