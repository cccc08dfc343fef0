#!/usr/bin/env python
"""Train a reference brain encoder on stored features: the guide's `main.py` command line over featstore.encoding.

    python tools/train_encoder.py --subj 1 --saved_feats dinov2q --saved_feats_dir features.zarr \\
        --data_dir DATA --encoder_arch transformer --readout_res rois_all

Features are read lazily from the store (FeatureDataset + DataLoader workers); DATA holds subjXX/ (fMRI, ROI masks,
the image folders the store was extracted from). Writes OUTPUT_PATH/metrics.json (validation r, val_perf),
roi_r.png, checkpoint.pt (the epoch of best val_perf, if one beat 0) and the Algonauts submission files
lh_pred_test.npy / rh_pred_test.npy. The model is the reference's by default; see the README, "Train an encoder".
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from featstore.cli import ArgumentParser
from featstore.errors import FeatstoreError, LayoutError
from featstore.layout import normalize_subj

PROG = "train_encoder"


def build_parser() -> ArgumentParser:
    from featstore.encoding.names import ENCODER_ARCHS, FEATURE_ALIASES, POSITION_EMBEDDINGS
    from featstore.encoding.rois import READOUTS

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--subj", default="1", help="subject number, 1 or 01")
    p.add_argument("--saved_feats", default="dinov2q",
                   help=f"{'|'.join(FEATURE_ALIASES)} (= {', '.join(FEATURE_ALIASES.values())}) or any stored feature")
    p.add_argument("--saved_feats_dir", required=True, help="the featstore Zarr store")
    p.add_argument("--data_dir", required=True, help="the folder holding subjXX/ (a subject folder itself also works)")
    p.add_argument("--encoder_arch", default="transformer", choices=ENCODER_ARCHS)
    p.add_argument("--readout_res", default="rois_all", choices=tuple(READOUTS))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr_drop", type=int, default=100, help="halve the learning rate every LR_DROP epochs (StepLR)")
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--clip_max_norm", type=float, default=0.1, help="gradient clipping (0: none)")
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers reading the store")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    p.add_argument("--output_path", default=None,
                   help="results folder (default: checkpoints/subjXX_FEATURE_ARCH_READOUT)")
    p.add_argument("--enc_layers", type=int, default=0, help="transformer encoder layers over the grid")
    p.add_argument("--enc_output_layer", type=int, default=-1,
                   help="which encoder layer feeds the decoder, a Python index (-1: the last); with --enc_layers > 0")
    p.add_argument("--dec_layers", type=int, default=1)
    p.add_argument("--nheads", type=int, default=16)
    p.add_argument("--hidden_dim", type=int, default=768)
    p.add_argument("--dim_feedforward", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--pre_norm", type=int, default=1, choices=(0, 1),
                   help="1: LayerNorm before each attention/FFN block (the reference default); 0: after")
    p.add_argument("--position_embedding", default="sine", choices=POSITION_EMBEDDINGS,
                   help="positions of the feature grid: DETR's 2-D sine encoding, or learned row/column embeddings")
    p.add_argument("--query_self_attn", action="store_true",
                   help="add self-attention among the queries to each decoder layer (DETR's layer; not the reference)")
    p.add_argument("--resume", default=None, metavar="FILE",
                   help="start from these weights: a featstore checkpoint.pt or the reference's checkpoint.pth")
    p.add_argument("--val_fraction", type=float, default=0.1, help="validation share of the training images")
    p.add_argument("--shuffle_targets", action="store_true",
                   help="control run: permute the training targets across images (validation r should be ~0)")
    p.add_argument("--no_progress", action="store_true", help="no per-epoch progress bars")
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
        from featstore.encoding.models import EncoderConfig
        from featstore.encoding.names import FEATURE_ALIASES
        from featstore.encoding.train import TrainConfig, train_encoder

        subj = normalize_subj(args.subj)
        feature = FEATURE_ALIASES.get(args.saved_feats, args.saved_feats)
        out = args.output_path or f"checkpoints/subj{subj}_{feature}_{args.encoder_arch}_{args.readout_res}"
        model = EncoderConfig(
            encoder_arch=args.encoder_arch, readout_res=args.readout_res, hidden_dim=args.hidden_dim,
            nheads=args.nheads, dec_layers=args.dec_layers, enc_layers=args.enc_layers,
            dim_feedforward=args.dim_feedforward, dropout=args.dropout, pre_norm=args.pre_norm,
            position_embedding=args.position_embedding, enc_output_layer=args.enc_output_layer,
            query_self_attn=args.query_self_attn,
        )
        cfg = TrainConfig(
            store=args.saved_feats_dir, data_dir=subject_dir(args.data_dir, subj), feature=feature, subj=subj,
            model=model, output_path=out, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
            lr_drop=args.lr_drop, weight_decay=args.weight_decay, clip_max_norm=args.clip_max_norm,
            num_workers=args.num_workers, seed=args.seed, device=args.device, val_fraction=args.val_fraction,
            shuffle_targets=args.shuffle_targets, resume=args.resume, progress=not args.no_progress,
        )
        result = train_encoder(cfg)
    except FeatstoreError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
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
