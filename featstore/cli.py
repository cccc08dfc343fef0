"""`featstore <command>`: argument parsing over the Python API (flags.py builds the extract flags from
ExtractConfig); no logic of its own.

User mistakes print one line (`featstore: error: ...`) and exit 2; data faults (a corrupt chunk, a full disk, a
corrupt image) exit 1; interrupted extractions exit 130/143. Every flag answers to both spellings (--data_dir,
--data-dir); --help shows the guide's underscore one.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from .errors import FeatstoreError, Interrupted, Terminated
from .flags import ArgumentParser, add_config_args, config_from_args

log = logging.getLogger("featstore")


def add_extract_args(p: ArgumentParser) -> None:
    """The guide's flags (same names and defaults, from ExtractConfig) plus what only the command line has."""
    from .extraction.config import ExtractConfig

    p.add_argument("--data_dir", required=True, help="Algonauts subject folder, e.g. .../subj01")
    p.add_argument("--output_dir", required=True,
                   help="featstore Zarr store: a folder (created if missing) or a URL such as s3://bucket/store.zarr")
    add_config_args(p, ExtractConfig)
    p.add_argument("--storage_options", default=None, metavar="JSON", help=STORAGE_HELP)
    p.add_argument("--dry_run", action="store_true", help="print the arrays, their shapes and the bytes they will "
                   "take, and exit")
    add_cluster_args(p, "run the units left as tasks",
                     on_scheduler="(e.g. tcp://host:8786); workers need the images at the same paths and the store at "
                                  "the same folder or URL",
                     on_workers=", one model each (dask workers, as in `featstore stats`; --num_workers stays the "
                                "image decoders per process)")


def add_cluster_args(p: ArgumentParser, what: str, on_scheduler: str = "(default: threads of this process)",
                     on_workers: str = "") -> None:
    """--scheduler ADDRESS | --workers N, the same pair on every command that can use a dask cluster."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help=f"{what} on a running dask.distributed scheduler {on_scheduler}")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"{what} on a local dask cluster of N worker processes{on_workers}")


STORAGE_HELP = ("fsspec options for a URL store, e.g. '{\"anon\": false}' (credentials and endpoint also come from the "
                "environment: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)")


def _open_store(args: argparse.Namespace, mode: str = "r"):
    from .storage import FeatureStore

    return FeatureStore(args.store, mode=mode, storage_options=storage_options(args.storage_options))


def storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    import json

    from .errors import BadArgumentError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadArgumentError(f"--storage_options: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise BadArgumentError("--storage_options: expected a JSON object, e.g. '{\"anon\": true}'")
    return value


def run_extract(args: argparse.Namespace):
    from .extraction import ExtractConfig, extract

    cfg = config_from_args(ExtractConfig, args, storage_options=storage_options(args.storage_options))
    result = extract(args.data_dir, args.output_dir, cfg, dry_run=args.dry_run, scheduler=args.scheduler,
                     workers=args.workers)
    if result.planned:
        total = sum(p.estimated_bytes for p in result.planned)
        for p in result.planned:
            print(p.line())
        print(f"dry run: {len(result.planned)} arrays, ~{total / 1e9:.2f} GB on disk when complete (uncompressed "
              "size; compression saves little on float16 features); nothing was written")
    for s in result.splits:
        print(s.line())
    return result


def cmd_extract(args: argparse.Namespace) -> int:
    run_extract(args)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_npy

    for p in export_npy(_open_store(args), args.output_dir, feature=args.feature, subj=args.subj, split=args.split):
        print(p)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .stats.report import format_info

    print(format_info(_open_store(args)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    fs = _open_store(args, mode="a" if args.repair else "r")
    ok, corrupt, missing = True, False, []
    for fa in fs.arrays():
        rep = fa.verify(repair=args.repair, progress=True)
        ok &= rep.ok
        corrupt |= bool(rep.corrupt)
        state = "ok" if rep.ok else "incomplete" if not (rep.corrupt or rep.problems) else "FAILED"
        unit = fa.unit
        print(f"{fa.path}: {state}: {rep.done}/{rep.total} {unit}s done, {len(rep.corrupt)} corrupt, "
              f"{len(rep.missing)} missing")
        if rep.corrupt:
            print(f"  corrupt {unit}s: {_ranges(rep.corrupt)}" + (" (marked not done)" if args.repair else ""))
        if rep.missing:
            print(f"  missing {unit}s: {_ranges(rep.missing)}")
            missing.append(f"{fa.units(len(rep.missing))} of {fa.path}")
        for p in rep.problems:
            print(f"  {p}")
    if corrupt and args.repair:
        print("repaired: rerun the extract command to recompute the chunks marked not done")
    elif corrupt:
        print(f"to recompute corrupt chunks: featstore verify --repair {args.store}, then rerun the extract command")
    elif missing:
        print(f"incomplete, nothing corrupt: {', '.join(missing)} not written yet; rerun the extract command to "
              "finish (no --repair needed)")
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
    from .stats.config import StatsConfig
    from .stats.reduce import feature_stats
    from .stats.report import format_stats, plot_stats, require_plotting

    plot = require_plotting(args.plot) if args.plot else None  # a bad --plot fails before the pass, not after it
    cfg = config_from_args(StatsConfig, args, progress=True)
    result = feature_stats(_open_store(args), args.feature, args.subj, args.split, cfg, scheduler=args.scheduler,
                           workers=args.workers)
    print(format_stats(result))
    if plot:
        print(f"plot: {plot_stats(result, plot)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .encoding.layerwise import sweep
    from .encoding.sweep_config import SweepConfig

    cfg = config_from_args(SweepConfig, args, progress=True, storage_options=storage_options(args.storage_options))
    result = sweep(args.store, args.data_dir, args.output_dir, cfg, scheduler=args.scheduler, workers=args.workers)
    print(result.table)
    print(f"results: {result.output_dir / 'sweep.json'} (per-vertex r and alphas: r/, alpha/"
          + ("; figures: heatmap.png, r_by_feature.png)" if any(f.suffix == ".png" for f in result.files) else ")"))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import make_sample_subject

    print(make_sample_subject(args.root, subj=args.subj, n_train=args.n_train, n_test=args.n_test, seed=args.seed))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .export import export_npy
    from .extraction import extract
    from .sample import make_sample_subject
    from .stats.report import format_info

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


DESCRIPTION = """\
featstore extracts the token features of frozen vision backbones (DINOv2 ViT-B/14, OpenCLIP ViT-L/14) for every
stimulus image of an Algonauts 2023 / NSD subject into a compressed, chunked Zarr store. Extraction survives crashes
and resumes where it stopped; the stored features serve training lazily, export to the legacy .npy files and give
their statistics out of core.

