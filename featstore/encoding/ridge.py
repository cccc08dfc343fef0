"""The fits of the encoding sweep: himalaya's multi-target RidgeCV on a projected layer, scored by Pearson r per
vertex. himalaya is imported only here.

Regression: the projected columns are z-scored with the training part's mean and std, then himalaya's RidgeCV
   (fit_intercept, 5-fold unshuffled KFold on the training part, alphas 10^-1 .. 10^8, the best alpha chosen per
   vertex) is fitted to all vertices of both hemispheres at once; the score is the Pearson r per vertex on the
   validation part of the legacy 90/10 split (seed 5). himalaya's numpy backend by default (float32); `backend`
   "torch" or "torch_cuda" for its torch backends, `dtype="float64"` for exact comparisons.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..errors import BadArgumentError, one_line

ALPHAS = tuple(10.0 ** np.arange(-1, 9))
BACKENDS = ("numpy", "torch", "torch_cuda")
TARGETS_BATCH = 4096  # vertices per himalaya batch: bounds its (alphas, val images, vertices) predictions
INSTALL_HINT = "featstore sweep needs himalaya, which is not installed: pip install 'featstore[sweep]'"


def require_himalaya():
    try:
        import himalaya  # noqa: F401
    except ImportError:
        raise BadArgumentError(INSTALL_HINT) from None


@contextlib.contextmanager
def backend(name: str):
    """himalaya's backend for the duration (its choice is process-wide, so the previous one is restored)."""
    from himalaya.backend import get_backend, set_backend

    previous = get_backend()
    try:
        module = set_backend(name, on_error="raise")
        if name == "torch_cuda":
            module.zeros(1)  # fails here, in one line, when CUDA is absent
    except Exception as e:  # noqa: BLE001 - missing torch, no CUDA
        set_backend(previous)
        raise BadArgumentError(f"{name}: not available here ({one_line(e)})", param="backend") from None
    try:
        yield module
    finally:
        set_backend(previous)


def fit_and_score(X: np.ndarray, Y: np.ndarray, train: np.ndarray, val: np.ndarray, backend, *,
                  alphas: tuple[float, ...] = ALPHAS, cv: int = 5, dtype: str = "float32"):
    """z-score X with the training rows' statistics, RidgeCV on the training rows, Pearson r per target on the
    validation rows. Returns (r (targets,), alpha chosen per target)."""
    import warnings

    from himalaya.ridge import RidgeCV

    from .metrics import pearson_r

    dt = np.dtype(dtype)
    mean = X[train].mean(axis=0, dtype=np.float64)
    std = X[train].std(axis=0, dtype=np.float64)
    Xs = ((X - mean) / np.where(std > 0, std, 1.0)).astype(dt)
    model = RidgeCV(alphas=np.asarray(alphas, dt), cv=cv, fit_intercept=True,
                    solver_params={"n_targets_batch": TARGETS_BATCH, "warn": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # himalaya: "n_samples < n_features" on tiny subjects
        model.fit(Xs[train], Y[train].astype(dt, copy=False))
        pred = backend.to_numpy(model.predict(Xs[val]))
    chosen = np.log(np.asarray(backend.to_numpy(model.best_alphas_), dtype=np.float64))
    grid = np.asarray(alphas, dtype=np.float64)  # the grid's own values, not their float32 round trip
    return pearson_r(pred, Y[val]), grid[np.abs(chosen[:, None] - np.log(grid)[None, :]).argmin(axis=1)]
