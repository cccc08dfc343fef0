"""The per-block reductions that dask runs on its workers: numpy only, shipped by value (see `kernels`)."""
from __future__ import annotations

import functools

SLICE_TOKENS = 64  # tokens per float64 working slice inside a task: 64 x 768 x 8 B = 393 kB stays in L2


@functools.cache
def kernels():
    """The functions dask runs per block. They are closures, so (cloud)pickle ships them by value: a worker
    process never imports featstore (or what featstore imports) just to run them. They use numpy only."""
    import numpy as np

    # float16 -> float64 without numpy's half conversion (slow: it made up half of the kernel's time): sign-extend
    # the bits to int64, move the 15 exponent+mantissa bits to where float64 keeps its own, clear the copies of the
    # sign the extension left between them, and rescale by 2**(1023-15). Exact for every finite float16, subnormals
    # included; inf/nan come out as finite values >= 65536 (> float16 max), which the min/max check catches.
    keep = np.int64(0x81FF_FFFF_FFFF_FFFF - (1 << 64))  # sign bit 63 + bits 0..56
    rescale = np.float64(2.0**1008)

    def to_f64(a, out):
        """(k, C) float16 -> `out` (k, C) float64, exact for finite values."""
        bits = out.view(np.int64)
        np.copyto(bits, a.view(np.int16))
        np.left_shift(bits, 42, out=bits)
        np.bitwise_and(bits, keep, out=bits)
        np.multiply(out, rescale, out=out)
        return out

    def patch_pass(block, cls_index, shift, S, exact):
        """Patch-token partials of one block: min, max, sums and sums of squares of x - shift, and |x|^2.
        `exact` converts with numpy (slow, keeps inf/nan); otherwise to_f64."""
        n, T, C = block.shape
        slices = [(t, min(t + S, stop)) for start, stop in ((0, cls_index), (cls_index + 1, T)) for t in range(start, stop, S)]
        x_buf, q_buf = np.empty((S, C)), np.empty((S, C))
        ones_t, ones_c = np.ones(S), np.ones(C)
        rows = np.empty((4, len(slices), C))  # per slice of one image: min, max, sum, sum of squares
        per_image = np.empty((4, n, C))
        norms = np.empty((n, T))
        s2 = 2.0 * shift
        for i in range(n):
            sample = block[i]
            for j, (t0, t1) in enumerate(slices):
                k = t1 - t0
                x, q = x_buf[:k], q_buf[:k]  # cache-sized slices: everything below runs in L2
                if exact:
                    np.copyto(x, sample[t0:t1])
                else:
                    to_f64(sample[t0:t1], x)
                np.minimum.reduce(x, axis=0, out=rows[0, j])
                np.maximum.reduce(x, axis=0, out=rows[1, j])
                np.subtract(x, shift, out=x)
                np.multiply(x, x, out=q)
                np.matmul(ones_t[:k], x, out=rows[2, j])  # BLAS matrix-vector products: float64, faster than reduce
                np.matmul(ones_t[:k], q, out=rows[3, j])
                nrm = norms[i, t0:t1]
                np.matmul(q, ones_c, out=nrm)  # |x|^2 = |d|^2 + 2 d.s + |s|^2 with d = x - s (|s|^2 added below)
                nrm += x @ s2
            np.minimum.reduce(rows[0], axis=0, out=per_image[0, i])
            np.maximum.reduce(rows[1], axis=0, out=per_image[1, i])
            np.add.reduce(rows[2:], axis=1, out=per_image[2:, i])
        norms += shift @ shift
        return per_image[0].min(axis=0), per_image[1].max(axis=0), per_image[2].sum(axis=0), per_image[3].sum(axis=0), norms

    def block_stats(block, start, cls_index, shift_patch, shift_cls, slice_tokens, hist_every):
        """One (n, T, C) block (images start, start+1, ...) -> (partial sums, (n, T) token norms)."""
        block = np.asarray(block)
        n, T, _ = block.shape
        f16 = block.dtype == np.float16
        hist = np.zeros(65536, np.int64)
        for i in range(-start % hist_every, n, hist_every):  # images whose index is a multiple of hist_every
            if f16:
                codes = block[i].view(np.uint16)
            else:
                with np.errstate(over="ignore"):
                    codes = block[i].astype(np.float16).view(np.uint16)
            hist += np.bincount(codes.ravel(), minlength=65536)
        lo, hi, s1, s2, norms = patch_pass(block, cls_index, shift_patch, slice_tokens, exact=not f16)
        if f16 and (hi.max() >= 65536.0 or lo.min() <= -65536.0):  # inf/nan in the block: numpy's conversion
            with np.errstate(invalid="ignore", over="ignore"):  # they propagate into the statistics, as in numpy
                lo, hi, s1, s2, norms = patch_pass(block, cls_index, shift_patch, slice_tokens, exact=True)
        p = {"n": n * (T - 1), "sum": s1, "sumsq": s2, "min": lo, "max": hi}
        xc = block[:, cls_index, :].astype(np.float64)
        norms[:, cls_index] = np.einsum("nc,nc->n", xc, xc)
        np.sqrt(np.maximum(norms, 0.0, out=norms), out=norms)
        c = {"n": n, "min": xc.min(axis=0), "max": xc.max(axis=0)}
        xc -= shift_cls
        c["sum"], c["sumsq"] = xc.sum(axis=0), np.einsum("nc,nc->c", xc, xc)
        return {"patch": p, "cls": c, "hist": hist}, norms

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
        if block.dtype == np.float16 and np.isfinite(block).all():
            to_f64(block, out)
        else:
            np.copyto(out, block)
        out -= mean
        return out

    return block_stats, merge, centre
