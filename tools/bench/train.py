"""train: the transformer brain encoder's training steps fed from the store (FeatureDataset + DataLoader workers) vs
from an in-RAM tensor of the same data, same batches. Information on a CPU (not counted): the loader workers and the
step share the same cores; the `loader` row (read group) measures what the loader delivers."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import BATCH, FEATURE, GRID, SPLIT, SUBJ, C, ensure_read_store, log, meta, row, unavailable

TRAIN_VERTICES = (1000, 1000)  # per hemisphere; few, so that the readout does not hide the loader
TRAIN_MODEL = {"hidden_dim": 32, "nheads": 2, "dim_feedforward": 64, "dropout": 0.0}  # tiny: the loader shows


def _train_subject(ctx) -> Path:
    """A subject folder for the read store: its image names (empty files: the Dataset checks names only) and random
    fMRI rows."""
    subj = ctx.dir / "train-subj"
    if not subj.exists():
        images, fmri = subj / "training_split" / "training_images", subj / "training_split" / "training_fmri"
        images.mkdir(parents=True)
        fmri.mkdir(parents=True)
        for name in meta(ctx.n)["image_names"]:
            (images / name).touch()
        rng = np.random.default_rng(0)
        for hemi, v in zip(("lh", "rh"), TRAIN_VERTICES):
            np.save(fmri / f"{hemi}_training_fmri.npy", rng.standard_normal((ctx.n, v), dtype=np.float32))
    return subj


def _train_pass(batches, readout, seed: int) -> tuple[float, int]:
    """Seconds and samples of featstore.encoding's training steps after the first batch (warm-up, worker start)."""
    import torch

    from featstore.encoding import EncoderConfig, TransformerBrainEncoder, train_one_epoch

    torch.manual_seed(seed)
    model = TransformerBrainEncoder(C, readout, EncoderConfig(**TRAIN_MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    it = iter(batches)
    train_one_epoch(model, [next(it)], opt, torch.device("cpu"))
    stats = train_one_epoch(model, it, opt, torch.device("cpu"))
    return stats.seconds, stats.samples


def rows_train(ctx) -> list[dict]:
    """The transformer brain encoder's training step fed from the store through FeatureDataset + 2 DataLoader workers
    vs fed from an in-RAM float32 tensor of the same samples; same batches, same model init, CPU."""
    target = ">= 0.9x in-RAM training throughput (information on a CPU)"
    try:
        import torch
        from torch.utils.data import DataLoader

        from featstore.dataset import FeatureDataset
        from featstore.encoding import SubjectRois, channels_last_collate, make_readout
        from featstore.sample import ROI_MAPPINGS, sample_rois
    except Exception as e:  # noqa: BLE001 - the encoding package may not be installed
        return [unavailable("train", target, f"featstore.encoding: {e}")]
    store, _ = ensure_read_store(ctx)
    n, subj = ctx.n, _train_subject(ctx)
    nv = dict(zip(("lh", "rh"), TRAIN_VERTICES))
    rois = SubjectRois({h: sample_rois(nv[h], 0, SUBJ, h) for h in nv}, {c: dict(m) for c, m in ROI_MAPPINGS.items()})
    readout = make_readout("rois_all", nv, rois)
    ds = FeatureDataset(store, FEATURE, SUBJ, SPLIT, data_dir=subj)
    log(f"train: an in-RAM float32 copy of the {n} samples ({n * C * GRID[0] * GRID[1] * 4 / 1e9:.2f} GB)")
    ram = channels_last_collate([ds[i][0] for i in range(n)])  # the batches' layout, so both sides compute alike
    targets = {f"{h}_f": torch.from_numpy(np.load(subj / "training_split" / "training_fmri" / f"{h}_training_fmri.npy"))
               for h in nv}
    order = [int(i) for i in np.random.default_rng(3).permutation(n)]

    def ram_batches():
        for a in range(0, n, BATCH):
            idx = torch.tensor(order[a : a + BATCH])
            yield ram[idx], {k: v[idx] for k, v in targets.items()}

    best = {"store": np.inf, "ram": np.inf}
    for r in range(ctx.reps):
        for side in ("store", "ram"):
            log(f"train: {side}, {n} samples in batches of {BATCH} (rep {r + 1}/{ctx.reps})")
            batches = (DataLoader(ds, batch_size=BATCH, sampler=order, num_workers=2,
                                  collate_fn=channels_last_collate) if side == "store" else ram_batches())
            s, k = _train_pass(batches, readout, seed=r)
            best[side] = min(best[side], s / max(k, 1))
    fs_rate, ram_rate = 1 / best["store"], 1 / best["ram"]
    ratio = fs_rate / ram_rate
    params = sum(p.numel() for p in _model_params(readout))
    return [row("train", ratio, target, (">=", 0.9), f"{fs_rate:.0f} samples/s", f"in-RAM {ram_rate:.0f} samples/s",
                f"TransformerBrainEncoder (hidden 32, 2 heads, rois_all readout, {readout.num_queries} queries, "
                f"{TRAIN_VERTICES[0]}+{TRAIN_VERTICES[1]} vertices, {params} parameters) on (768, 31, 31) float32 "
                f"inputs, AdamW + clipping, torch's default threads; store side: FeatureDataset(data_dir=...) + "
                f"DataLoader(num_workers=2, batch_size={BATCH}, channels-last collate, as train_encoder); in-RAM "
                "side: index a preloaded channels-last tensor; steady state after the first batch; information: "
                "on 2 CPU cores the loader workers and the training step share the cores (the loader row counts)",
                counted=False, featstore_rate=fs_rate, baseline_rate=ram_rate)]


def _model_params(readout):
    from featstore.encoding import EncoderConfig, TransformerBrainEncoder

    return TransformerBrainEncoder(C, readout, EncoderConfig(**TRAIN_MODEL)).parameters()


