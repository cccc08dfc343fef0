"""The reference brain encoders over a stored feature grid (C, H, W): the transformer brain encoder and a linear
baseline. Both return `{"lh_f_pred": (B, V_lh), "rh_f_pred": (B, V_rh)}` and carry their own training loss.

The transformer is Adeli, Minni & Kriegeskorte's (2023, "Predicting brain activity using Transformers") as their
training code builds it: learned queries, one per ROI of the readout (per hemisphere, plus a "rest" query), start
from zeros and cross-attend the frozen backbone's patch grid through DETR decoder layers without query
self-attention (DETR's 2-D sine positional encoding on the grid, the queries' learned embeddings as their positions),
a final LayerNorm, then each query's output goes through its hemisphere's linear readout and is masked to its ROI.
The tests check it step for step against an independent implementation of those facts.

Inputs may be float16 (as stored): they are cast to the model's dtype (float32) on entry, so all arithmetic is
float32; under `torch.autocast` on CUDA the matrix products then run in autocast's precision.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadArgumentError
from .config import EncoderConfig
from .rois import HEMIS, Readout

LINEAR_L2 = 0.02  # the linear baseline's penalty on the L2 norms of its readout tensors
LEARNED_POSITIONS = 50  # rows and columns of the learned position embedding (DETR's PositionEmbeddingLearned)


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


class LearnedPositions(nn.Module):
    """DETR's PositionEmbeddingLearned: a learned embedding per column (first half of the channels) and per row
    (second half), for grids up to 50 x 50, initialised uniform in [0, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.row_embed = nn.Embedding(LEARNED_POSITIONS, dim // 2)
        self.col_embed = nn.Embedding(LEARNED_POSITIONS, dim // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, h: int, w: int) -> torch.Tensor:
        if h > LEARNED_POSITIONS or w > LEARNED_POSITIONS:
            raise BadArgumentError(
                f"--position_embedding learned covers grids up to {LEARNED_POSITIONS}x{LEARNED_POSITIONS}, got {h}x{w}"
            )
        x, y = self.col_embed.weight[:w], self.row_embed.weight[:h]
        return torch.cat((x[None].expand(h, w, -1), y[:, None].expand(h, w, -1)), dim=-1).reshape(h * w, -1)


def _ffn(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return layer.linear2(layer.dropout(F.relu(layer.linear1(t))))


class EncoderLayer(nn.Module):
    """DETR encoder layer: self-attention over the grid (positions added to queries and keys), FFN; pre- or
    post-norm."""

    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool = True):
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, dim_feedforward), nn.Linear(dim_feedforward, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            s = self.norm1(src)
            q = s + pos
            src = src + self.dropout1(self.self_attn(q, q, s, need_weights=False)[0])
            return src + self.dropout2(_ffn(self, self.norm2(src)))
        q = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, q, src, need_weights=False)[0]))
        return self.norm2(src + self.dropout2(_ffn(self, src)))