the usual sequence:
  featstore extract --data_dir DATA/subj01 --output_dir features.zarr --subj 01 --backbone dinov2_q
  featstore info features.zarr                                what is stored, how complete, how compressed
  featstore export-npy --store features.zarr --output_dir npy   legacy npy/dinov2_q_last/01/{train,synt}.npy
  featstore stats features.zarr --feature dinov2_q_last --plot stats.png
  featstore sweep features.zarr --data_dir DATA/subj01 --output_dir sweep   which stored layer predicts which ROI
  featstore.FeatureDataset("features.zarr", ...)              in Python: a lazy torch Dataset for training

Try it offline in about a minute: featstore demo. Every flag is also accepted with - for _ (--data-dir).
'featstore COMMAND --help' lists a command's flags."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="featstore", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, func) -> ArgumentParser:
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.set_defaults(func=func)
        return p

    p = command("extract", "extract one subject's features into a Zarr store (resumable: rerun to continue)",
                cmd_extract)
    add_extract_args(p)

    p = command("export-npy", "write the legacy OUTPUT_DIR/{feature}/{subj}/{train,synt}.npy files (float32) from "
                "complete arrays, chunk by chunk", cmd_export)
    p.add_argument("--store", required=True, help="the featstore Zarr store to read (a folder or a URL)")
    p.add_argument("--storage_options", default=None, metavar="JSON", help=STORAGE_HELP)
    p.add_argument("--output_dir", required=True, help="folder that receives FEATURE/SUBJ/SPLIT.npy (created if "
                   "missing); each file appears only when it is complete")
    p.add_argument("--feature", default=None, help="only this feature, e.g. dinov2_q_last (default: every feature)")
    p.add_argument("--subj", default=None, help="only this subject, e.g. 01 (default: every subject)")
    p.add_argument("--split", default=None, help="only this split, train or synt (default: both)")

    p = command("info", "list the store's arrays: shape, dtype, chunks, bytes on disk, compression ratio, "
                "completion and weights", cmd_info)
    p.add_argument("store", help="the featstore Zarr store (a folder or a URL such as s3://bucket/store.zarr)")
    p.add_argument("--storage_options", default=None, metavar="JSON", help=STORAGE_HELP)

    p = command("verify", "decode every chunk marked done (checking its crc32c checksum) and report corrupt and "
                "missing chunks; exit 1 if any", cmd_verify)
    p.add_argument("store", help="the featstore Zarr store (a folder or a URL such as s3://bucket/store.zarr)")
    p.add_argument("--storage_options", default=None, metavar="JSON", help=STORAGE_HELP)
    p.add_argument("--repair", action="store_true",
                   help="mark corrupt chunks as not done, so that rerunning the extract command recomputes them")

    p = command("stats", "per-channel mean/std/min/max (CLS and patch tokens), token norms, outlier tokens, value "
                "histogram and optional PCA of one array, in one dask pass; saved in the store", cmd_stats)
    p.add_argument("store", help="the featstore Zarr store (a folder or a URL such as s3://bucket/store.zarr)")
    p.add_argument("--storage_options", default=None, metavar="JSON", help=STORAGE_HELP)
    p.add_argument("--feature", required=True, help="feature name, e.g. dinov2_q_last (see: featstore info)")
    p.add_argument("--subj", default="01", help="subject id")
    p.add_argument("--split", default="train", help="train or synt")
    from .stats.config import StatsConfig

    add_config_args(p, StatsConfig)
    add_cluster_args(p, "run")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw the statistics into one figure (.png added when the name has no extension)")

    p = command("sweep", "which stored layer predicts which brain area: project every complete train array (streamed, "
                "cached in the store), fit a ridge per layer to all vertices, score r per vertex and ROI", cmd_sweep)
    p.add_argument("store", help="the featstore Zarr store (a folder or a URL such as s3://bucket/store.zarr)")
    p.add_argument("--storage_options", default=None, metavar="JSON", help=STORAGE_HELP)
    p.add_argument("--data_dir", required=True, help="Algonauts subject folder with fMRI and ROI masks, e.g. .../subj01")
    p.add_argument("--output_dir", required=True, help="folder for sweep.json, r/, alpha/ and the figures (created)")
    from .encoding.sweep_config import SweepConfig

    add_config_args(p, SweepConfig)
    add_cluster_args(p, "project")

    p = command("sample", "write a synthetic subject ROOT/subjXX in the Algonauts layout (images, fMRI, ROI "
                "masks), to try featstore without the data", cmd_sample)
    p.add_argument("root", help="folder that receives subjXX/")
    p.add_argument("--subj", default="01", help="subject id")
    p.add_argument("--n_train", type=int, default=16, help="training images (with fMRI)")
    p.add_argument("--n_test", type=int, default=4, help="test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic images and fMRI")

    p = command("demo", "sample -> extract (full-size ViT-B/14, random weights) -> export-npy -> info, in about a "
                "minute on 2 CPU cores, offline", cmd_demo)
    p.add_argument("--dir", default=None, help="folder for the demo's files (default: a new temporary folder, kept "
                   "and printed at the end)")
    return parser


