"""What the row groups share: the synthetic ViT-B-sized stream, the store writer driven through extraction's own
write path, row judging, fresh-interpreter children, and the inputs several groups reuse (images, the read store)."""
from __future__ import annotations

import json
import math
import operator
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

FEATURE, SUBJ, SPLIT = "bench_vit", "01", "train"
T, C, GRID = 962, 768, (31, 31)  # DINOv2 ViT-B/14 at 434 px: CLS + 31 x 31 patches, 768 channels
BATCH = 16  # the CLI's default --batch_size
POOL = 32  # distinct synthetic samples; the stream cycles through them (each chunk is compressed on its own)
RUNNER = Path(__file__).resolve().parents[1] / "benchmark.py"  # children are fresh interpreters of the runner


def log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- synthetic ViT-like activations -----------------------------------------------------------------------------
def make_pool(p: int = POOL, seed: int = 0) -> np.ndarray:
    """(p, T, C) float32 with the statistics that matter for storage: per-channel scales drawn log-normally, per-channel
    offsets, three "massive activation" channels (offsets of +-50..150), Student-t (df 5) noise, and a few
    high-norm artefact tokens per sample. Values stay well inside the float16 range, as DINOv2's do."""
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0.0, 0.8, size=C).astype(np.float32)
    offset = (rng.standard_normal(C) * 0.5 * scale).astype(np.float32)
    massive = rng.choice(C, 3, replace=False)
    offset[massive] = rng.choice([-1.0, 1.0], 3) * rng.uniform(50, 150, 3)
    out = np.empty((p, T, C), np.float32)
    df = np.float32(5.0)
    for i in range(p):
        z = rng.standard_normal((T, C), dtype=np.float32)
        g = rng.standard_gamma(df / 2, size=(T, C), dtype=np.float32)  # chi2(df) / 2
        x = z * np.sqrt(df / (2 * g))  # Student-t(df)
        x *= scale
        x += offset
        x[rng.choice(np.arange(1, T), 4, replace=False)] *= 4  # artefact tokens
        out[i] = x
    return out


def stream(pool: np.ndarray, n: int, batch: int = BATCH):
    """Batches of float32 rows, as a backbone would hand them over: views of the pool, no generation cost."""
    p = len(pool)
    for a in range(0, n, batch):
        b = min(a + batch, n)
        s = a % p
        yield a, (pool[s : s + (b - a)] if s + (b - a) <= p else np.take(pool, range(a, b), axis=0, mode="wrap"))


def meta(n: int, grid: tuple[int, int] = GRID) -> dict[str, Any]:
    return {"token_layout": {"cls_index": 0, "grid": list(grid), "n_tokens": 1 + grid[0] * grid[1]},
            "image_names": [f"img{i:05d}.png" for i in range(n)]}


def featstore_write(root: Path, pool: np.ndarray, n: int, dtype: str = "float16", durable: bool = True,
                    grid: tuple[int, int] = GRID, arrays: int = 1) -> tuple[float, int]:
    """The stream written by extraction's own write path (featstore.extraction.run.write_batches: `.to(dtype)`,
    float16 check, unit assembly, background writer), as extract does after the forward pass, with its default
    queue bound; into `arrays` arrays at once (each batch feeds every array, as one forward pass feeds every layer).
    `pool` is (P, 1 + H*W, C) for a token grid of H x W. Returns (seconds, bytes of the arrays on disk)."""
    import torch

    from featstore.extraction import ExtractConfig
    from featstore.extraction.run import write_batches
    from featstore.storage import ArraySpec, FeatureStore

    fs = FeatureStore(root, mode="a")
    spec = ArraySpec((n, *pool.shape[1:]), 1, dtype)
    fas = [fs.prepare(FEATURE if arrays == 1 else f"{FEATURE}_{j}", SUBJ, SPLIT, spec, meta=meta(n, grid),
                      fingerprint={})[0] for j in range(arrays)]
    cfg = ExtractConfig(dtype=dtype, durable=durable)
    t0 = time.perf_counter()
    batches = ((np.arange(a, a + len(rows)), dict.fromkeys((fa.feature for fa in fas), torch.from_numpy(rows)))
               for a, rows in stream(pool, n))
    write_batches(fas, {fa.path: list(range(fa.nchunks)) for fa in fas}, batches, cfg)
    seconds = time.perf_counter() - t0
    return seconds, sum(fa.nbytes_stored() for fa in fas)


def npy_save(path: Path, full: np.ndarray) -> tuple[float, int]:
    t0 = time.perf_counter()
    np.save(path, full)
    seconds = time.perf_counter() - t0
    return seconds, path.stat().st_size


