"""What every built backbone shares: the outputs it yields, the forward verbs, provenance, and safe weights loading.

Imported only when a backbone is built (it imports torch); the registry and Preprocess live in torch-free modules.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BadArgumentError, WeightsError, one_line
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .registry import WEIGHTS_HINT, Output, backbone_config, check_weights_arg, feature_name, resolve_layer

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WEIGHTS_HINT",
    "Backbone",
    "Output",
    "Preprocess",
    "check_weights_arg",
    "feature_name",
    "hf_hub_file",
    "load_state_dict_file",
    "load_strict",
    "one_line",
    "resolve_layer",
    "seeded_init",
    "sha256_file",
    "url_reachable",
]


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Backbone:
    """A frozen feature extractor: float images [B,3,H,W] -> float32 tokens [B,T,C] per output, CLS at index 0.

    One model serves every (variant, layer) in `outputs`; preprocessing, token layout, weights and device are
    shared by all of them. Families implement `forward_features` (one pass, up to the deepest block requested) and
    `token_shape`. `weights` is the weights identity recorded in the store: {"kind": "pretrained"|"file"|"random", ...}.
    """

    arch: str
    num_layers: int
    preprocess: Preprocess
    weights: dict[str, Any]
    module: torch.nn.Module = field(repr=False)
    outputs: list[Output]
    cls_index: int = 0

    @property
    def name(self) -> str:
        """The variant (or "a,b" for several), as given to get_backbone."""
        return ",".join(dict.fromkeys(o.backbone for o in self.outputs))

    @property
    def layers(self) -> list[int]:
        """The blocks whose outputs are taken, ascending."""
        return sorted({o.layer for o in self.outputs})

    def _single(self, what: str) -> Output:
        if len(self.outputs) != 1:
            raise BadArgumentError(
                f"{what} needs a backbone with one output; this one has {len(self.outputs)} "
                f"({', '.join(o.feature for o in self.outputs)}): use forward_features(x) / describe(feature)"
            )
        return self.outputs[0]

    @property
    def layer(self) -> int:
        return self._single("backbone.layer").layer

    @property
    def feature(self) -> str:
        return self._single("backbone.feature").feature

    def output(self, feature: str | None = None) -> Output:
        """The output stored under `feature` (default: the only one)."""
        if feature is None:
            return self._single("describe()")
        for o in self.outputs:
            if o.feature == feature:
                return o
        raise BadArgumentError(f"{feature!r} is not an output of this backbone ({', '.join(o.feature for o in self.outputs)})")

    def to(self, device: str | torch.device) -> Backbone:
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def token_shape(self, input_hw: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
        """(T, C, grid) of every output for a preprocessed input of size input_hw."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """feature name -> float32 [B, T, C] for every output, from one forward pass."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens of a single-output backbone (the legacy call)."""
        return self.forward_features(x)[self._single("backbone(x)").feature]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def describe(self, feature: str | None = None) -> dict[str, Any]:
        """Provenance of one output, written into the store's attributes (JSON-serialisable)."""
        o = self.output(feature)
        return {
            "backbone": o.backbone,
            "arch": self.arch,
            "layer": o.layer,
            "num_layers": self.num_layers,
            "weights": self.weights,
            "preprocess": self.preprocess.to_dict(),
            "head": backbone_config(o.backbone).head,
        }


def seeded_init(seed: int) -> torch.Generator:
    """Random-weights runs are reproducible: the model is built under this seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


# ---- weights files: shared by the families, so every backbone loads checkpoints the same (safe) way ----


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """Quick TCP check (via the configured proxy, if any) so an offline run fails in seconds.

    The hubs' own clients have no fail-fast setting short of being told they are offline (HF_HUB_OFFLINE, which
    hf_hub_file honours): without a network huggingface_hub 2.4 retries a HEAD five times with back-off (24 s
    measured), and torch.hub's urllib download has no timeout at all.
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
    if constants.HF_HUB_OFFLINE:
        raise OSError("HF_HUB_OFFLINE is set and the file is not in the cache")
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
