#!/usr/bin/env python
"""featstore on a GPU: extraction against the forward pass, half precision, and the loader against a training step.

    python tools/gpu_bench.py [--images 4096] [--device cuda] [--batch-size 64] [--workers N] [--json out.json]
    python tools/gpu_bench.py --arch tiny-d2 --images 8 --device cpu --batch-size 4 --workers 0 --steps 3   # smoke

For dinov2_q (ViT-B/14 by default, 425 px images padded to 434 px) with RANDOM weights (seeded: no download, the
speed does not depend on the values), it measures:
  forward-<p>        images/s of the backbone alone on device-resident inputs, for each --precisions p
                     (float32 with TF32 off; bfloat16 / float16 under autocast, as `featstore extract --precision`)
  extract-<p>        images/s of a real `featstore extract` (featstore.extract, the command's code) over a sample subject
                     of --images PNGs generated here (PNG decoding in --workers DataLoader workers, float16 store, fsync
                     on) vs forward-<p>; target >= 0.9x
  extract-half       the faster half-precision extract; target >= 1,000 images/s
  loader             float16 batches of 16 per second that FeatureDataset(dtype="float16") + DataLoader(--workers,
                     pinned memory, channels-last collate) delivers to the device (converted to float32 there) from the
                     extracted store, random order, vs the transformer brain encoder's training steps per second on
                     the device (featstore.encoding, default size, device-resident batches); target >= 1.0x
Rows are printed as a table (stdout; progress on stderr) and written as JSON with --json (the benchmark's row format:
name, ratio, target, meets, featstore, baseline, notes, op, bound, judged, also). Everything is written under a new
temporary folder inside --dir, removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the benchmark's row helpers (bench.common)

from bench.common import log, row, unavailable

from featstore.errors import FeatstoreError

TRAIN_BATCH = 16  # train_encoder's default --batch_size: what one training step receives
VERTICES = (19004, 20544)  # Algonauts subj01's hemispheres: the readout a real training run has
PRECISIONS = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4096,
                   help="images of the generated sample subject (default 4096: start-up is a small part of the run)")
    p.add_argument("--arch", default=None,
                   help="backbone architecture (default: dinov2_q's ViT-B/14; tiny-dN for a smoke test)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding and loader DataLoader workers (default: this process's CPUs)")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help=f"comma-separated forward-pass precisions (default {','.join(PRECISIONS)})")
    p.add_argument("--forward-batches", type=int, default=20, help="timed batches of the forward-only rows (default 20)")
    p.add_argument("--steps", type=int, default=50, help="timed training steps (default 50)")
    p.add_argument("--hidden-dim", type=int, default=768, help="transformer encoder width (default 768, the reference)")
    p.add_argument("--vertices", default=f"{VERTICES[0]},{VERTICES[1]}",
                   help=f"LH,RH vertices of the encoder's readout (default {VERTICES[0]},{VERTICES[1]}: subj01's)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument("--dir", default=None, help="make the working folder in DIR (default: the system's temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the working folder instead of removing it at the end")
    return p


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def forward_rate(bb, dev, precision: str, hw: tuple[int, int], batch: int, n_batches: int) -> float:
    """Images/s of the backbone alone: random device-resident inputs, the precision's context, after 2 warm-up
    batches (cuDNN/cuBLAS set-up)."""
    import torch

    from featstore.extraction.precision import autocast, no_tf32

    x = torch.randn(batch, 3, *hw, device=dev)
    with no_tf32(dev), torch.inference_mode():
        for _ in range(2):
            with autocast(precision, dev):
                bb.forward_features(x)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            with autocast(precision, dev):
                bb.forward_features(x)
        _sync(dev)
    return batch * n_batches / (time.perf_counter() - t0)


def extract_rate(bb, subj: Path, store: Path, dev, precision: str, batch: int, workers: int) -> tuple[float, dict]:
    """Images/s of featstore's extraction over the subject (the split's own time: loader start-up, the writer's
    drain and fsync included; the backbone is built once outside). Returns (rate, precision_error or {})."""
    from featstore import FeatureStore
    from featstore.extraction import extract

    res = extract(subj, store, backbone=bb, device=str(dev), batch_size=batch, num_workers=workers,
                  precision=precision, progress=False, splits=["train"])
    s = res.splits[0]
    fa = FeatureStore(store).get(bb.outputs[0].feature, "01", "train")
    return s.computed / s.seconds, fa.provenance.get("precision_error", {})


def loader_rate(store: Path, feature: str, dev, workers: int, n_batches: int) -> tuple[float, str]:
    """Batches/s delivered to the device, float16 items converted to float32 there after a non_blocking copy
    from pinned memory; steady state (the clock starts at the first batch)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from featstore.dataset import FeatureDataset
    from featstore.encoding import channels_last_collate

    try:
        ds = FeatureDataset(store, feature, "01", "train", dtype="float16")
        note = "float16 items"
    except TypeError:  # a featstore without FeatureDataset(dtype=...)
        ds = FeatureDataset(store, feature, "01", "train")
        note = "float32 items (this FeatureDataset has no dtype= keyword: float16 delivery not measured)"
    rng = np.random.default_rng(0)
    order = [int(i) for _ in range(-(-(n_batches + 1) * TRAIN_BATCH // len(ds))) for i in rng.permutation(len(ds))]
    loader = DataLoader(ds, batch_size=TRAIN_BATCH, sampler=order, num_workers=workers,
                        pin_memory=dev.type == "cuda", collate_fn=channels_last_collate,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    it = iter(loader)
    x = next(it).to(dev, non_blocking=True).float()
    _sync(dev)
    t0, n = time.perf_counter(), 0
    for b in it:
        x = b.to(dev, non_blocking=True).float()
        n += 1
        if n >= n_batches:
            break
    _sync(dev)
    assert x.dtype == torch.float32
    return n / (time.perf_counter() - t0), note


def step_rate(channels: int, grid: tuple[int, int], dev, steps: int, hidden_dim: int,
              vertices: tuple[int, int]) -> tuple[float, str]:
    """Training steps/s of the transformer brain encoder (featstore.encoding.train_one_epoch: forward, loss,
    backward, clipping, AdamW) on device-resident float32 batches: the rate the loader has to keep up with."""
    import torch

    from featstore.encoding import EncoderConfig, SubjectRois, TransformerBrainEncoder, make_readout, train_one_epoch
    from featstore.sample import ROI_MAPPINGS, sample_rois

    nv = dict(zip(("lh", "rh"), vertices))
    rois = SubjectRois({h: sample_rois(nv[h], 0, "01", h) for h in nv}, {c: dict(m) for c, m in ROI_MAPPINGS.items()})
    readout = make_readout("rois_all", nv, rois)
    torch.manual_seed(0)
    cfg = EncoderConfig(hidden_dim=hidden_dim)
    model = TransformerBrainEncoder(channels, readout, cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    x = torch.randn(TRAIN_BATCH, *grid, channels, device=dev).permute(0, 3, 1, 2)  # channels-last, as collated
    y = {f"{h}_f": torch.randn(TRAIN_BATCH, v, device=dev) for h, v in nv.items()}
    train_one_epoch(model, [(x, y)] * min(3, steps), opt, dev)  # warm-up
    _sync(dev)
    stats = train_one_epoch(model, [(x, y)] * steps, opt, dev)
    _sync(dev)
    desc = (f"TransformerBrainEncoder (hidden {hidden_dim}, {cfg.nheads} heads, rois_all readout, {readout.num_queries} "
            f"queries, {vertices[0]}+{vertices[1]} vertices), batch {TRAIN_BATCH}")
    return stats.samples / TRAIN_BATCH / stats.seconds, desc


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    import torch
    from PIL import Image

    from featstore import get_backbone
    from featstore.devices import cpu_count, resolve_device
    from featstore.extraction.precision import check_precision
    from featstore.layout import read_subject
    from featstore.sample import make_sample_subject

    dev = resolve_device(args.device)
    precisions = [p for p in args.precisions.split(",") if p]
    for p in precisions:
        check_precision(p, dev)
    workers = cpu_count() if args.workers is None else args.workers
    where = f"{torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else f"CPU ({cpu_count()} cores)"
    log(f"{where}; writing {args.images} synthetic 425 px PNG images")
    subj = make_sample_subject(work / "images", subj="01", n_train=args.images, n_test=0, seed=0,
                               workers=max(workers, 1))
    log(f"dinov2_q {args.arch or 'ViT-B/14'} with RANDOM weights (seed 0, explicit: the speed does not depend on them)")
    bb = get_backbone("dinov2_q", weights="random", arch=args.arch, seed=0).to(dev)
    first = read_subject(subj, ["train"]).images["train"][0]
    with Image.open(first) as im:
        hw = tuple(bb.preprocess(im).shape[1:])
    feature = bb.outputs[0].feature
    rows, ext, keep_store = [], {}, None
    for p in precisions:
        log(f"forward-{p}: {args.forward_batches} batches of {args.batch_size} at {hw[0]} px")
        f = forward_rate(bb, dev, p, hw, args.batch_size, args.forward_batches)
        log(f"extract-{p}: {args.images} images, {workers} decoding workers")
        store = work / f"extract-{p}.zarr"
        e, err = extract_rate(bb, subj, store, dev, p, args.batch_size, workers)
        ext[p] = e
        if keep_store is None:
            keep_store = store
        else:
            shutil.rmtree(store, ignore_errors=True)
        errtxt = (f"; error vs float32 on the first batch: max {err['max_rel']:.2g}, mean {err['mean_rel']:.2g} "
                  f"relative per token (stored float16 values)") if err else ""
        rows.append(row(f"forward-{p}", None, "information", (">=", 0), f"{f:.0f} images/s", "-",
                        f"backbone alone, batch {args.batch_size}, random device-resident inputs {hw[0]}x{hw[1]}",
                        on=f, rate=f))
        rows.append(row(f"extract-{p}", e / f, ">= 0.9x forward-only", (">=", 0.9), f"{e:.0f} images/s",
                        f"forward {f:.0f} images/s",
                        f"featstore extract --precision {p} --batch_size {args.batch_size} --num_workers {workers} "
                        f"(float16 store, fsync on, PNGs in the page cache; the split's own time"
                        f"{', with the extra float32 forward of the first batch' if p != 'float32' else ''}){errtxt}",
                        rate=e, forward_rate=f, precision_error=err))
    halves = {p: r for p, r in ext.items() if p != "float32"}
    if halves:
        best = max(halves, key=halves.get)
        rows.append(row("extract-half", None, ">= 1000 images/s", (">=", 1000), f"{halves[best]:.0f} images/s",
                        "-", f"the faster half precision ({best})", on=halves[best], rate=halves[best]))
    else:
        rows.append(unavailable("extract-half", ">= 1000 images/s", "no half precision in --precisions"))
    n_batches = max(4, args.images // TRAIN_BATCH - 1)  # one epoch (a tiny store is repeated)
    log(f"loader: {n_batches} batches of {TRAIN_BATCH}, {workers} workers")
    lr, note = loader_rate(keep_store, feature, dev, workers, n_batches)
    log(f"train step: {args.steps} steps")
    _, C, grid = bb.token_shape(hw)
    sr, desc = step_rate(C, grid, dev, args.steps, args.hidden_dim, args.vertices)
    rows.append(row("loader", lr / sr, ">= 1.0x the training step rate", (">=", 1.0), f"{lr:.1f} batches/s",
                    f"train step {sr:.1f} steps/s",
                    f"FeatureDataset {note}, DataLoader({workers} workers, batch {TRAIN_BATCH}, "
                    f"{'pinned, ' if dev.type == 'cuda' else ''}channels-last "
                    f"collate), random order, copied non_blocking and converted to float32 on {dev.type}; step: {desc}, "
                    f"device-resident float32 batches", loader_rate=lr, step_rate=sr))
    return rows


def format_rows(rows: list[dict], header: str) -> str:
    from featstore import table

    cells = [[r["name"], r["featstore"], r["baseline"], "-" if r["ratio"] is None else f"{r['ratio']:.3g}x",
              r["target"], "-" if r["target"] == "information" else ("met" if r["meets"] else "MISSED")] for r in rows]
    out = [header, table.format_table(cells, ["row", "featstore", "baseline", "ratio", "target", "met"]), ""]
    return "\n".join(out + [f"{r['name']}: {r['notes']}" for r in rows if r.get("notes")])


def fail(p: argparse.ArgumentParser, message: str) -> None:
    """A one-line error, exit 2 (no usage block)."""
    p.exit(2, f"gpu_bench: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if min(args.images, args.batch_size, args.forward_batches, args.steps, args.hidden_dim) < 1:
        fail(p, "--images, --batch-size, --forward-batches, --steps and --hidden-dim must be >= 1")
    try:
        args.vertices = tuple(int(v) for v in args.vertices.split(","))
    except ValueError:
        args.vertices = ()
    if len(args.vertices) != 2 or min(args.vertices) < 1:
        fail(p, "--vertices: expected LH,RH (two positive integers)")
    bad = set(args.precisions.split(",")) - set(PRECISIONS)
    if bad:
        fail(p, f"--precisions: unknown {', '.join(sorted(bad))} (choose from {', '.join(PRECISIONS)})")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail(p, f"--device {args.device}: no CUDA device here (use --device cpu for a CPU run)")
    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="featstore-gpubench-", dir=args.dir or tempfile.gettempdir()))
    t0 = time.perf_counter()
    try:
        rows = run(args, work)
    except FeatstoreError as e:
        fail(p, e.cli_message())
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    header = (f"featstore GPU benchmark: dinov2_q {args.arch or 'ViT-B/14'} random weights, {args.images} images, "
              f"batch {args.batch_size}, device {args.device}; {time.perf_counter() - t0:.0f} s")
    print(format_rows(rows, header))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
