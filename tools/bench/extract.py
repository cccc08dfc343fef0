"""extract: a full `extract` (tiny backbone) vs its forward pass alone over the same images."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from .common import BATCH, child, early, ensure_subject, log, row, warm


def child_extract(a: dict) -> dict:
    """Forward only over preloaded tensors (torch's default threads, and 1 thread), then the full extract."""
    import torch
    from PIL import Image

    from featstore import get_backbone
    from featstore.extraction import extract
    from featstore.layout import read_subject

    bb = get_backbone("dinov2_q", arch="tiny", weights="random", seed=0)
    paths = read_subject(Path(a["subj"])).images["train"]
    xs = []
    for p in paths:
        with Image.open(p) as im:
            xs.append(bb.preprocess(im))
    batches = [torch.stack(xs[i : i + a["batch"]]) for i in range(0, len(xs), a["batch"])]
    default_threads = torch.get_num_threads()
    out = {"forward": {}}
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            bb(batches[0])  # warm-up
            t0 = time.perf_counter()
            for x in batches:
                bb(x)
            out["forward"][threads] = time.perf_counter() - t0
    torch.set_num_threads(default_threads)
    t0 = time.perf_counter()
    res = extract(a["subj"], a["store"], backbone=bb, device="cpu", batch_size=a["batch"],
                  num_workers=a["workers"], progress=False)
    out["seconds"] = time.perf_counter() - t0
    out["computed"] = sum(x.computed for x in res.splits)
    return out


CHILDREN = {"extract": child_extract}


def rows_extract(ctx) -> list[dict]:
    subj = ensure_subject(ctx)
    n = ctx.images
    warm(sorted((subj / "training_split" / "training_images").iterdir()))
    fwd: dict[int, float] = {}
    ext = np.inf
    store = ctx.dir / "extract.zarr"
    reps = min(ctx.reps, 2)  # each rep is a fresh interpreter (torch + timm imports)
    for r in range(reps):
        res = early(ctx, "extract") if r == 0 else None
        if res is None:
            log(f"extract: forward only, then a full extract with the defaults, {n} images (rep {r + 1}/{reps})"
                f"{' in this process (--quick)' if ctx.quick else ''}")
            shutil.rmtree(store, ignore_errors=True)
            args = {"subj": str(subj), "store": str(store), "batch": BATCH, "workers": 2}
            # --quick: in this process; it measures nothing that needs a fresh one, and a start costs more than the row
            res = child_extract(args) if ctx.quick else child("extract", args)
        assert res["computed"] == n, res
        for k, v in res["forward"].items():
            fwd[int(k)] = min(fwd.get(int(k), np.inf), v)
        ext = min(ext, res["seconds"])
    shutil.rmtree(store, ignore_errors=True)
    ctx.extract_s = ext
    f = min(fwd.values())
    ratio = ext / f
    per = ", ".join(f"{k} thread{'s' if k > 1 else ''} {v:.2f} s" for k, v in sorted(fwd.items()))
    return [row("extract", ratio, "<= 1.1x forward-only time", ("<=", 1.1), f"{ext:.2f} s ({n / ext:.0f} img/s)",
                f"forward {f:.2f} s ({n / f:.0f} img/s)",
                f"{n} images 425 px -> 434 px, dinov2_q tiny random weights, batch {BATCH}, CPU; extract() with its "
                f"defaults (DataLoader 2 workers, torch's default threads, float16, fsync) in-process after imports; "
                f"forward-only over preloaded tensors, the faster thread count ({per})", featstore_s=ext, baseline_s=f)]