def setup_logging() -> None:
    """featstore's own messages (INFO and up) as `featstore: LEVEL: ...` on stderr; other libraries' (dask,
    distributed, zarr) only from WARNING up, so their INFO chatter stays out of the terminal."""
    logging.basicConfig(level=logging.WARNING, format="featstore: %(levelname)s: %(message)s")
    logging.getLogger("featstore").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:  # distributed sets its own loggers to INFO: filter at the handler
        handler.addFilter(_others_from_warning)  # the same function each call: logging adds it once


def _others_from_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".")[0] == "featstore"


def on_sigterm(signum, frame):
    """SIGTERM (scancel, kill) stops a run the way Ctrl-C does: in-flight writes settle, exit 143."""
    raise Terminated()


def run(func, args) -> int:
    """Run a command; user errors become one line on stderr and their exit code."""
    try:
        code = func(args)
        sys.stdout.flush()  # a closed pipe fails here, inside the handler, not at interpreter exit
        return code
    except Interrupted as e:
        print(f"featstore: {e}", file=sys.stderr)
        return e.exit_code
    except FeatstoreError as e:
        print(f"featstore: error: {e.cli_message()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("featstore: interrupted", file=sys.stderr)
        return 143 if isinstance(sys.exc_info()[1], Terminated) else 130


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        args = build_parser().parse_args(argv)  # --help prints too
        return run(args.func, args)
    except BrokenPipeError:
        return _closed_pipe()


def _closed_pipe() -> int:
    """The reader of stdout went away (`featstore info STORE | head -2`): stop quietly, as `cat` does. What is
    still buffered would fail again at exit, so stdout is pointed at /dev/null first."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
