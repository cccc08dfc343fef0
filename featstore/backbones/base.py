"""What every backbone shares: preprocessing as data, the layer resolver, the token layout, feature names."""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import BadArgumentError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Legacy feature names for the last layer; other layers are "{backbone}_layer{k}".
LEGACY_LAST = {"dinov2_q": "dinov2_q_last", "dinov2": "dinov2_last", "clip": "clip_vit_512"}


@dataclass(frozen=True)
class Preprocess:
    """Image -> normalised float tensor [3, H, W]; stored in the array attributes so it can be rebuilt.

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


def resolve_layer(layer: int, num_layers: int) -> int:
    """The one place a layer index is interpreted: negative counts from the end, as timm does."""
    k = layer + num_layers if layer < 0 else layer
    if not 0 <= k < num_layers:
        raise BadArgumentError(
            f"--enc_layer {layer} is out of range for a backbone with {num_layers} blocks "
            f"(use 0..{num_layers - 1} or -1..-{num_layers})"
        )
    return k


def feature_name(backbone: str, layer: int, num_layers: int) -> str:
    """Store/legacy feature folder name: the legacy name for the last layer, else {backbone}_layer{k}."""
    k = resolve_layer(layer, num_layers)
    if k == num_layers - 1 and backbone in LEGACY_LAST:
        return LEGACY_LAST[backbone]
    return f"{backbone}_layer{k}"


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Backbone:
    """A frozen feature extractor: float images [B,3,H,W] -> float32 tokens [B,T,C], CLS at index 0.

    Subclasses set `module` (the torch model, eval mode) and implement `forward` and `token_shape`.
    `weights` is the weights identity recorded in the store: {"kind": "pretrained"|"file"|"random", ...}.
    """

    name: str
    arch: str
    layer: int  # resolved, non-negative
    num_layers: int
    preprocess: Preprocess
    weights: dict[str, Any]
    module: torch.nn.Module = field(repr=False)
    cls_index: int = 0

    @property
    def feature(self) -> str:
        return feature_name(self.name, self.layer, self.num_layers)

    def to(self, device: str | torch.device) -> Backbone:
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def token_shape(self, input_hw: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
        """(T, C, grid) of the output for a preprocessed input of size input_hw."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def describe(self) -> dict[str, Any]:
        """Provenance written into the store's attributes (JSON-serialisable)."""
        return {
            "backbone": self.name,
            "arch": self.arch,
            "layer": self.layer,
            "num_layers": self.num_layers,
            "weights": self.weights,
            "preprocess": self.preprocess.to_dict(),
        }


def seeded_init(seed: int) -> torch.Generator:
    """Random-weights runs are reproducible: the model is built under this seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


# ---- weights files: shared by the families, so every backbone loads checkpoints the same (safe) way ----


def one_line(exc: BaseException) -> str:
    """First line of an exception message, for the one-line user errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """Quick TCP check (via the configured proxy, if any) so an offline run fails in seconds.

    Hub clients retry with back-off for minutes, and urllib has no timeout, when there is no network.
    """
    import socket
    import urllib.request
    from urllib.parse import urlparse

    u = urlparse(url)
    proxy = urllib.request.getproxies().get(u.scheme)
    if proxy and not urllib.request.proxy_bypass(u.hostname or ""):
        u = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = u.port or (443 if u.scheme == "https" else 80)
    if not u.hostname:
        return False
    try:
        with socket.create_connection((u.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hf_hub_file(repo_id: str, filenames: list[str], download: Any = None) -> str:
    """Local path of the first of `filenames` in a Hugging Face hub repo: the cache first, then a download
    (`download()` if given, e.g. the model library's own downloader, else hf_hub_download of each file name).

    Raises OSError with a short reason when none can be had (offline, missing repo/file).
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    for fn in filenames:
        cached = try_to_load_from_cache(repo_id, fn)
        if isinstance(cached, str) and Path(cached).is_file():
            return cached
    if not url_reachable(constants.ENDPOINT):
        raise OSError(f"{constants.ENDPOINT} is unreachable")
    if download is not None:
        try:
            return str(download())
        except Exception as e:  # the library's message, as one line
            raise OSError(one_line(e)) from e
    last: Exception | None = None
    for fn in filenames:
        try:
            return hf_hub_download(repo_id, fn)
        except Exception as e:  # noqa: BLE001 - try the next file name, report the last failure
            last = e
    raise OSError(one_line(last) if last else f"no file in {repo_id}")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file without running pickled code.

    *.safetensors via safetensors; else torch.load(weights_only=True); a TorchScript archive (the original
    OpenAI CLIP files) via torch.jit.load, which restores tensors and TorchScript code but no pickled Python.
    Unwraps {"state_dict": ...} / {"model": ...} containers and a "module." prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            import zipfile

            scripted = False
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as z:
                    scripted = any(n.endswith("constants.pkl") for n in z.namelist())
            if scripted:
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any decoder error means a bad weights file for the user
        raise WeightsError(f"cannot load weights file {path}: {one_line(e)}") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with a one-line WeightsError naming the source and the first mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise WeightsError(f"weights {source} do not match the architecture; " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)