class DecoderLayer(nn.Module):
    """The reference's decoder layer: cross-attention from the queries to the grid, then an FFN, no query
    self-attention. pre_norm: `t + CA(norm1(t))`, `t + FFN(norm3(t))`; post-norm: norm1 before the
    cross-attention, norm2 after it, norm3 after the FFN. With self_attn, DETR's full layer instead (query
    self-attention first; norm1, norm2, norm3 around the three blocks)."""

    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool = True,
                 self_attn: bool = False):
        super().__init__()
        self.pre_norm, self.has_self_attn = pre_norm, self_attn
        if self_attn:
            self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
            self.dropout1 = nn.Dropout(dropout)
        self.cross_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, dim_feedforward), nn.Linear(dim_feedforward, d)
        self.norm1 = nn.LayerNorm(d)
        if self_attn or not pre_norm:  # the reference carries norm2 under pre-norm too, unused
            self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def _cross(self, t: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor):
        return self.dropout2(self.cross_attn(t + query_pos, memory + pos, memory, need_weights=False)[0])

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor):
        if self.has_self_attn:
            return self._detr(tgt, memory, pos, query_pos)
        if self.pre_norm:
            tgt = tgt + self._cross(self.norm1(tgt), memory, pos, query_pos)
            return tgt + self.dropout3(_ffn(self, self.norm3(tgt)))
        tgt = self.norm1(tgt)
        tgt = self.norm2(tgt + self._cross(tgt, memory, pos, query_pos))
        return self.norm3(tgt + self.dropout3(_ffn(self, tgt)))

    def _detr(self, tgt, memory, pos, query_pos):
        if self.pre_norm:
            t = self.norm1(tgt)
            q = t + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, q, t, need_weights=False)[0])
            tgt = tgt + self._cross(self.norm2(tgt), memory, pos, query_pos)
            return tgt + self.dropout3(_ffn(self, self.norm3(tgt)))
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        tgt = self.norm2(tgt + self._cross(tgt, memory, pos, query_pos))
        return self.norm3(tgt + self.dropout3(_ffn(self, tgt)))


