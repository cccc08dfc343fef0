"""Trained weights into featstore's encoders: featstore's own `checkpoint.pt` and the reference training code's
`checkpoint.pth` (`{"model": state_dict, "args": argparse.Namespace, "optimizer", "lr_scheduler", "epoch", ...}`).

Files are read with `torch.load(weights_only=True)`: tensors and plain values only, plus the few classes a reference
checkpoint holds, allowed through torch's safe-globals mechanism (`argparse.Namespace` for its `args`, numpy's scalar
constructor and dtypes for its numpy `val_perf`), never an unrestricted unpickle. The reference's state dict names
its modules differently (`lh_embed.0.*`, `transformer.decoder.layers.N.multihead_attn.*`, ...) and carries tensors
featstore's model does not have (the unused query self-attention, `norm2` under pre-norm, `memory_proj`, the frozen
backbone); keys are mapped, the extras ignored and named in one log line.
"""
from __future__ import annotations

import argparse
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import BadArgumentError, one_line
from .models import EncoderConfig

log = logging.getLogger(__name__)

# settings compared between a checkpoint and the model it is loaded into (dropout only matters for training)
ARCH_FIELDS = ("encoder_arch", "readout_res", "hidden_dim", "nheads", "dec_layers", "enc_layers", "dim_feedforward",
               "pre_norm", "position_embedding", "query_self_attn", "enc_output_layer", "linear_channels")
LINEAR_FIELDS = ("encoder_arch", "linear_channels")
# the reference's args that name the same settings (its enc_output_layer picks a backbone block, so it is not one)
REFERENCE_FIELDS = ("encoder_arch", "readout_res", "hidden_dim", "nheads", "dec_layers", "enc_layers",
                    "dim_feedforward", "pre_norm", "position_embedding")
_RENAMES = (  # reference state-dict key -> featstore's
    (re.compile(r"^(lh|rh)_embed\.0\.(.+)$"), r"\1_embed.\2"),
    (re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$"), r"encoder.\1.\2"),
    (re.compile(r"^transformer\.encoder\.norm\.(.+)$"), r"enc_norm.\1"),
    (re.compile(r"^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.(.+)$"), r"decoder.\1.cross_attn.\2"),
    (re.compile(r"^transformer\.decoder\.layers\.(\d+)\.(.+)$"), r"decoder.\1.\2"),
    (re.compile(r"^transformer\.decoder\.norm\.(.+)$"), r"dec_norm.\1"),
    (re.compile(r"^backbone_model\.1\.(row_embed|col_embed)\.(.+)$"), r"position.\1.\2"),
)
_BACKBONE = "backbone_model.0."


@dataclass
class LoadedCheckpoint:
    """What load_checkpoint read: the file's layout ("featstore" or "reference"), its epoch, the settings it was
    trained with (the reference's args, or featstore's model config) and the keys left out."""

    path: Path
    layout: str
    epoch: int | None
    settings: dict = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def _safe_globals() -> list:
    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    allowed: list = [argparse.Namespace, np.dtype, (scalar, "numpy.core.multiarray.scalar"),
                     (scalar, "numpy._core.multiarray.scalar")]
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np.dtypes, name):
            allowed.append(getattr(np.dtypes, name))
    return allowed


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint file as a dict, loaded with weights_only=True (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise BadArgumentError(f"{path}: no such file", param="resume")
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(_safe_globals()):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        else:  # torch < 2.5: featstore's own checkpoints still load; the reference's args need the allow-list
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not found:
            raise BadArgumentError(f"{path}: not a readable torch checkpoint ({one_line(e)})", param="resume") from None
        what = f"it needs {found.group(1)}"
        raise BadArgumentError(
            f"--resume {path}: not loaded, it holds more than tensors and plain values ({what}); only "
            "argparse.Namespace and numpy scalars are allowed besides (torch >= 2.5 for those)"
        ) from None
    except Exception as e:  # noqa: BLE001 - not a torch file, truncated, ...: one line naming the file
        raise BadArgumentError(f"{path}: not a readable torch checkpoint ({one_line(e)})", param="resume") from None
    if not isinstance(ckpt, dict):
        raise BadArgumentError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict", param="resume")
    return ckpt


def load_checkpoint(path: str | Path, model: nn.Module) -> LoadedCheckpoint:
    """Load the weights of a featstore or reference checkpoint into `model` (a featstore encoder built for the same
    subject and model flags); says in one log line which keys were ignored. A checkpoint made with other model
    flags, or for a subject with other vertex counts, is refused in one line naming them."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadArgumentError(f"{path}: no state dict of tensors under 'model'", param="resume")
    reference = "args" in ckpt or any(k.startswith(("transformer.", "lh_embed.0.", _BACKBONE)) for k in state)
    if reference:
        args = ckpt.get("args")
        settings = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
        _compare(path, settings, model.config, REFERENCE_FIELDS)
        mapped, ignored = _from_reference(path, state, model)
    else:
        settings = dict(ckpt.get("model_config") or {})
        if settings and "query_self_attn" not in settings:  # written before the reference's layer: DETR's full one
            settings["query_self_attn"] = True
        _compare(path, settings, model.config, ARCH_FIELDS)
        own = model.state_dict()
        mapped = {k: v for k, v in state.items() if k in own}
        ignored = [k for k in state if k not in own]
    _load(path, model, mapped)
    epoch = ckpt.get("epoch")
    info = LoadedCheckpoint(path, "reference" if reference else "featstore", None if epoch is None else int(epoch),
                            settings, ignored)
    what = "the reference's" if reference else "a featstore"
    log.info("%s: loaded %s checkpoint%s into the %s encoder; %s", path, what,
             "" if epoch is None else f" (epoch {int(epoch)})", model.config.encoder_arch,
             f"ignored {len(ignored)} keys featstore's model does not carry: {summarize_keys(ignored)}"
             if ignored else "no keys ignored")
    return info


def _compare(path: Path, settings: dict, config: EncoderConfig, names: tuple[str, ...]) -> None:
    """Refuse a checkpoint made with other architecture flags (those of the linear baseline are few)."""
    if config.encoder_arch == "linear":
        names = tuple(n for n in names if n in LINEAR_FIELDS)
    elif not config.enc_layers:
        names = tuple(n for n in names if n != "enc_output_layer")
    diffs = []
    for name in names:
        if name not in settings:
            continue
        theirs, ours = _plain(settings[name]), _plain(getattr(config, name))
        if theirs != ours:
            diffs.append(f"--{name} {theirs} (this run: {ours})")
    if diffs:
        raise BadArgumentError(f"{path} was trained with {', '.join(diffs)}; give the same model flags", param="resume")


def _plain(v):
    """Flag values as comparable plain values: the reference stores pre_norm as 0/1 or a bool."""
    return int(v) if isinstance(v, (bool, np.bool_, np.integer)) else v


def _from_reference(path: Path, state: dict, model: nn.Module) -> tuple[dict, list[str]]:
    own = model.state_dict()
    mapped, ignored = {}, []
    for key, value in state.items():
        if key == "query_embed.weight" and key in own:
            mapped[key], unused = _queries(path, value, model)
            if unused:
                ignored.append(f"query_embed.weight rows {unused} (queries no ROI of this readout uses)")
            continue
        new = key
        for pattern, repl in _RENAMES:
            if pattern.match(key):
                new = pattern.sub(repl, key)
                break
        if new not in own:
            ignored.append(key)
            continue
        if new.startswith("input_proj.") and value.dim() == 4 and own[new].dim() == 2:  # a 1x1 conv as a Linear
            value = value.flatten(1)
        mapped[new] = value
    return mapped, ignored


def _queries(path: Path, rows: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, str]:
    """The reference's query embeddings in featstore's order: its left hemisphere queries come first; the right
    hemisphere's start at half the rows (per-class readouts carry 16 queries, of which the first of each half are
    used), or right after the left's for "voxels"."""
    n_lh, n_rh = model.queries_per_hemi
    q = rows.shape[0]
    start = n_lh if model.readout_res == "voxels" else q // 2
    if n_lh > start or start + n_rh > q:
        raise BadArgumentError(
            f"--resume {path}: the checkpoint has {q} queries, this --readout_res {model.readout_res} needs "
            f"{n_lh} (lh) + {n_rh} (rh): not the same subject's ROI masks or readout"
        )
    unused = [f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in ((n_lh, start), (start + n_rh, q)) if b > a]
    return torch.cat((rows[:n_lh], rows[start : start + n_rh])), " and ".join(unused)