def fsync_file(path: Path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def warm(paths) -> None:
    """Read files once so that the timed reads find them in the page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def gbs(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


# ---- rows and their judging ---------------------------------------------------------------------------------------
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt}


def judge(value: float | None, op: str, bound: float) -> bool:
    """Whether a measured value meets a bound; nothing measured (None, NaN) never does."""
    return value is not None and not math.isnan(value) and bool(OPS[op](value, bound))


def row(name: str, ratio: float | None, target: str, check: tuple[str, float], featstore: str, baseline: str,
        notes: str = "", *, on: float | None = None, also: dict[str, bool] | None = None, counted: bool = True,
        **extra) -> dict[str, Any]:
    """One row. `check` = (op, bound), read on `on` (default: the ratio); `also`: further conditions the row needs
    (e.g. an identical store). meets = the bound holds and every condition is true. The JSON keeps op, bound, judged
    (the value read) and also, so that a reader can judge the row again. counted=False: information, judged and
    shown but not a target of the benchmark (the table says "info")."""
    op, bound = check
    judged = ratio if on is None else on
    conds = {k: bool(v) for k, v in (also or {}).items()}
    return {"name": name, "ratio": None if ratio is None else float(ratio), "target": target,
            "meets": judge(judged, op, bound) and all(conds.values()), "featstore": featstore, "baseline": baseline,
            "notes": notes, "op": op, "bound": float(bound), "judged": None if judged is None else float(judged),
            "also": conds, "counted": bool(counted), **extra}


def rebound(r: dict[str, Any], bound: float) -> dict[str, Any]:
    """The row judged against another bound (the runner's hidden --bound, to see a row fail)."""
    if r.get("op") is None:
        return r
    return {**r, "bound": float(bound), "target": f"{r['op']} {bound:g} (bound overridden; was: {r['target']})",
            "meets": judge(r["judged"], r["op"], bound) and all(r["also"].values())}


def not_measured(name: str, target: str, featstore: str, notes: str, *, counted: bool = True) -> dict[str, Any]:
    """A row without a measurement (failed, unavailable): it never meets its target."""
    return {"name": name, "ratio": None, "target": target, "meets": False, "featstore": featstore, "baseline": "-",
            "notes": notes, "op": None, "bound": None, "judged": None, "also": {}, "counted": bool(counted)}


def unavailable(name: str, target: str, reason: str) -> dict[str, Any]:
    return not_measured(name, target, f"unavailable ({reason})", f"unavailable ({reason})")


# ---- fresh interpreters -----------------------------------------------------------------------------------------
def child(mode: str, args: dict) -> dict:
    """Run `mode` in a fresh interpreter (the runner with --child) and return the JSON it prints last."""
    cmd = [sys.executable, str(RUNNER), "--child", mode, json.dumps(args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.get("timeout", 1800))
    if r.returncode != 0:
        raise RuntimeError(f"child {mode} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:] or r.stdout}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def early(ctx, key: str) -> dict | None:
    """The result of a child started early (see layers.start_early), or None (then the caller runs it now)."""
    fut = getattr(ctx, "early", {}).pop(key, None)
    return None if fut is None else fut.result()


def peak_rss_mb() -> float:
    """Peak RSS of this process image. VmHWM, not getrusage: Linux carries ru_maxrss over fork + exec, so a child
    would report the benchmark's own peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)


def extract_opts(a: dict) -> dict:
    """extract() as `featstore extract` runs it (2 loader workers, float16, fsync, default codec), on the CPU."""
    return {"device": "cpu", "batch_size": a.get("batch", BATCH), "num_workers": a.get("workers", 2),
            "progress": False}


# ---- inputs shared by several groups ------------------------------------------------------------------------------
def ensure_subject(ctx) -> Path:
    subj = ctx.dir / "images" / f"subj{SUBJ}"
    if not subj.exists():
        from featstore.sample import make_sample_subject

        log(f"extract/resume: writing {ctx.images} synthetic 425 px images")
        make_sample_subject(ctx.dir / "images", subj=SUBJ, n_train=ctx.images, n_test=0, seed=0)
    return subj


def ensure_read_store(ctx) -> tuple[Path, Path]:
    """The float16 store of N samples and its legacy npy export (written once, shared by the read, stats and train
    rows)."""
    store, npy_dir = ctx.dir / "read.zarr", ctx.dir / "npy"
    if not store.exists():
        from featstore.export import export_npy

        log(f"read/stats: writing a {ctx.n}-sample float16 store and its npy export")
        featstore_write(store, ctx.pool, ctx.n, "float16", durable=False)
        export_npy(store, npy_dir, feature=FEATURE, subj=SUBJ, split=SPLIT, progress=False)
    return store, npy_dir / FEATURE / SUBJ / f"{SPLIT}.npy"
