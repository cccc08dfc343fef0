#!/usr/bin/env python
"""Drop-in for the guide's `extract_features_new.py`: same flags and defaults, crash-safe underneath.

Features stream into a resumable Zarr store (OUTPUT_DIR/featstore.zarr unless --store); when the extraction is
complete the legacy files OUTPUT_DIR/{feature}/{subj}/train.npy and synt.npy are exported from it, so code that does
`np.load(".../dinov2_q_last/01/train.npy")` keeps working. Rerun the same command after a crash to resume.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from featstore.cli import ArgumentParser, add_extract_args, on_sigterm, run, run_extract, setup_logging
from featstore.export import export_npy


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                       conflict_handler="resolve")
    add_extract_args(p)
    # here --output_dir is the guide's folder of .npy files; the store goes inside it
    p.add_argument("--output_dir", required=True,
                   help="folder for the legacy files OUTPUT_DIR/{feature}/{subj}/{train,synt}.npy; the Zarr store "
                        "goes to OUTPUT_DIR/featstore.zarr unless --store is given")
    p.add_argument("--store", default=None, help="the Zarr store (default: OUTPUT_DIR/featstore.zarr)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    npy_dir, args.output_dir = out, args.store or str(out / "featstore.zarr")

    def job(a):
        result = run_extract(a)
        if not result.splits:  # --dry_run: nothing was extracted, nothing to export
            return 0
        if any(s.done_chunks < s.total_chunks for s in result.splits):
            print("this shard is done; the .npy export runs once every shard has finished (rerun without --shard)")
            return 0
        for s in result.splits:  # exactly the arrays of this run (the subject as stored: --subj 1 -> 01)
            feature, subj, split = s.path.split("/")
            for f in export_npy(a.output_dir, npy_dir, feature=feature, subj=subj, split=split):
                print(f"wrote {f}")
        return 0

    return run(job, args)


if __name__ == "__main__":
    setup_logging()
    signal.signal(signal.SIGTERM, on_sigterm)
    sys.exit(main())
