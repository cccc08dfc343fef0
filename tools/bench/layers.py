"""layers (4 layers of both DINOv2 variants, 8 arrays, in one run vs one output) and layers-rss (peak RSS of an
--enc_layer all run of both variants vs a single-output run)."""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .common import BATCH, child, early, ensure_subject, extract_opts, log, peak_rss_mb, row, warm

LAYERS_DEPTH = 4  # a tiny DINOv2 with 4 blocks, so that L = 4 layers of both variants make 8 arrays
ARCH = f"tiny-d{LAYERS_DEPTH}"
RSS_SIDES = {"one": ("dinov2_q", -1), "all": ("dinov2_q,dinov2", "all")}  # side: backbone, --enc_layer


def child_extract_rss(a: dict) -> dict:
    """One extract() run as `featstore extract` does it, then this process's own peak RSS (VmHWM)."""
    from featstore.extraction import extract

    t0 = time.perf_counter()
    res = extract(a["subj"], a["store"], backbone=a["backbone"], enc_layer=a["enc_layer"], arch=a["arch"],
                  weights="random", **extract_opts(a))
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "arrays": len(res.splits),
            "bytes": sum(s.bytes_on_disk for s in res.splits)}


CHILDREN = {"extract-rss": child_extract_rss}


def _rss_args(ctx, subj: Path, side: str) -> dict:
    backbone, layers = RSS_SIDES[side]
    return {"subj": str(subj), "store": str(ctx.dir / f"rss-{side}.zarr"), "backbone": backbone, "enc_layer": layers,
            "arch": ARCH}


def start_early(ctx, groups: list[str]) -> None:
    """--quick only: the layers-rss children (their inputs exist from the start) run at once, beside the groups that
    run in this process (most of such a child is interpreter start-up, on one core). Full runs keep every
    measurement on a quiet machine."""
    ctx.early = {}
    if not ctx.quick or "layers" not in groups:
        return
    subj = ensure_subject(ctx)
    log("--quick: starting the layers-rss child processes now, beside the other groups")
    ctx.early_pool = ThreadPoolExecutor(2)
    for side in RSS_SIDES:
        ctx.early[f"rss-{side}"] = ctx.early_pool.submit(child, "extract-rss", _rss_args(ctx, subj, side))


def _layers_times(subj: Path, root: Path, reps: int, warmed: bool) -> dict:
    """Best seconds of extract() for one output and for 4 layers x 2 variants, same images and model, interleaved,
    in this process (no interpreter start on either side); one untimed run first unless `warmed`."""
    from featstore import get_backbone
    from featstore.extraction import extract

    # the single output is the last block's tokens: the same 4 blocks computed as for 8 outputs (dinov2_q at -1 stops
    # at the last block's qkv and skips its attention and MLP), so the ratio is the cost of the 7 extra arrays alone
    bbs = {"one": get_backbone("dinov2", layer=-1, arch=ARCH, weights="random", seed=0),
           "many": get_backbone("dinov2_q,dinov2", layer=f"0:{LAYERS_DEPTH}", arch=ARCH, weights="random", seed=0)}
    best = dict.fromkeys(bbs, np.inf)
    for r in range(0 if warmed else -1, reps):  # round -1 warms up (imports, allocator, page cache), not timed
        for side, bb in bbs.items():
            if r < 0 and side == "one":
                continue
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.perf_counter()
            extract(subj, root, backbone=bb, device="cpu", batch_size=BATCH, progress=False)
            if r >= 0:
                best[side] = min(best[side], time.perf_counter() - t0)
    shutil.rmtree(root, ignore_errors=True)
    return {**best, "arrays": len(bbs["many"].outputs)}


