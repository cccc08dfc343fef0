"""The reference brain encoders over a stored feature grid (C, H, W): the transformer brain encoder and a linear
baseline. Both return `{"lh_f_pred": (B, V_lh), "rh_f_pred": (B, V_rh)}`.

The transformer follows Adeli, Minni & Kriegeskorte (2023), "Predicting brain activity using Transformers": learned
queries, one per ROI of the readout (per hemisphere, plus a "rest" query), cross-attend the frozen backbone's patch
grid through a DETR-style pre-norm decoder, with DETR's 2-D sine positional encoding on the grid; each query's output
is read out linearly to its hemisphere's vertices and masked to its ROI, overlapping ROIs summed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadArgumentError
from .names import ENCODER_ARCHS
from .rois import HEMIS, READOUTS, Readout


@dataclass(frozen=True)
class EncoderConfig:
    """Model hyper-parameters, named and defaulted as the guide's `main.py` flags."""

    encoder_arch: str = "transformer"
    readout_res: str = "rois_all"
    hidden_dim: int = 768
    nheads: int = 16
    dec_layers: int = 1
    enc_layers: int = 0
    dim_feedforward: int = 1024
    dropout: float = 0.1
    linear_channels: int = 256  # the linear baseline's 3x3 stride-3 convolution

    def check(self) -> EncoderConfig:
        if self.encoder_arch not in ENCODER_ARCHS:
            raise BadArgumentError(f"--encoder_arch {self.encoder_arch!r}: choose one of {', '.join(ENCODER_ARCHS)}")
        if self.readout_res not in READOUTS:
            raise BadArgumentError(f"--readout_res {self.readout_res!r}: choose one of {', '.join(READOUTS)}")
        for name in ("hidden_dim", "nheads", "dec_layers", "dim_feedforward", "linear_channels"):
            if int(getattr(self, name)) < 1:
                raise BadArgumentError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.enc_layers < 0:
            raise BadArgumentError(f"--enc_layers must be >= 0, got {self.enc_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise BadArgumentError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.encoder_arch == "transformer" and (self.hidden_dim % self.nheads or self.hidden_dim % 4):
            raise BadArgumentError(
                f"--hidden_dim {self.hidden_dim} must be a multiple of --nheads ({self.nheads}) and of 4 "
                "(the 2-D sine encoding gives a quarter of the channels to each of sin y, cos y, sin x, cos x)"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def sine_position_encoding(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2-D sine encoding of an (h, w) grid as (h * w, dim): the first half of the channels
    encode the row, the second half the column, sin and cos interleaved, positions scaled to (0, 2 pi]."""
    npf, eps, scale = dim // 2, 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32) / (h + eps) * scale
    x = torch.arange(1, w + 1, dtype=torch.float32) / (w + eps) * scale
    dim_t = temperature ** (2 * torch.div(torch.arange(npf), 2, rounding_mode="floor") / npf)
    pos_y, pos_x = y[:, None] / dim_t, x[:, None] / dim_t
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)  # (h, npf)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)  # (w, npf)
    return torch.cat((pos_y[:, None, :].expand(h, w, npf), pos_x[None, :, :].expand(h, w, npf)), dim=-1).reshape(
        h * w, dim
    )


class EncoderLayer(nn.Module):
    """DETR encoder layer, pre-norm: self-attention over the grid (positions added to queries and keys), FFN."""

    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, dim_feedforward), nn.Linear(dim_feedforward, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        s = self.norm1(src)
        q = s + pos
        src = src + self.dropout1(self.self_attn(q, q, s, need_weights=False)[0])
        s = self.norm2(src)
        return src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(s)))))


class DecoderLayer(nn.Module):
    """DETR decoder layer, pre-norm: query self-attention, cross-attention to the grid, FFN."""

    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, dim_feedforward), nn.Linear(dim_feedforward, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor):
        t = self.norm1(tgt)
        q = t + query_pos
        tgt = tgt + self.dropout1(self.self_attn(q, q, t, need_weights=False)[0])
        t = self.norm2(tgt)
        tgt = tgt + self.dropout2(self.cross_attn(t + query_pos, memory + pos, memory, need_weights=False)[0])
        t = self.norm3(tgt)
        return tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(t)))))


class TransformerBrainEncoder(nn.Module):
    """Learned ROI queries cross-attend the feature grid; each query's output is read out to its ROI's vertices.

    A linear projection (a 1x1 convolution) maps the C feature channels to hidden_dim when they differ (DINOv2's
    768 channels feed the default hidden_dim directly). It reads the grid as (B, H*W, C), a free view of
    channels-last batches (`channels_last_collate`), so the loader need not transpose every sample. The readout is
    one linear layer per hemisphere (hidden_dim -> vertices) applied to each of that hemisphere's queries; the ROI
    masks then keep, for each vertex, the outputs of the queries of its ROIs (summed where ROIs overlap). With
    readout "voxels" query i reads out to vertex i only.
    """

    def __init__(self, channels: int, readout: Readout, config: EncoderConfig = EncoderConfig()):
        super().__init__()
        cfg = config.check()
        d = cfg.hidden_dim
        self.config, self.readout_res = cfg, readout.readout_res
        self.input_proj = nn.Linear(channels, d) if channels != d else nn.Identity()
        self.encoder = nn.ModuleList(
            EncoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout) for _ in range(cfg.enc_layers)
        )
        self.enc_norm = nn.LayerNorm(d) if cfg.enc_layers else nn.Identity()
        self.decoder = nn.ModuleList(
            DecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout) for _ in range(cfg.dec_layers)
        )
        self.dec_norm = nn.LayerNorm(d)
        self.queries_per_hemi = tuple(len(readout.query_names[h]) for h in HEMIS)
        self.query_embed = nn.Embedding(sum(self.queries_per_hemi), d)
        self.lh_embed = nn.Linear(d, readout.n_vertices["lh"])
        self.rh_embed = nn.Linear(d, readout.n_vertices["rh"])
        for hemi in HEMIS:
            mask = readout.masks[hemi]
            self.register_buffer(f"{hemi}_mask", None if mask is None else torch.as_tensor(mask, dtype=torch.float32))
        self._pos: dict[tuple[int, int], torch.Tensor] = {}

    def position_encoding(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """(h * w, hidden_dim) sine encoding, computed once per grid size and device."""
        key = (h, w)
        if key not in self._pos or self._pos[key].device != like.device:
            self._pos[key] = sine_position_encoding(h, w, self.config.hidden_dim).to(like.device)
        return self._pos[key].to(like.dtype)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, c, h, w = x.shape
        memory = self.input_proj(x.permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, H*W, D); a view if channels-last
        pos = self.position_encoding(h, w, memory)[None]
        for layer in self.encoder:
            memory = layer(memory, pos)
        memory = self.enc_norm(memory)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        for layer in self.decoder:
            tgt = layer(tgt, memory, pos, query_pos)
        lh_q, rh_q = self.dec_norm(tgt).split(self.queries_per_hemi, dim=1)
        return {
            "lh_f_pred": _read_out(lh_q, self.lh_embed, self.lh_mask),
            "rh_f_pred": _read_out(rh_q, self.rh_embed, self.rh_mask),
        }


def _read_out(q: torch.Tensor, linear: nn.Linear, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, Q, D) query outputs -> (B, V): each query through the hemisphere's linear readout, masked to its ROI."""
    if mask is None:  # one query per vertex
        return (q * linear.weight).sum(-1) + linear.bias
    return torch.einsum("bqv,qv->bv", q @ linear.weight.T, mask) + linear.bias


class LinearBrainEncoder(nn.Module):
    """The baseline: a 3x3 stride-3 convolution to 256 channels, flattened, one linear layer per hemisphere."""

    def __init__(self, channels: int, grid: tuple[int, int], n_vertices: dict[str, int],
                 config: EncoderConfig = EncoderConfig(encoder_arch="linear")):
        super().__init__()
        cfg = config.check()
        self.config, self.readout_res = cfg, cfg.readout_res
        oh, ow = (grid[0] - 3) // 3 + 1, (grid[1] - 3) // 3 + 1
        if oh < 1 or ow < 1:
            raise BadArgumentError(f"the linear encoder needs a grid of at least 3x3, got {grid[0]}x{grid[1]}")
        self.conv = nn.Conv2d(channels, cfg.linear_channels, kernel_size=3, stride=3)
        self.lh_embed = nn.Linear(cfg.linear_channels * oh * ow, n_vertices["lh"])
        self.rh_embed = nn.Linear(cfg.linear_channels * oh * ow, n_vertices["rh"])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.conv(x).flatten(1)
        return {"lh_f_pred": self.lh_embed(z), "rh_f_pred": self.rh_embed(z)}


def build_encoder(config: EncoderConfig, channels: int, grid: tuple[int, int], readout: Readout) -> nn.Module:
    """The model named by config.encoder_arch for (channels, *grid) inputs and the readout's vertex counts."""
    config.check()
    if config.encoder_arch == "linear":
        return LinearBrainEncoder(channels, grid, readout.n_vertices, config)
    return TransformerBrainEncoder(channels, readout, config)
