"""ExtractConfig: everything an extraction is configured by, the single source of the `featstore extract` flags
(names, defaults and help texts: the CLI builds its parser from these fields)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..backbones import check_layer_spec, check_weights_arg, get_backbone, list_backbones, parse_backbones
from ..errors import BadArgumentError
from ..flags import flag
from ..layout import normalize_subj
from ..storage import CODECS, DEFAULT_CODEC, keepbits
from .precision import PRECISIONS

if TYPE_CHECKING:
    from ..backbones import Backbone

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")


@dataclass
class ExtractConfig:
    """Everything an extraction run is configured by: the `featstore extract` flags, in Python. Fields made with
    `flag()` are flags of the same name (the CLI builds them from here); the others are Python-only."""

    subj: str = flag("01", "subject id: 1, 01 or subj01")
    backbone: str | list[str] | Backbone = flag(
        "dinov2_q", f"one of {', '.join(list_backbones())}, or variants sharing one model, e.g. dinov2_q,dinov2")
    # (in Python also a built Backbone)
    batch_size: int = flag(16, "images per forward pass")
    device: str = flag("cuda", "cuda (falls back to cpu with a warning), cuda:N or cpu; with --shard auto, cuda "
                       "means cuda:LOCAL_RANK")
    enc_layer: int | str | list[int] = flag(
        -1, "block index, negative from the end; a list (-1,-4,6), a range (0:12) or all", type=str,
        negative_numbers=True)
    weights: str = flag("pretrained", "pretrained, random (seeded, recorded as such), or a checkpoint PATH")
    arch: str | None = flag(None, "override the architecture (a timm/open_clip name, or 'tiny' for smoke tests; "
                                   "tiny-dN: N blocks)")
    image_size: int | None = flag(None, "resize DINOv2 input to this square size (default: none, 425 -> padded 434)")
    dtype: str = flag("float16", "stored dtype", choices=("float16", "float32"))
    precision: str = flag("float32", "dtype of the forward pass: float32 (on CUDA with TF32 off: the reference), or "
                          "bfloat16/float16 under torch.autocast (GPUs: faster; its error vs float32 on the first batch "
                          "is recorded in the array's provenance)", choices=PRECISIONS)
    chunk: int = flag(1, "samples per storage chunk")
    pack: int = flag(1, "chunks per stored object (Zarr sharding), for object storage; 1: no packing")
    codec: str | None = flag(None, f"chunk compression of new arrays, always followed by a crc32c checksum: "
                             f"{', '.join(CODECS)} (lossless), or bitround-K (lossy: K mantissa bits kept, 1..10 "
                             f"for float16, 1..23 for float32, then lz4-bitshuffle) (default {DEFAULT_CODEC}; an "
                             f"existing array resumes in its own codec unless this is given)", metavar="CODEC")
    num_workers: int = flag(2, "image-decoding DataLoader workers")
    shard: str | tuple[int, int] | None = flag(
        None, "K/N: fill only share K (0-based) of N, for parallel writers; auto: from SLURM/torchrun variables")
    overwrite: bool = flag(False, "start an array over when its configuration changed (says what it discards)")
    splits: list[str] | None = None  # only these splits (default: every split with images)
    seed: int = flag(0, "seed for --weights random")
    durable: bool = flag(True, "skip fsync before marking chunks done (faster, not power-loss safe)", flag="no_fsync",
                         negate=True)
    progress: bool = True
    storage_options: dict[str, Any] | None = None  # fsspec options of a URL store (the CLI's --storage_options JSON)
    queue_mb: int = 512  # bytes of computed rows the writer may hold before the forward pass waits

    def validate(self) -> ExtractConfig:
        """Every check that needs no model, so that a wrong flag fails at once (and before torch is imported)."""
        if self.dtype not in DTYPES:
            raise BadArgumentError(f"{self.dtype!r}: choose float16 or float32", param="dtype")
        if self.precision not in PRECISIONS:
            raise BadArgumentError(f"{self.precision!r}: choose {', '.join(PRECISIONS)}", param="precision")
        for name in ("batch_size", "chunk", "pack"):
            if int(getattr(self, name)) < 1:
                raise BadArgumentError(f"{getattr(self, name)}: must be >= 1", param=name)
        if self.num_workers < 0:
            raise BadArgumentError(f"{self.num_workers}: must be >= 0", param="num_workers")
        if self.codec is not None:
            keepbits(self.codec, self.dtype)  # names the flag when unknown, or K out of range for the dtype
        if isinstance(self.backbone, (str, list, tuple)):  # else a built Backbone
            parse_backbones(self.backbone)  # unknown names and unshareable mixes fail before anything is printed
            check_layer_spec(self.enc_layer)
            check_weights_arg(self.weights, self.arch)
        return replace(self, subj=normalize_subj(self.subj))

    def build_backbone(self, *, shapes_only: bool = False) -> Backbone:
        """The configured backbone (or the one given built), saying loudly when its weights are random; `shapes_only`
        (a dry run): random weights, nothing said, as only the token shapes are used."""
        if not isinstance(self.backbone, (str, list, tuple)):  # already built
            return self.backbone
        bb = get_backbone(self.backbone, layer=self.enc_layer, weights="random" if shapes_only else self.weights,
                          arch=self.arch, seed=self.seed, image_size=self.image_size)
        if not shapes_only and bb.weights.get("kind") == "random":
            log.warning("using RANDOM weights (seed %s) for %s: features are not pretrained", bb.weights.get("seed"),
                        bb.name)
        return bb
