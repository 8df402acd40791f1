"""DETR's encoder-decoder transformer on ``scaled_dot_product_attention``.

Parameter names and layouts match the official checkpoints one to one (``self_attn.
in_proj_weight`` packs q, k, v rows in that order; ``linear1``/``linear2``; ``norm1..3``), so
official weights load without reshaping. Activations are batch-first: [B, L, E].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters, computed by SDPA.

    SDPA picks fused kernels (flash / memory-efficient) on GPU and a fused CPU kernel, which
    ``nn.MultiheadAttention`` in training mode does not.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """query [B, Lq, E], key/value [B, Lk, E], key_padding_mask [B, Lk] (True = ignore)."""
        batch, len_q, embed = query.shape
        len_k = key.shape[1]
        heads, head_dim = self.num_heads, embed // self.num_heads
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if query is key:  # self-attention: one matmul for q and k
            q, k = F.linear(query, weight[: 2 * embed], bias[: 2 * embed]).chunk(2, dim=-1)
        else:
            q = F.linear(query, weight[:embed], bias[:embed])
            k = F.linear(key, weight[embed : 2 * embed], bias[embed : 2 * embed])
        v = F.linear(value, weight[2 * embed :], bias[2 * embed :])
        q = q.view(batch, len_q, heads, head_dim).transpose(1, 2)
        k = k.view(batch, len_k, heads, head_dim).transpose(1, 2)
        v = v.view(batch, len_k, heads, head_dim).transpose(1, 2)
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = ~key_padding_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, len_q, embed))


class _AttentionFFNLayer(nn.Module):
    """What encoder and decoder layers share: self-attention, FFN, two norms, dropouts."""

    def __init__(
        self, hidden_dim: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(hidden_dim, nheads, dropout=dropout)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class TransformerEncoderLayer(_AttentionFFNLayer):
    """Self-attention + FFN, post-norm (the checkpoints') or pre-norm."""

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """src, pos [B, HW, E]; key_padding_mask [B, HW]."""
        if self.pre_norm:
            x = self.norm1(src)
            qk = x + pos
            src = src + self.dropout1(self.self_attn(qk, qk, x, key_padding_mask))
            return src + self.dropout2(self._ffn(self.norm2(src)))
        qk = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(qk, qk, src, key_padding_mask)))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(_AttentionFFNLayer):
    """Query self-attention, cross-attention to the encoder memory, FFN."""

    def __init__(
        self, hidden_dim: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool
    ) -> None:
        super().__init__(hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
        self.multihead_attn = MultiheadAttention(hidden_dim, nheads, dropout=dropout)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_with_pos: Tensor,
        query_pos: Tensor,
        memory_key_padding_mask: Tensor | None,
    ) -> Tensor:
        """tgt, query_pos [B, Q, E]; memory, memory_with_pos [B, HW, E]; mask [B, HW]."""
        if self.pre_norm:
            x = self.norm1(tgt)
            qk = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(qk, qk, x))
            x = self.norm2(tgt)
            cross = self.multihead_attn(
                x + query_pos, memory_with_pos, memory, memory_key_padding_mask
            )
            tgt = tgt + self.dropout2(cross)
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(qk, qk, tgt)))
        cross = self.multihead_attn(
            tgt + query_pos, memory_with_pos, memory, memory_key_padding_mask
        )
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(self, layers: list[TransformerEncoderLayer], norm: nn.LayerNorm | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    def __init__(self, layers: list[TransformerDecoderLayer], norm: nn.LayerNorm) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        memory_key_padding_mask: Tensor | None,
    ) -> Tensor:
        """Returns [num_layers, B, Q, E]: every layer's output after the shared final norm."""
        memory_with_pos = memory + pos  # the same keys for every layer: add once
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_with_pos, query_pos, memory_key_padding_mask)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    """Encoder-decoder of DETR; the defaults are the paper's (6+6 layers, d=256, 8 heads, FFN
    2048, dropout 0.1, post-norm). Argument names are the official code's options, and the
    ``model`` config group's keys.

    Args:
        hidden_dim: width of every layer (the paper's d).
        nheads: attention heads of every attention.
        enc_layers, dec_layers: encoder and decoder depth (at least one decoder layer).
        dim_feedforward: hidden width of the feed-forward blocks.
        dropout: dropout in attention and feed-forward blocks.
        pre_norm: LayerNorm before each block (with a final encoder norm), not after.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        if dec_layers < 1:
            raise ValueError("the transformer needs at least one decoder layer")
        settings = (hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(*settings) for _ in range(enc_layers)],
            nn.LayerNorm(hidden_dim) if pre_norm else None,
        )
        self.decoder = TransformerDecoder(
            [TransformerDecoderLayer(*settings) for _ in range(dec_layers)],
            nn.LayerNorm(hidden_dim),
        )
        self.hidden_dim = hidden_dim
        self.nheads = nheads
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)

    def forward(
        self, src: Tensor, padding_mask: Tensor, query_embed: Tensor, pos: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Run encoder and decoder.

        Args:
            src: [B, E, h, w] projected backbone features.
            padding_mask: [B, h, w] bool, True on padding.
            query_embed: [Q, E] learned object queries (used as query positions).
            pos: [B, E, h, w] positional encoding of ``src``.
        Returns:
            decoder outputs [num_decoder_layers, B, Q, E] and memory [B, E, h, w].
        """
        batch, channels, height, width = src.shape
        src = src.flatten(2).transpose(1, 2)  # [B, hw, E]
        pos = pos.flatten(2).transpose(1, 2)
        key_padding_mask = padding_mask.flatten(1)
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)
        memory = self.encoder(src, pos, key_padding_mask)
        tgt = torch.zeros_like(query_pos)
        hidden = self.decoder(tgt, memory, pos, query_pos, key_padding_mask)
        return hidden, memory.transpose(1, 2).reshape(batch, channels, height, width)