class TransformerBrainEncoder(nn.Module):
    """Learned ROI queries cross-attend the feature grid; each query's output is read out to its ROI's vertices.

    A linear projection maps the C feature channels to hidden_dim when they differ (DINOv2's 768 channels feed the
    default hidden_dim directly, as in the reference). It reads the grid as (B, H*W, C), a free view of
    channels-last batches (`channels_last_collate`). The readout: the hemisphere's linear layer applied to every
    query output gives (B, Q, V); the prediction of a vertex is the sum over the queries whose ROI covers it, so
    its bias is added once per covering query, as in the reference. With readout "voxels" query i reads out to
    vertex i only. Every transformer weight matrix starts xavier-uniform (DETR's `_reset_parameters`).
    """

    def __init__(self, channels: int, readout: Readout, config: EncoderConfig = EncoderConfig()):
        super().__init__()
        cfg = config.check()
        d = cfg.hidden_dim
        self.config, self.readout_res = cfg, readout.readout_res
        pre = bool(cfg.pre_norm)
        self.input_proj = nn.Linear(channels, d) if channels != d else nn.Identity()
        self.encoder = nn.ModuleList(
            EncoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, pre) for _ in range(cfg.enc_layers)
        )
        self.enc_norm = nn.LayerNorm(d) if cfg.enc_layers and pre else nn.Identity()
        self.enc_output = cfg.enc_output_layer % cfg.enc_layers if cfg.enc_layers else -1
        self.decoder = nn.ModuleList(
            DecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, pre, cfg.query_self_attn)
            for _ in range(cfg.dec_layers)
        )
        self.dec_norm = nn.LayerNorm(d)
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.position = LearnedPositions(d) if cfg.position_embedding == "learned" else None
        self.queries_per_hemi = tuple(len(readout.query_names[h]) for h in HEMIS)
        self.query_embed = nn.Embedding(sum(self.queries_per_hemi), d)
        self.lh_embed = nn.Linear(d, readout.n_vertices["lh"])
        self.rh_embed = nn.Linear(d, readout.n_vertices["rh"])
        for hemi in HEMIS:  # not in the state dict: masks come from the subject's ROI files, as in the reference
            mask, loss_mask = readout.masks[hemi], readout.loss_masks[hemi]
            self.register_buffer(f"{hemi}_mask", None if mask is None else torch.as_tensor(mask, dtype=torch.float32),
                                 persistent=False)
            self.register_buffer(f"{hemi}_loss_mask", None if loss_mask is None else
                                 torch.as_tensor(loss_mask, dtype=torch.float32), persistent=False)
        self._pos: dict[tuple[int, int], torch.Tensor] = {}

    def position_encoding(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """(h * w, hidden_dim) positions of the grid: learned, or the sine encoding computed once per grid and
        device."""
        if self.position is not None:
            return self.position(h, w).to(like.dtype)
        key = (h, w)
        if key not in self._pos or self._pos[key].device != like.device:
            self._pos[key] = sine_position_encoding(h, w, self.config.hidden_dim).to(like.device)
        return self._pos[key].to(like.dtype)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.query_embed.weight.dtype)
        b, c, h, w = x.shape
        memory = self.input_proj(x.permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, H*W, D); a view if channels-last
        pos = self.position_encoding(h, w, memory)[None]
        if len(self.encoder):
            for layer in self.encoder[: self.enc_output + 1]:
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

    def loss(self, out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """MSE of each hemisphere, summed; single-class readouts see only the vertices inside their ROIs (both
        prediction and target are zeroed elsewhere, the mean still over all vertices, as in the reference)."""
        total = 0.0
        for hemi in HEMIS:
            pred, y = out[f"{hemi}_f_pred"], targets[f"{hemi}_f"].to(out[f"{hemi}_f_pred"].dtype)
            keep = getattr(self, f"{hemi}_loss_mask")
            if keep is not None:
                pred, y = pred * keep, y * keep
            total = total + F.mse_loss(pred, y)
        return total


def _read_out(q: torch.Tensor, linear: nn.Linear, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, Q, D) query outputs -> (B, V): every query through the hemisphere's linear readout (bias included),
    summed over the queries whose ROI covers the vertex."""
    if mask is None:  # one query per vertex
        return (q * linear.weight).sum(-1) + linear.bias
    return torch.einsum("bqv,qv->bv", linear(q), mask)


def linear_stride(grid: tuple[int, int]) -> int:
    """The reference's stride for its 3x3 input convolution: 3 for DINOv2's 31x31 grid (-> 11x11), 2 for CLIP's
    16x16 (-> 8x8); grids of at most 16 on both sides take 2, larger ones 3."""
    return 2 if max(grid) <= 16 else 3


class LinearBrainEncoder(nn.Module):
    """The baseline: a 3x3 convolution to 256 channels (padding 1, stride `linear_stride`), flattened, one linear
    layer per hemisphere. Its loss adds 0.02 x the L2 norms of the readout's weight and bias tensors (not squared).
    It predicts every vertex whatever the readout."""

    def __init__(self, channels: int, grid: tuple[int, int], n_vertices: dict[str, int],
                 config: EncoderConfig = EncoderConfig(encoder_arch="linear")):
        super().__init__()
        cfg = config.check()
        self.config, self.readout_res = cfg, cfg.readout_res
        stride = linear_stride(grid)
        self.input_proj = nn.Conv2d(channels, cfg.linear_channels, kernel_size=3, stride=stride, padding=1)
        oh, ow = ((g + 2 - 3) // stride + 1 for g in grid)
        self.lh_embed = nn.Linear(cfg.linear_channels * oh * ow, n_vertices["lh"])
        self.rh_embed = nn.Linear(cfg.linear_channels * oh * ow, n_vertices["rh"])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.input_proj(x.to(self.input_proj.weight.dtype)).flatten(1)
        return {"lh_f_pred": self.lh_embed(z), "rh_f_pred": self.rh_embed(z)}

    def loss(self, out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        mse = sum(F.mse_loss(out[f"{h}_f_pred"], targets[f"{h}_f"].to(out[f"{h}_f_pred"].dtype)) for h in HEMIS)
        readout = [*self.lh_embed.parameters(), *self.rh_embed.parameters()]
        return mse + LINEAR_L2 * sum(p.norm(2) for p in readout)


def build_encoder(config: EncoderConfig, channels: int, grid: tuple[int, int], readout: Readout) -> nn.Module:
    """The model named by config.encoder_arch for (channels, *grid) inputs and the readout's vertex counts."""
    config.check()
    if config.encoder_arch == "linear":
        return LinearBrainEncoder(channels, grid, readout.n_vertices, config)
    return TransformerBrainEncoder(channels, readout, config)
