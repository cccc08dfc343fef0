"""The training configuration (the flags of `tools/train_encoder.py`, in Python): the model (EncoderConfig) and the
run (TrainConfig). Importable without torch, so the tool builds its parser, and refuses a mistyped flag, at once."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import BadArgumentError
from ..flags import flag
from .names import ENCODER_ARCHS, POSITION_EMBEDDINGS
from .rois import READOUTS

FEATURE_DTYPES = ("auto", "float16", "float32")


@dataclass(frozen=True)
class EncoderConfig:
    """Model hyper-parameters, named and defaulted as the reference `main.py` flags.

    pre_norm: 1 normalises before each block (the reference default), 0 after. enc_output_layer: which of the
    enc_layers transformer encoder layers feeds the decoder (a Python index, -1 the last). query_self_attn: add
    DETR's self-attention among the queries to every decoder layer (not in the reference; off by default).
    """

    encoder_arch: str = flag("transformer", "the reference transformer brain encoder, or the linear baseline",
                             choices=ENCODER_ARCHS)
    readout_res: str = flag("rois_all", "which ROIs get a query (see the README)", choices=tuple(READOUTS))
    hidden_dim: int = flag(768, "transformer width")
    nheads: int = flag(16, "attention heads")
    dec_layers: int = flag(1, "decoder layers")
    enc_layers: int = flag(0, "transformer encoder layers over the grid")
    dim_feedforward: int = flag(1024, "feed-forward width")
    dropout: float = flag(0.1, "dropout")
    pre_norm: int = flag(1, "1: normalise before each block (the reference), 0: after", choices=(0, 1))
    position_embedding: str = flag("sine", "positions of the grid: DETR's 2-D sine encoding or learned",
                                   choices=POSITION_EMBEDDINGS)
    enc_output_layer: int = flag(-1, "with --enc_layers N: the encoder layer that feeds the decoder (-1: the last)",
                                 negative_numbers=True)
    query_self_attn: bool = flag(False, "add self-attention among the queries (not in the reference; off by default)")
    linear_channels: int = 256  # the linear baseline's 3x3 convolution

    def check(self) -> EncoderConfig:
        if self.encoder_arch not in ENCODER_ARCHS:
            raise BadArgumentError(f"{self.encoder_arch!r}: choose one of {', '.join(ENCODER_ARCHS)}", param="encoder_arch")
        if self.readout_res not in READOUTS:
            raise BadArgumentError(f"{self.readout_res!r}: choose one of {', '.join(READOUTS)}", param="readout_res")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise BadArgumentError(
                f"--position_embedding {self.position_embedding!r}: choose one of {', '.join(POSITION_EMBEDDINGS)}"
            )
        if self.pre_norm not in (0, 1):
            raise BadArgumentError(f"must be 0 or 1, got {self.pre_norm!r}", param="pre_norm")
        for name in ("hidden_dim", "nheads", "dec_layers", "dim_feedforward", "linear_channels"):
            if int(getattr(self, name)) < 1:
                raise BadArgumentError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.enc_layers < 0:
            raise BadArgumentError(f"must be >= 0, got {self.enc_layers}", param="enc_layers")
        if self.enc_layers and not -self.enc_layers <= self.enc_output_layer < self.enc_layers:
            raise BadArgumentError(
                f"--enc_output_layer {self.enc_output_layer}: with --enc_layers {self.enc_layers} give "
                f"0..{self.enc_layers - 1} (or -{self.enc_layers}..-1 from the end)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise BadArgumentError(f"must be in [0, 1), got {self.dropout}", param="dropout")
        quarter = self.position_embedding == "sine"
        if self.encoder_arch == "transformer" and (self.hidden_dim % self.nheads or self.hidden_dim % (4 if quarter else 2)):
            why = ("the 2-D sine encoding gives a quarter of the channels to each of sin y, cos y, sin x, cos x"
                   if quarter else "the learned encoding gives half the channels to rows, half to columns")
            raise BadArgumentError(
                f"--hidden_dim {self.hidden_dim} must be a multiple of --nheads ({self.nheads}) and of "
                f"{4 if quarter else 2} ({why})"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig:
    """One training run. store/feature/subj pick the array, data_dir is the subject folder (fMRI, ROI masks)."""

    store: str | Path
    data_dir: str | Path
    feature: str = "dinov2_q_last"
    subj: str | int = "01"  # 1, 01 and subj01 all name subject 01
    model: EncoderConfig = field(default_factory=EncoderConfig)
    output_path: str | Path | None = None  # metrics.json, roi_r.png, checkpoint.pt, {lh,rh}_pred_test.npy
    batch_size: int = flag(16, "samples per step")
    epochs: int = flag(15, "training epochs")
    lr: float = flag(5e-4, "AdamW learning rate")
    lr_drop: int = flag(100, "halve the learning rate every LR_DROP epochs (StepLR)")
    weight_decay: float = flag(1e-4, "AdamW weight decay")
    clip_max_norm: float = flag(0.1, "gradient clipping (0: none)")
    num_workers: int = flag(4, "DataLoader workers reading the store (capped at the CPU count)")
    feature_dtype: str = flag("auto", "dtype of the features the loader delivers: float16 (the stored values, half "
                              "the bytes to pin and copy; converted to float32 on the device) or float32; auto: "
                              "float16 on CUDA, float32 otherwise", choices=FEATURE_DTYPES)
    seed: int = flag(0, "seed of the model's initialisation and the batch order")
    device: str | None = flag(None, "cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    val_fraction: float = flag(0.1, "validation share of the training images")
    shuffle_targets: bool = flag(False, "control run: training targets permuted across images (validation r should be ~0)")
    resume: str | Path | None = flag(None, "start from these weights (a featstore or reference checkpoint)",
                                     metavar="FILE")
    progress: bool = flag(True, "no per-epoch progress bars", flag="no_progress", negate=True)

    def check(self) -> TrainConfig:
        for name, low in (("batch_size", 1), ("epochs", 1), ("num_workers", 0), ("lr_drop", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise BadArgumentError(f"--{name} must be an integer >= {low}, got {v!r}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise BadArgumentError(f"{self.feature_dtype!r}: choose one of {', '.join(FEATURE_DTYPES)}",
                                   param="feature_dtype")
        if not self.lr > 0 or self.weight_decay < 0 or self.clip_max_norm < 0:
            raise BadArgumentError("must be > 0, --weight_decay and --clip_max_norm >= 0", param="lr")
        self.model.check()
        return self

    def loader_dtype(self, device_type: str) -> str:
        """The dtype the loader delivers on this device: on CUDA the copy to the device is what float16 halves
        (the model converts on the device); on a CPU there is no copy to save, so auto keeps float32 results."""
        if self.feature_dtype != "auto":
            return self.feature_dtype
        return "float16" if device_type == "cuda" else "float32"
