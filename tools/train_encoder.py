#!/usr/bin/env python
"""Train a reference brain encoder on stored features: the guide's `main.py` command line over featstore.encoding.

    python tools/train_encoder.py --subj 1 --saved_feats dinov2q --saved_feats_dir features.zarr \\
        --data_dir DATA --encoder_arch transformer --readout_res rois_all

Features are read lazily from the store (FeatureDataset + DataLoader workers; on CUDA as float16 batches converted
on the device, see --feature_dtype); DATA holds subjXX/ (fMRI, ROI masks,
the image folders the store was extracted from). Writes OUTPUT_PATH/metrics.json (validation r, val_perf),
roi_r.png, checkpoint.pt (the epoch of best val_perf, if one beat 0) and the Algonauts submission files
lh_pred_test.npy / rh_pred_test.npy. The model is the reference's by default; see the README, "Train an encoder".
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from featstore.errors import FeatstoreError, LayoutError
from featstore.flags import ArgumentParser, add_config_args, config_from_args
from featstore.layout import normalize_subj

PROG = "train_encoder"


def build_parser() -> ArgumentParser:
    """The guide's `main.py` flags: the store and subject ones here, the model's and the run's from EncoderConfig
    and TrainConfig (names, defaults and help texts defined once, there)."""
    from featstore.encoding.config import EncoderConfig, TrainConfig
    from featstore.encoding.names import FEATURE_ALIASES

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--subj", default="1", help="subject number, 1 or 01")
    p.add_argument("--saved_feats", default="dinov2q",
                   help=f"stored feature: {', '.join(FEATURE_ALIASES)} (= {', '.join(FEATURE_ALIASES.values())}) or "
                        "any feature name in the store")
    p.add_argument("--saved_feats_dir", required=True, help="the featstore Zarr store")
    p.add_argument("--data_dir", required=True, help="the folder holding subjXX/ (a subject folder itself also works)")
    p.add_argument("--output_path", default=None,
                   help="folder for metrics.json, roi_r.png, checkpoint.pt and the submission files (default: "
                        "checkpoints/subjXX_FEATURE_ARCH_READOUT)")
    add_config_args(p, EncoderConfig)
    add_config_args(p, TrainConfig)
    return p


def subject_dir(data_dir: str, subj: str) -> Path:
    root = Path(data_dir)
    if (root / f"subj{subj}").is_dir():
        return root / f"subj{subj}"
    if (root / "training_split").is_dir():  # the subject folder itself
        return root
    raise LayoutError(f"--data_dir {root}: no subj{subj}/ folder in it (give the folder that holds subj{subj}/)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from featstore.encoding.config import EncoderConfig, TrainConfig
        from featstore.encoding.names import FEATURE_ALIASES
        from featstore.encoding.train import train_encoder

        subj = normalize_subj(args.subj)
        feature = FEATURE_ALIASES.get(args.saved_feats, args.saved_feats)
        out = args.output_path or f"checkpoints/subj{subj}_{feature}_{args.encoder_arch}_{args.readout_res}"
        cfg = config_from_args(TrainConfig, args, store=args.saved_feats_dir, feature=feature, subj=subj,
                               data_dir=subject_dir(args.data_dir, subj), output_path=out,
                               model=config_from_args(EncoderConfig, args))
        result = train_encoder(cfg)
    except FeatstoreError as e:
        print(f"{PROG}: error: {e.cli_message()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    m = {k: ("n/a" if v is None else f"{v:.4f}") if isinstance(v, (float, type(None))) else v
         for k, v in result.metrics.items()}
    print(f"{feature}/{subj} {args.encoder_arch} ({args.readout_res}): validation mean r lh {m['lh_mean_r']} "
          f"rh {m['rh_mean_r']} (median {m['lh_median_r']} / {m['rh_median_r']}), val_perf {m['val_perf']}, best "
          f"epoch {m['best_epoch']}/{m['epochs']}, {m['samples_per_s']} samples/s")
    for path in result.files.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    logging.getLogger("featstore").setLevel(logging.INFO)
    sys.exit(main())
