"""extract (full-size DINOv2 ViT-B/14 on a few images) and extract-tiny (information: the tiny test model, where PNG
decoding on 2 cores costs as much as the forward pass): a full `extract` vs the backbone's forward pass alone over the
same preprocessed images, same batches, same threads."""
from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import numpy as np

from .common import BATCH, child, ensure_subject, log, row, warm

FULL_ARCH = "vit_base_patch14_dinov2.lvd142m"  # dinov2_q's default architecture (as tools/codec_table.py)
FULL_IMAGES, FULL_BATCH = 8, 4  # a forward pass of ViT-B/14 at 434 px takes seconds per image on 2 CPU cores


def child_extract(a: dict) -> dict:
    """Best of a["reps"] rounds, each: the forward pass alone over the images preprocessed by extraction's own
    dataset (ImageFiles + collate, decoded before the clock starts), then a full extract() into a new store.
    Random weights, on purpose: no download, and a forward pass costs the same whatever the weights."""
    import torch

    from featstore import get_backbone
    from featstore.extraction import extract
    from featstore.extraction.images import ImageFiles, check_splits, collate
    from featstore.layout import read_subject

    bb = get_backbone("dinov2_q", arch=a["arch"], weights="random", seed=0)
    paths = read_subject(Path(a["subj"])).images["train"]
    files = ImageFiles(paths, list(range(len(paths))), bb.preprocess,
                       check_splits({"train": paths}, bb.preprocess)["train"].input_hw)
    b = a["batch"]
    batches = [collate([files[i] for i in range(s, min(s + b, len(files)))])[1] for s in range(0, len(files), b)]
    with torch.inference_mode():
        bb.forward_features(batches[0][:1])  # first-call allocations, one image
    out = {"forward": np.inf, "seconds": np.inf, "threads": torch.get_num_threads(), "forward_cpu": np.inf,
           "cpu": np.inf}
    for _ in range(a["reps"]):
        t0, c0 = time.perf_counter(), cpu_seconds()
        with torch.inference_mode():  # as extraction's forward: one forward_features per batch
            for x in batches:
                bb.forward_features(x)
        out["forward"] = min(out["forward"], time.perf_counter() - t0)
        out["forward_cpu"] = min(out["forward_cpu"], cpu_seconds() - c0)
        shutil.rmtree(a["store"], ignore_errors=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        res = extract(a["subj"], a["store"], backbone=bb, device="cpu", batch_size=b, num_workers=a["workers"],
                      progress=False)
        out["seconds"] = min(out["seconds"], time.perf_counter() - t0)
        out["cpu"] = min(out["cpu"], cpu_seconds() - c0)
        out["computed"] = sum(x.computed for x in res.splits)
    shutil.rmtree(a["store"], ignore_errors=True)
    return out


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the loader workers, once joined): on a shared machine
    the wall-clock ratio carries the other jobs' noise, the CPU-time ratio much less."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


CHILDREN = {"extract": child_extract}


def _full_subject(ctx, n: int) -> Path:
    subj = ctx.dir / "images-full" / "subj01"
    if not subj.exists():
        from featstore.sample import make_sample_subject

        make_sample_subject(ctx.dir / "images-full", subj="01", n_train=n, n_test=0, seed=0)
    return subj


def _measure(ctx, subj: Path, arch: str, batch: int) -> dict:
    n = len(list((subj / "training_split" / "training_images").iterdir()))
    warm(sorted((subj / "training_split" / "training_images").iterdir()))
    reps = min(ctx.reps, 2)
    log(f"extract: {arch}, {n} images, batch {batch}: forward only, then a full extract, best of {reps}"
        f"{' (in this process: --quick)' if ctx.quick else ' (a fresh process)'}")
    args = {"subj": str(subj), "store": str(ctx.dir / "extract.zarr"), "batch": batch, "workers": 2, "arch": arch,
            "reps": reps}
    # --quick: in this process; it measures nothing that needs a fresh one, and a start costs more than the row
    res = child_extract(args) if ctx.quick else child("extract", args)
    assert res["computed"] == n, res
    return {**res, "n": n}


def _row(name: str, res: dict, arch: str, batch: int, bound: float, what: str, counted: bool) -> dict:
    n, ext, f = res["n"], res["seconds"], res["forward"]
    return row(name, ext / f, f"<= {bound:g}x forward-only time{'' if counted else ' (informational)'}",
               ("<=", bound), f"{ext:.2f} s ({n / ext:.3g} img/s)", f"forward {f:.2f} s ({n / f:.3g} img/s)",
               f"{n} images 425 px -> 434 px, dinov2_q {what}, arch {arch}, random weights, batch {batch}, CPU, "
               f"{res['threads']} torch threads on both sides; extract() with its defaults (DataLoader 2 workers, "
               "float16, fsync), in a warm process after imports and the backbone's build; forward only: the same "
               "backbone's forward_features over the same images, preprocessed beforehand by extraction's own "
               f"dataset, the same batches; CPU seconds (this process + loader workers) {res['cpu']:.2f} vs "
               f"{res['forward_cpu']:.2f}: {res['cpu'] / res['forward_cpu']:.3g}x", featstore_s=ext, baseline_s=f,
               featstore_cpu_s=res["cpu"], baseline_cpu_s=res["forward_cpu"], counted=counted)


def rows_extract(ctx) -> list[dict]:
    """Extraction overhead where it is meaningful: the full-size architecture (counted; --quick: the tiny one, said
    in the row), and the tiny one on --images images (information)."""
    full_arch, full_what = (("tiny", "the tiny test model (--quick; a full run: ViT-B/14)") if ctx.quick
                            else (FULL_ARCH, "ViT-B/14"))
    full = _measure(ctx, _full_subject(ctx, min(FULL_IMAGES, ctx.images)), full_arch, FULL_BATCH)
    tiny = _measure(ctx, ensure_subject(ctx), "tiny", BATCH)
    return [_row("extract", full, full_arch, FULL_BATCH, 1.05, full_what, True),
            _row("extract-tiny", tiny, "tiny", BATCH, 1.1, "the tiny test model (its forward costs about what decoding "
                 "the PNGs does on 2 cores)", False)]