def _peak_rss(ctx, subj: Path) -> dict[str, dict]:
    """Both sides in fresh processes at once (a peak does not depend on the other's CPU share)."""
    with ThreadPoolExecutor(2) as pool:
        def run(side: str) -> dict:
            return early(ctx, f"rss-{side}") or child("extract-rss", _rss_args(ctx, subj, side))

        runs = {side: pool.submit(run, side) for side in RSS_SIDES}
        rss = {side: f.result() for side, f in runs.items()}
    for side in rss:
        shutil.rmtree(ctx.dir / f"rss-{side}.zarr", ignore_errors=True)
    return rss


def rows_layers(ctx) -> list[dict]:
    """L = 4 layers of both DINOv2 variants (8 arrays) in one run vs one variant at one layer, same images and model,
    interleaved; and the peak RSS of an `--enc_layer all` run of both variants vs a single-output run,
    each in a fresh process (VmHWM, so the parent's peak is not inherited)."""
    from featstore.extraction import ExtractConfig

    subj = ensure_subject(ctx)
    n = ctx.images
    warm(sorted((subj / "training_split" / "training_images").iterdir()))
    log(f"layers: 8 arrays vs 1, {n} images, --arch {ARCH} (tiny, {LAYERS_DEPTH} blocks), best of {ctx.reps}")
    t = _layers_times(subj, ctx.dir / "layers.zarr", ctx.reps, getattr(ctx, "extract_warm", False))
    ratio = t["many"] / t["one"]
    log("layers: peak RSS of dinov2_q --enc_layer -1 and of dinov2_q,dinov2 --enc_layer all, two fresh processes at "
        "once (each interpreter start costs ~5 s)")
    rss = _peak_rss(ctx, subj)
    r_all, r_one = rss["all"]["peak_rss_mb"], rss["one"]["peak_rss_mb"]
    # What the extra outputs may hold beyond the 1-output run: the writer's queue (at most queue_mb, at most every
    # stored row of the run) and, per batch, the extra arrays' float32 outputs and their float16 copies (3x the
    # stored float16 bytes of a sample)
    arrays, stored = rss["all"]["arrays"], rss["all"]["bytes"]
    queue_mb = min(ExtractConfig.queue_mb, stored / 2**20)
    batch_mb = BATCH * stored / n / 2**20 * 3 * (arrays - 1) / arrays
    bound_mb = round(queue_mb + batch_mb, 1)
    return [
        row("layers", ratio, "<= 1.3x the single-output time", ("<=", 1.3),
            f"{t['many']:.2f} s ({t['arrays']} arrays)", f"{t['one']:.2f} s (1 array)",
            f"{n} images, dinov2_q,dinov2 --enc_layer 0:{LAYERS_DEPTH} vs dinov2 --enc_layer -1 (the same {LAYERS_DEPTH} "
            f"blocks computed), --arch {ARCH} "
            f"(tiny ViT with {LAYERS_DEPTH} blocks, width 48), random weights, extract() defaults (2 loader workers, "
            "float16, fsync); one forward pass per batch either way, 8x the bytes written",
            featstore_s=t["many"], baseline_s=t["one"]),
        row("layers-rss", r_all / r_one, f"<= the 1-output peak + {bound_mb:g} MB (queue + a batch of outputs)",
            ("<=", bound_mb), f"{r_all:.0f} MB ({rss['all']['arrays']} arrays)", f"{r_one:.0f} MB (1 array)",
            f"peak RSS (VmHWM) of the main process of a fresh extract (the 2 loader workers are processes of their "
            f"own), {n} images, --enc_layer all of both variants vs one output; --arch {ARCH} as in layers; the "
            f"bound is read on the difference, {r_all - r_one:.0f} MB: the writer's queue {queue_mb:.1f} MB (min of "
            f"{ExtractConfig.queue_mb} MB and the {stored / 2**20:.1f} MB stored) + {batch_mb:.1f} MB (batch "
            f"{BATCH} x {arrays - 1} extra arrays x a sample's float32 output and float16 copy)", on=r_all - r_one,
            featstore_mb=r_all, baseline_mb=r_one),
    ]