def _load(path: Path, model: nn.Module, mapped: dict) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in mapped]
    if missing:
        raise BadArgumentError(
            f"--resume {path}: no weights for {summarize_keys(missing)} of this model; it was made with other "
            "model flags (--encoder_arch, --enc_layers, --dec_layers, --position_embedding, ...)"
        )
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise BadArgumentError(
                f"--resume {path}: {k} is {tuple(v.shape)} in the checkpoint but {tuple(own[k].shape)} here; the "
                "checkpoint was made for another subject (vertex counts), feature (channels) or model flags"
            )
    model.load_state_dict(mapped, strict=True)


def summarize_keys(keys: list[str]) -> str:
    """State-dict keys in a few words: per module (`...self_attn.*`), layer numbers merged (`layers.{0,1}`), the
    reference's frozen backbone counted rather than listed."""
    backbone = [k for k in keys if k.startswith(_BACKBONE)]
    groups: dict[str, list[str]] = {}
    for key in keys:
        if key.startswith(_BACKBONE):
            continue
        module = _MODULE.sub(r"\1.*", key)
        layer = _LAYER.search(module)
        idx = layer.group(2) if layer else None
        if layer:
            module = module[: layer.start(2)] + "{i}" + module[layer.end(2) :]
        got = groups.setdefault(module, [])
        if idx is not None and idx not in got:
            got.append(idx)
    parts = [m.replace("{i}", "{" + ",".join(sorted(idx, key=int)) + "}") if idx else m for m, idx in groups.items()]
    if backbone:
        parts.append(f"{_BACKBONE}* ({len(backbone)} tensors: the frozen backbone, whose features the store holds)")
    return ", ".join(parts)


_MODULE = re.compile(r"^(.*?\.(?:self_attn|multihead_attn|cross_attn|norm\d?|linear\d|memory_proj|row_embed|col_embed))\..*$")
_LAYER = re.compile(r"(^|\.)(\d+)\.")
