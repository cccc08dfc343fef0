"""`--precision`: the dtype the backbone's forward pass computes in, and what a half precision costs.

float32 is the reference: on CUDA, TF32 is switched off while extraction runs, so float32 matrix products are IEEE
float32 (TF32 keeps 10 mantissa bits; cuDNN enables it by default, which reaches the patch-embedding convolution).
bfloat16 / float16 run the forward pass under `torch.autocast`; the first batch of a new array is also run in float32
(one extra forward pass per run that creates or first fills the array) and the difference of the stored values is
recorded in the array's provenance (`precision_error`), so a reader knows the price of the speed.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import BadArgumentError, one_line

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16", "float16")

_tf32_lock = threading.Lock()
_tf32_depth = 0
_tf32_saved: tuple[bool, bool] | None = None


def check_precision(precision: str, dev: torch.device) -> None:
    """A one-line error where `dev` cannot run `precision`, a warning where it runs but slowly; before any forward."""
    import torch

    if precision not in PRECISIONS:
        raise BadArgumentError(f"{precision!r}: choose {', '.join(PRECISIONS)}", param="precision")
    if precision == "float32":
        return
    if not torch.amp.is_autocast_available(dev.type):
        raise BadArgumentError(f"{precision}: torch has no autocast on {dev.type} devices; use --precision float32",
                               param="precision")
    if dev.type == "cuda" and precision == "bfloat16" and not _cuda_bf16(dev):
        raise BadArgumentError(f"bfloat16: {torch.cuda.get_device_name(dev)} has no bfloat16 arithmetic; use "
                               "--precision float16", param="precision")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(dev.type, dtype=getattr(torch, precision)):
                pass
        except (RuntimeError, ValueError) as e:
            raise BadArgumentError(f"{precision}: autocast cannot run on {dev} ({one_line(e)}); use --precision "
                                   "float32", param="precision") from None
    disabled = [w for w in caught if "autocast" in str(w.message).lower()]
    if disabled:  # torch turns autocast off with a warning for a dtype the device lacks: never silently float32
        raise BadArgumentError(f"{precision}: autocast cannot run on {dev} ({str(disabled[0].message).strip()}); "
                               "use --precision float32", param="precision")
    if dev.type == "cpu" and precision == "float16":
        log.warning("--precision float16 on the CPU is slower than float32 (no float16 matrix units); bfloat16 is "
                    "the CPU's half precision")


def _cuda_bf16(dev: torch.device) -> bool:
    import torch

    with torch.cuda.device(dev):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no emulation argument
            return bool(torch.cuda.is_bf16_supported())


@contextlib.contextmanager
def no_tf32(dev: torch.device) -> Iterator[None]:
    """TF32 off on CUDA for the extraction's duration (float32 stays float32), restored when the last concurrent
    extraction of this process ends; nothing changes on other devices."""
    global _tf32_depth, _tf32_saved
    if dev.type != "cuda":
        yield
        return
    import torch

    with _tf32_lock:
        if _tf32_depth == 0:
            _tf32_saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        _tf32_depth += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_depth -= 1
            if _tf32_depth == 0 and _tf32_saved is not None:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _tf32_saved


def autocast(precision: str, dev: torch.device):
    """The context the forward pass runs in: nothing for float32, torch.autocast to the half dtype otherwise."""
    import torch

    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=getattr(torch, precision))


def precision_error(half: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], stored: torch.dtype,
                    precision: str, dev: torch.device) -> dict[str, dict[str, Any]]:
    """{feature: error record} of a half-precision forward pass against the float32 one of the same images, both
    rounded to the stored dtype first (the difference a reader of the two arrays would see). Relative errors are per
    token vector, |a - r| / |r| (L2 over channels), so near-zero channels do not blow them up; absolute errors are
    per value."""
    import torch

    out = {}
    for feature, y in half.items():
        a = y.to(stored).float()
        r = ref[feature].to(stored).float()
        d = (a - r).abs()
        rel = torch.linalg.vector_norm(a - r, dim=-1) / torch.linalg.vector_norm(r, dim=-1).clamp_min(1e-30)
        out[feature] = {
            "precision": precision, "reference": "float32" + (" (TF32 off)" if dev.type == "cuda" else ""),
            "images": int(y.shape[0]), "device": _device_label(dev), "compared": f"stored {str(stored)[6:]} values",
            "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "max_rel": float(rel.max()), "mean_rel": float(rel.mean()),
        }
    return out


def _device_label(dev: torch.device) -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else dev.type


def error_line(path: str, e: Mapping[str, Any]) -> str:
    """One line of a recorded precision error, for logs and `featstore info`."""
    return (f"{path}: {e['precision']} vs {e['reference']} on the first {e['images']} images ({e['device']}, "
            f"{e['compared']}): relative error per token max {e['max_rel']:.2g}, mean {e['mean_rel']:.2g}; "
            f"absolute max {e['max_abs']:.2g}, mean {e['mean_abs']:.2g}")
