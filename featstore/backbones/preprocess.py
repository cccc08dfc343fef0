"""Preprocessing as data: stored in the array attributes, so the transform can be rebuilt from them alone.

torch and torchvision load on the first call, not on import: reading a store's attributes needs neither.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Image -> normalised float tensor [3, H, W].

    resize: square side to resize to (None keeps the image size, as the legacy DINOv2 pipeline does);
    resize_mode "shortest" resizes the shorter side then center-crops to `crop` (CLIP);
    pad_multiple: zero-pad bottom/right after normalisation to a multiple of this (DINOv2: 14).
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int | None = None
    resize_mode: str = "squash"
    crop: int | None = None
    interpolation: str = "bicubic"
    pad_multiple: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def output_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the tensor this produces for an image of size image_hw, without decoding it."""
        h, w = image_hw
        if self.resize is not None:
            if self.resize_mode == "shortest":
                s = self.resize / min(h, w)
                h, w = round(h * s), round(w * s)
            else:
                h = w = self.resize
        if self.crop is not None:
            h, w = min(h, self.crop), min(w, self.crop)
        if self.pad_multiple:
            m = self.pad_multiple
            h, w = math.ceil(h / m) * m, math.ceil(w / m) * m
        return h, w

    def __call__(self, img: Image.Image) -> torch.Tensor:
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        img = img.convert("RGB")
        interp = InterpolationMode(self.interpolation)
        if self.resize is not None:
            size = self.resize if self.resize_mode == "shortest" else [self.resize, self.resize]
            img = F.resize(img, size, interpolation=interp, antialias=True)
        if self.crop is not None:
            img = F.center_crop(img, [self.crop, self.crop])
        # to_tensor + normalize + zero pad in numpy: the same float32 arithmetic as torchvision, without torch's
        # per-op thread-pool overhead (6x slower for one image on 2 cores when run outside DataLoader workers).
        a = np.asarray(img, dtype=np.float32) / np.float32(255)
        a = (a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        h, w = a.shape[:2]
        m = self.pad_multiple or 1
        out = np.zeros((3, h + (-h) % m, w + (-w) % m), dtype=np.float32)
        out[:, :h, :w] = a.transpose(2, 0, 1)
        return torch.from_numpy(out)
