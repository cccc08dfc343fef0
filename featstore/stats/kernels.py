"""The per-block reductions that dask runs on its workers, shipped by value (see `kernels`).

Float16 blocks take torch's vectorised float16 -> float32 -> float64 conversions (F16C; numpy converts float16
element by element, several times slower) and numpy's float64 reductions on cache-sized slices; the histogram is
torch's bincount of the raw 16-bit patterns. Float32 blocks, blocks holding inf/nan, and processes that have not
loaded torch (dask workers: see `tm`) take the numpy path (numpy's own conversion, same float64 sums).
"""
from __future__ import annotations

import functools

SLICE_VALUES = 32768  # values per float64 working slice: 256 kB stays in L2, and torch runs its conversions in the
# calling thread (its intra-op grain), so dask's threads are not oversubscribed
HIST_VALUES = 1 << 18  # 16-bit patterns per bincount call


@functools.cache
def kernels():
    """The functions dask runs per block. They are closures, so (cloud)pickle ships them by value: a worker
    process never imports featstore (or what featstore imports) just to run them. numpy; torch where loaded."""
    import sys

    import numpy as np

    def tm():
        """torch where this process has loaded it, else None (numpy path): a dask worker is not made to import it
        (hundreds of MB, more than a memory-limited worker may hold). feature_stats loads it for its local pass."""
        return sys.modules.get("torch")

    def token_slices(T, cls_index, S):
        """(start, stop) of the patch tokens in runs of at most S tokens, the CLS token left out."""
        return [(t, min(t + S, stop)) for start, stop in ((0, cls_index), (cls_index + 1, T)) for t in range(start, stop, S)]

    def counts(block, start, every):
        """65536 counts of the float16 bit patterns of images start, start+1, ... whose index is a multiple of
        `every` (float32 values rounded to float16 first; beyond its range they count as +-inf)."""
        hist = np.zeros(65536, np.int64)
        for i in range(-start % every, len(block), every):
            if block.dtype == np.float16:
                codes = block[i].reshape(-1).view(np.int16)
            else:
                with np.errstate(over="ignore"):
                    codes = block[i].astype(np.float16).reshape(-1).view(np.int16)
            for a in range(0, codes.size, HIST_VALUES):
                hist += bincount(codes[a : a + HIST_VALUES])
        return hist

    def bincount(codes):
        """np.bincount of int16 `codes` read as uint16, 65536 bins; torch's is ~1.5x faster."""
        if tm() is None:
            return np.bincount(codes.view(np.uint16), minlength=65536)
        wide = codes.view(np.uint16).astype(np.int32)  # numpy's cast: torch's would start its own threads
        return tm().bincount(tm().from_numpy(wide), minlength=65536).numpy()

    def buffers(S, C, n_rows, fast):
        """Working slices (float64; with torch float32 and float64 tensors whose numpy views they are) and
        per-slice result rows."""
        bufs = {"d": np.empty((S, C)), "q": np.empty((S, C)), "rows": np.empty((4, n_rows, C))}  # rows: per
        # slice, min, max, sum, sum of squares
        if not fast:
            return bufs | {"x": np.empty((S, C))}
        torch = tm()
        t32, t64 = torch.empty((S, C)), torch.empty((S, C), dtype=torch.float64)
        return bufs | {"t32": t32, "t64": t64, "x": t64.numpy(), "ends": torch.empty((2, n_rows, C))}

    def slice_f64(b, src, k, j):
        """float16 tokens `src` (a torch view) -> b["x"][:k] float64, through float32 (both exact); their
        min and max (on the float32 copy: half the bytes) into row j."""
        x32 = b["t32"][:k]
        x32.copy_(src)
        tm().amin(x32, 0, out=b["ends"][0, j])
        tm().amax(x32, 0, out=b["ends"][1, j])
        b["t64"][:k].copy_(x32)
        return b["x"][:k]

    def slice_numpy(b, src, k, j):
        x = b["x"][:k]
        np.copyto(x, src)
        np.minimum.reduce(x, axis=0, out=b["rows"][0, j])
        np.maximum.reduce(x, axis=0, out=b["rows"][1, j])
        return x

    def reduce_slice(b, x, shift, j, nrm):
        """One slice's shifted sum and sum of squares into row j; each token's |x|^2 into `nrm`."""
        k = len(x)
        rows, d, q = b["rows"], b["d"][:k], b["q"][:k]
        np.subtract(x, shift, out=d)
        np.add.reduce(d, axis=0, out=rows[2, j])
        np.multiply(d, d, out=q)
        np.add.reduce(q, axis=0, out=rows[3, j])
        np.multiply(x, x, out=q)
        np.add.reduce(q, axis=1, out=nrm)

    def patch_pass(block, cls_index, shift, fast):
        """Patch-token partials of one block: min, max, sum and sum of squares of x - shift, and each token's |x|^2.
        `fast`: torch's float16 conversion; otherwise numpy's (float32 stores, inf/nan)."""
        n, T, C = block.shape
        S = max(1, SLICE_VALUES // C)
        slices = token_slices(T, cls_index, S)
        b = buffers(S, C, n * len(slices), fast)
        norms = np.empty((n, T))
        to_f64 = slice_f64 if fast else slice_numpy
        for i in range(n):
            src = tm().from_numpy(block[i]) if fast else block[i]
            for j, (t0, t1) in enumerate(slices, start=i * len(slices)):
                x = to_f64(b, src[t0:t1], t1 - t0, j)
                reduce_slice(b, x, shift, j, norms[i, t0:t1])
        rows = b["rows"]
        if fast:
            np.copyto(rows[:2], b["ends"].numpy())
        return rows[0].min(axis=0), rows[1].max(axis=0), rows[2].sum(axis=0), rows[3].sum(axis=0), norms

    def patch_partials(block, cls_index, shift):
        """patch_pass on the fast path where it is exact: a float16 block without inf/nan, torch present."""
        fast = tm() is not None and block.dtype == np.float16 and block.flags.writeable
        if fast:
            lo, hi, s1, s2, norms = patch_pass(block, cls_index, shift, fast=True)
            if np.isfinite(lo).all() and np.isfinite(hi).all():
                return {"n": block.shape[0] * (block.shape[1] - 1), "sum": s1, "sumsq": s2, "min": lo, "max": hi}, norms
        with np.errstate(invalid="ignore", over="ignore"):  # inf/nan propagate into the statistics, as in numpy
            lo, hi, s1, s2, norms = patch_pass(block, cls_index, shift, fast=False)
        return {"n": block.shape[0] * (block.shape[1] - 1), "sum": s1, "sumsq": s2, "min": lo, "max": hi}, norms

    def cls_partials(block, cls_index, shift, norms):
        """The CLS token's partials; its |x|^2 into norms[:, cls_index]."""
        xc = block[:, cls_index, :].astype(np.float64)
        norms[:, cls_index] = np.einsum("nc,nc->n", xc, xc)
        c = {"n": len(xc), "min": xc.min(axis=0), "max": xc.max(axis=0)}
        xc -= shift
        c["sum"], c["sumsq"] = xc.sum(axis=0), np.einsum("nc,nc->c", xc, xc)
        return c

    def block_stats(block, start, cls_index, shift_patch, shift_cls, hist_every):
        """One (n, T, C) block (images start, start+1, ...) -> (partial sums, (n, T) token norms)."""
        block = np.asarray(block)
        p, norms = patch_partials(block, cls_index, shift_patch)
        c = cls_partials(block, cls_index, shift_cls, norms)
        np.sqrt(np.maximum(norms, 0.0, out=norms), out=norms)
        return {"patch": p, "cls": c, "hist": counts(block, start, hist_every)}, norms

    def merge(*parts):
        out = {"hist": sum(q["hist"] for q in parts)}
        for part in ("patch", "cls"):
            accs = [q[part] for q in parts]
            out[part] = {
                "n": sum(a["n"] for a in accs),
                "sum": sum(a["sum"] for a in accs),
                "sumsq": sum(a["sumsq"] for a in accs),
                "min": np.minimum.reduce([a["min"] for a in accs]),
                "max": np.maximum.reduce([a["max"] for a in accs]),
            }
        return out

    def centre(block, mean):
        """(rows, C) block -> float64 block minus the channel means (for the PCA)."""
        out = np.empty(block.shape)
        if tm() is not None and block.dtype == np.float16 and block.flags.writeable:
            tm().from_numpy(out).copy_(tm().from_numpy(block).float())
        else:
            np.copyto(out, block)
        out -= mean
        return out

    return block_stats, merge, centre
