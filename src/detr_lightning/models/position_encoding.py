"""Positional encodings of the encoder's feature map: sine (the paper's default) and learned."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding over the unpadded area of each image.

    Coordinates are cumulative counts of valid pixels, normalized to (0, scale] when
    ``normalize`` is set, so padding never shifts the encoding of real pixels.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, padding_mask: Tensor) -> Tensor:
        """[B, h, w] bool (True on padding) -> [B, 2 * num_pos_feats, h, w] float32 (y then x)."""
        not_mask = ~padding_mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=padding_mask.device)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        # interleave sin (even channels) and cos (odd channels)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: one embedding per row and column (up to ``max_size`` each)."""

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, padding_mask: Tensor) -> Tensor:
        """[B, h, w] bool -> [B, 2 * num_pos_feats, h, w] (x then y, as the official code)."""
        batch, height, width = padding_mask.shape
        limit = self.row_embed.num_embeddings
        if height > limit or width > limit:
            raise ValueError(
                f"learned position embedding covers {limit}x{limit} feature cells, got "
                f"{height}x{width}; use position_embedding=sine or smaller images"
            )
        x_emb = self.col_embed(torch.arange(width, device=padding_mask.device))
        y_emb = self.row_embed(torch.arange(height, device=padding_mask.device))
        pos = torch.cat(
            [x_emb.unsqueeze(0).expand(height, -1, -1), y_emb.unsqueeze(1).expand(-1, width, -1)],
            dim=-1,
        )
        return pos.permute(2, 0, 1).unsqueeze(0).expand(batch, -1, -1, -1)


def build_position_encoding(kind: str, hidden_dim: int) -> nn.Module:
    """``kind`` = "sine" or "learned"; the encoding has ``hidden_dim`` channels."""
    if kind in ("sine", "v2"):
        return PositionEmbeddingSine(hidden_dim // 2, normalize=True)
    if kind in ("learned", "v3"):
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"position_embedding must be 'sine' or 'learned', got {kind!r}")
