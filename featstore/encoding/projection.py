"""The streamed, seeded projection of a stored layer, cached in the store (the first half of the encoding sweep).

Per feature (an array `{feature}/{subj}/train` of the store):

Projection, streamed: every image's (T, C) tokens, flattened, are projected to `dims` numbers (default 1,024) by a
   seeded sparse random projection, a *count sketch* (feature hashing): token t adds its C channels, each with a
   random sign, to the `dims` outputs starting at a random offset o_t (cyclically):
   ``y[(o_t + c) % dims] += s_tc * x_tc``. As a matrix R (T*C, dims) it has exactly one +-1 per row, so
   E[R R^T] = I and inner products between images are kept in expectation, as with a Gaussian projection; the
   sparse random projections of Li et al. (2006), which layer-wise encoding sweeps of the field use on flattened
   features, have ~1 non-zero per row at this width too. Flattened tokens rather than a pooled grid: pooling would
   throw away exactly the fine retinotopy that separates V1 from the category areas. The offsets and signs of
   tokens [16b, 16b + 16) come from ``np.random.default_rng([seed, b])``, so R is never materialised (its state is
   T offsets and T*C sign bits) and the projection of an image does not depend on which other images share its task.
   The kernel only adds (float32, tokens in order), so every row is bit-identical whatever the chunk size, --pack,
   task size or --workers; it runs on dask blocks of whole storage units (~100 MB), like `featstore stats`.
   Memory: a task's block plus (images, dims) floats, and the (N, dims) result.
Cache: the (N, dims) float32 result is stored in the store at `_sweep/{feature}/{subj}/train/k{dims}_seed{seed}`
   with the method, dims, seed and the source array's uid, shape and dtype as attributes; a rerun (or a run after an
   interruption) reuses every projection whose attributes match and computes only the rest.
"""
from __future__ import annotations

import functools
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _dask
from ..errors import BadArgumentError

if TYPE_CHECKING:
    from ..storage import FeatureArray

METHOD = "count-sketch-v1"  # changes whenever the projection's numbers would change
TOKEN_BLOCK = 16  # tokens per generator: offsets and signs of tokens [16b, 16b + 16) come from default_rng([seed, b])
CACHE_GROUP = "_sweep"


@functools.cache
def _kernel():
    """The per-block projection as a closure, so cloudpickle ships it by value: workers need numpy, not featstore."""
    import numpy as np

    keep = np.int32(np.uint32(0x8FFF_FFFF).view(np.int32))  # sign bit + the 28 bits below the 3 sign copies
    rescale = np.float32(2.0**112)
    flip = np.int32(np.iinfo(np.int32).min)

    def hashes(seed, b, dims, C, token_block):
        """Offsets (token_block,) and sign-bit masks (token_block, C) of tokens [b*token_block, (b+1)*token_block)."""
        rng = np.random.default_rng([seed, b])
        return rng.integers(0, dims, size=token_block), rng.integers(0, 2, size=(token_block, C), dtype=np.int32) * flip

    def project(block, seed, dims, token_block):
        """(n, T, C) float16/float32 -> (n, dims) float32. (float16 inf/NaN, which extraction never stores, would come
        out finite.)"""
        x = np.asarray(block)
        n, T, C = x.shape
        y = np.zeros((n, dims + C), np.float32)  # outputs dims.. are folded back at the end (the cyclic wrap)
        buf = np.empty((n, min(token_block, T), C), np.float32)
        bits = buf.view(np.int32)
        for b, t0 in enumerate(range(0, T, token_block)):
            k = min(T, t0 + token_block) - t0
            offsets, signs = hashes(seed, b, dims, C, token_block)
            v, i = buf[:, :k], bits[:, :k]
            if x.dtype == np.float16:  # exact: float16 bits moved into float32's fields (numpy's cast is 4x slower)
                np.copyto(i, x[:, t0 : t0 + k].view(np.int16))
                np.left_shift(i, 13, out=i)
                np.bitwise_and(i, keep, out=i)
                np.multiply(v, rescale, out=v)
            else:
                np.copyto(v, x[:, t0 : t0 + k], casting="same_kind")
            np.bitwise_xor(i, signs[:k], out=i)  # the random signs, as sign-bit flips
            for j in range(k):
                o = int(offsets[j])
                dst = y[:, o : o + C]
                np.add(dst, v[:, j], out=dst)
        for w0 in range(dims, dims + C, dims):
            w = min(dims, dims + C - w0)
            y[:, :w] += y[:, w0 : w0 + w]
        return np.ascontiguousarray(y[:, :dims])

    return project


def project_tokens(x: np.ndarray, dims: int = 1024, seed: int = 0) -> np.ndarray:
    """The sweep's projection of in-memory features: (n, T, C) -> (n, dims) float32, the rows the sweep caches."""
    x = np.asarray(x)
    if x.ndim != 3 or x.dtype not in (np.float16, np.float32):
        raise BadArgumentError(f"project_tokens needs (images, tokens, channels) float16/float32, got {x.dtype} {x.shape}")
    return _kernel()(x, int(seed), int(dims), TOKEN_BLOCK)


def fingerprint(fa: FeatureArray, dims: int, seed: int) -> dict[str, Any]:
    return {"kind": "featstore.sweep.projection", "method": METHOD, "dims": dims, "seed": seed,
            "token_block": TOKEN_BLOCK, "source": fa.path, "source_uid": fa.uid or fa.fingerprint,
            "source_shape": list(fa.shape), "source_dtype": str(fa.dtype)}


def cache_key(fa: FeatureArray, dims: int, seed: int) -> str:
    return f"{CACHE_GROUP}/{fa.path}/k{dims}_seed{seed}"


def project_array(fa: FeatureArray, dims: int, seed: int, task_mb: float, client, bar) -> np.ndarray:
    """One read of the array in chunk order, as dask tasks of whole storage units; the rows in order."""
    import dask

    x = _dask.blocks_of(fa, _dask.task_rows(fa, fa.dtype.itemsize, task_mb))
    prefix = f"featstore-sweep-{uuid.uuid4().hex[:8]}-"
    project = _kernel()
    parts = [dask.delayed(project, pure=False)(b, seed, dims, TOKEN_BLOCK, dask_key_name=f"{prefix}{i}")
             for i, b in enumerate(x.to_delayed().ravel())]
    with _dask.corrupt_chunks_named(fa):
        blocks = _dask.compute(parts, client, bar, prefix)
    return np.concatenate(blocks, axis=0)


def n_tasks(fa: FeatureArray, task_mb: float) -> int:
    return -(-fa.shape[0] // _dask.task_rows(fa, fa.dtype.itemsize, task_mb))
