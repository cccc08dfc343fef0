"""`featstore <command>`: argument parsing over the Python API; no logic of its own.

User mistakes print one line (`featstore: error: ...`) and exit 2; interrupted extractions exit 130/143.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

from .errors import FeatstoreError, Interrupted, Terminated

log = logging.getLogger("featstore")


def add_extract_args(p: argparse.ArgumentParser, guide_defaults: bool = True) -> None:
    """The guide's flags (same names and defaults) plus featstore's own."""
    from .backbones import list_backbones

    p.add_argument("--data_dir", required=True, help="Algonauts subject folder, e.g. .../subj01")
    p.add_argument("--output_dir", required=True, help="featstore Zarr store (created if missing)")
    p.add_argument("--subj", default="01", help="subject id (default 01)")
    p.add_argument("--backbone", default="dinov2_q", help=f"one of {', '.join(list_backbones())} (default dinov2_q)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="cuda", help="cuda (falls back to cpu with a warning) or cpu")
    p.add_argument("--enc_layer", type=int, default=-1, help="block index, negative from the end (default -1)")
    p.add_argument("--weights", default="pretrained", help="pretrained (default), random, or a checkpoint PATH")
    p.add_argument("--arch", default=None, help="override the architecture (timm/open_clip name, or 'tiny')")
    p.add_argument("--image_size", type=int, default=None, help="resize DINOv2 input to this square size")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored dtype (default float16)")
    p.add_argument("--chunk", type=int, default=1, help="samples per storage chunk (default 1)")
    p.add_argument("--num_workers", type=int, default=2, help="image decoding workers (default 2)")
    p.add_argument("--shard", default=None, help="K/N: fill only share K (0-based) of N, for parallel writers")
    p.add_argument("--overwrite", action="store_true", help="start the array over if its configuration changed")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    p.add_argument("--no_fsync", action="store_true", help="skip fsync before marking chunks done (faster, less safe)")


def run_extract(args: argparse.Namespace):
    from .extract import extract

    result = extract(
        data_dir=args.data_dir, output_dir=args.output_dir, subj=args.subj, backbone=args.backbone,
        batch_size=args.batch_size, device=args.device, enc_layer=args.enc_layer, weights=args.weights,
        arch=args.arch, image_size=args.image_size, dtype=args.dtype, chunk=args.chunk,
        num_workers=args.num_workers, shard=args.shard, overwrite=args.overwrite, seed=args.seed,
        durable=not args.no_fsync,
    )
    for s in result.splits:
        print(s.line())
    return result


def cmd_extract(args: argparse.Namespace) -> int:
    run_extract(args)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_npy

    for p in export_npy(args.store, args.output_dir, feature=args.feature, subj=args.subj, split=args.split):
        print(p)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(format_info(args.store))
    return 0


def format_info(store) -> str:
    from .store import FeatureStore

    fs = FeatureStore(store, mode="r")
    rows = [("array", "shape", "dtype", "chunks", "on disk", "ratio", "vs f32 npy", "done", "weights")]
    for path in fs.list_arrays():
        a = fs.get(*path.split("/")).summary()
        w = a["weights"]
        wdesc = w.get("kind", "?") + (f" seed={w['seed']}" if w.get("kind") == "random" else f" {w.get('name', '')}")
        rows.append((
            path, "x".join(map(str, a["shape"])), a["dtype"], "x".join(map(str, a["chunks"])),
            f"{a['bytes_on_disk'] / 1e6:.1f} MB", f"{a['ratio']:.2f}x", f"{a['ratio_vs_float32']:.2f}x",
            f"{a['done']}/{a['total']}", wdesc.strip(),
        ))
    if len(rows) == 1:
        return f"{fs.location}: no arrays"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return f"{fs.location}\n" + "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    from .store import FeatureStore

    fs = FeatureStore(args.store, mode="a" if args.repair else "r")
    ok = True
    for path in fs.list_arrays():
        rep = fs.get(*path.split("/")).verify(repair=args.repair, progress=True)
        ok &= rep.ok
        state = "ok" if rep.ok else "FAILED"
        print(f"{path}: {state}: {rep.done}/{rep.total} chunks done, {len(rep.corrupt)} corrupt, {len(rep.missing)} missing")
        if rep.corrupt:
            print(f"  corrupt chunks: {_ranges(rep.corrupt)}" + (" (marked not done)" if args.repair else ""))
        if rep.missing:
            print(f"  missing chunks: {_ranges(rep.missing)}")
        for p in rep.problems:
            print(f"  {p}")
    if args.repair and not ok:
        print("repaired: rerun the extract command to recompute the chunks marked not done")
    return 0 if ok else 1


def _ranges(ix: list[int]) -> str:
    out, start = [], None
    for a, b in zip(ix, ix[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ", ".join(out[:20]) + (" ..." if len(out) > 20 else "")


def cmd_stats(args: argparse.Namespace) -> int:
    from .stats import feature_stats
    from .stats_report import format_stats, plot_stats, require_plotting

    if args.plot:
        require_plotting()  # fail before the pass, not after it
    result = feature_stats(
        args.store, args.feature, args.subj, args.split, pca=args.pca, scheduler=args.scheduler,
        workers=args.workers, save=not args.no_save, progress=True,
    )
    print(format_stats(result))
    if args.plot:
        print(f"plot: {plot_stats(result, args.plot)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import make_sample_subject

    print(make_sample_subject(args.root, subj=args.subj, n_train=args.n_train, n_test=args.n_test, seed=args.seed))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .export import export_npy
    from .extract import extract
    from .sample import make_sample_subject

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="featstore-demo-"))
    t0 = time.perf_counter()
    subj_dir = make_sample_subject(root / "data", subj="01", n_train=12, n_test=4, seed=0)
    print(f"[1/4] synthetic subject: {subj_dir}")
    print("[2/4] extracting dinov2_q (full-size ViT-B/14) with RANDOM WEIGHTS (--weights random): demo only, "
          "the features are not pretrained DINOv2 features")
    result = extract(subj_dir, root / "features.zarr", subj="01", backbone="dinov2_q", batch_size=4,
                     device="cpu", weights="random", num_workers=1)
    for s in result.splits:
        print("      " + s.line())
    print("[3/4] legacy .npy export:")
    for p in export_npy(root / "features.zarr", root / "npy"):
        print(f"      {p}")
    print("[4/4] featstore info:")
    print(format_info(root / "features.zarr"))
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; everything is under {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featstore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="extract one subject's features into a Zarr store (resumable)")
    add_extract_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("export-npy", help="write the legacy OUT/{feature}/{subj}/{train,synt}.npy files")
    p.add_argument("--store", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--feature", default=None)
    p.add_argument("--subj", default=None)
    p.add_argument("--split", default=None)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="list arrays with shape, dtype, chunks, size on disk and completion")
    p.add_argument("store")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="decode every chunk, check checksums and completeness")
    p.add_argument("store")
    p.add_argument("--repair", action="store_true", help="mark corrupt chunks as not done so extract recomputes them")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("stats", help="per-channel mean/std/min/max (CLS and patch tokens), token norms, outlier "
                       "tokens, value histogram and optional PCA of one array, in one dask pass; saved in the store")
    p.add_argument("store")
    p.add_argument("--feature", required=True, help="feature name, e.g. dinov2_q_last")
    p.add_argument("--subj", default="01", help="subject id (default 01)")
    p.add_argument("--split", default="train", help="train or synt (default train)")
    p.add_argument("--pca", type=int, default=0, metavar="K", help="also the top-K principal components of the patch tokens")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scheduler", default=None, metavar="ADDRESS", help="run on a running dask.distributed scheduler")
    g.add_argument("--workers", type=int, default=None, metavar="N", help="start a local dask cluster of N processes")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the statistics into one figure")
    p.add_argument("--no-save", dest="no_save", action="store_true", help="do not write the results into the store")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("sample", help="write a synthetic subject ROOT/subjXX in the Algonauts layout")
    p.add_argument("root")
    p.add_argument("--subj", default="01")
    p.add_argument("--n-train", dest="n_train", type=int, default=16)
    p.add_argument("--n-test", dest="n_test", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="sample -> extract (random weights) -> export -> info, in about a minute")
    p.add_argument("--dir", default=None, help="folder for the demo's files (default: a new temporary folder)")
    p.set_defaults(func=cmd_demo)
    return parser


def _on_sigterm(signum, frame):
    raise Terminated()


def run(func, args) -> int:
    """Run a command; user errors become one line on stderr and their exit code."""
    try:
        return func(args)
    except Interrupted as e:
        print(f"featstore: {e}", file=sys.stderr)
        return e.exit_code
    except FeatstoreError as e:
        print(f"featstore: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("featstore: interrupted", file=sys.stderr)
        return 143 if isinstance(sys.exc_info()[1], Terminated) else 130


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="featstore: %(levelname)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
