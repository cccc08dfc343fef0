#!/usr/bin/env python
"""Drop-in for the guide's `extract_features_new.py`: same flags and defaults, crash-safe underneath.

Features stream into a resumable Zarr store (default OUTPUT_DIR/featstore.zarr); when the extraction is complete
the legacy files OUTPUT_DIR/{feature}/{subj}/train.npy and synt.npy are exported from it, so code that does
`np.load(".../dinov2_q_last/01/train.npy")` keeps working. Rerun the same command after a crash to resume.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from featstore.cli import _on_sigterm, add_extract_args, run, run_extract
from featstore.export import export_npy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_extract_args(p)
    p.add_argument("--store", default=None, help="Zarr store path (default: OUTPUT_DIR/featstore.zarr)")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    npy_dir, args.output_dir = out, args.store or str(out / "featstore.zarr")

    def job(a):
        result = run_extract(a)
        if any(s.done_chunks < s.total_chunks for s in result.splits):
            print("this shard is done; the .npy export runs once every shard has finished (rerun without --shard)")
            return 0
        for f in export_npy(a.output_dir, npy_dir, feature=result.feature, subj=a.subj):
            print(f"wrote {f}")
        return 0

    return run(job, args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="featstore: %(levelname)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())
