"""DETR's encoder-decoder transformer on ``scaled_dot_product_attention``.

Parameter names and layouts match the official checkpoints one to one (``self_attn.
in_proj_weight`` packs q, k, v rows in that order; ``linear1``/``linear2``; ``norm1..3``), so
official weights load without reshaping. Activations are batch-first: [B, L, E].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .training_queries import DecoderQueries


class KeyPadding:
    """A key padding mask [B, Lk] (True = padding), optionally with ``blocked`` [Lq, Lk] (True:
    query i may not attend to key j, the same for every image), in the forms attention needs,
    each made once per forward pass for every layer that attends over the same keys: the
    boolean ``attend`` [B or 1, 1, 1 or Lq, Lk] (True = attend) of
    ``scaled_dot_product_attention``, and the additive ``bias`` [B * heads or 1, 1 or Lq, Lk]
    (0 or -inf) of the explicit CPU path. Every query must keep a key to attend to (each
    image keeps unpadded pixels; the decoder's training-only queries always see a group)."""

    def __init__(self, mask: Tensor | None, blocked: Tensor | None = None) -> None:
        if mask is None and blocked is None:
            raise ValueError("KeyPadding needs a padding mask, a blocked matrix, or both")
        self.mask = mask
        self.blocked = blocked
        self._attend: Tensor | None = None
        self._bias: dict[tuple[int, torch.dtype], Tensor] = {}

    def attend(self) -> Tensor:
        if self._attend is None:
            attend = None if self.mask is None else ~self.mask[:, None, None, :]
            if self.blocked is not None:
                allowed = ~self.blocked[None, None]
                attend = allowed if attend is None else attend & allowed
            self._attend = attend
        return self._attend

    def bias(self, heads: int, dtype: torch.dtype) -> Tensor:
        key = (heads, dtype)
        if key not in self._bias:
            attend = self.attend()
            batch, _, len_q, length = attend.shape
            bias = torch.zeros(attend.shape, dtype=dtype, device=attend.device)
            bias = bias.masked_fill_(~attend, float("-inf"))
            if batch > 1:
                bias = bias.expand(batch, heads, len_q, length).reshape(-1, len_q, length)
            else:
                bias = bias.view(1, len_q, length)  # broadcast over images and heads
            self._bias[key] = bias
        return self._bias[key]


def _key_padding(mask: Tensor | KeyPadding | None) -> KeyPadding | None:
    return mask if mask is None or isinstance(mask, KeyPadding) else KeyPadding(mask)


class Dropout(nn.Dropout):
    """``nn.Dropout`` as one operator, forward and backward (``torch.native_dropout``, what
    ``F.dropout`` runs on a GPU), also on a CPU, where ``F.dropout`` takes four."""

    def forward(self, x: Tensor) -> Tensor:
        return _dropout(x, self.p, self.training)


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0.0:
        return x
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return F.dropout(x, p, True)
    return torch.native_dropout(x, p, True)[0]


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters, computed by SDPA.

    SDPA picks fused kernels (flash / memory-efficient) on GPU and a fused CPU kernel, which
    ``nn.MultiheadAttention`` in training mode does not. With dropout on a CPU, where SDPA
    falls back to some twenty-five operators forward and as many backward, the same math runs
    as a scaled ``baddbmm``, softmax, dropout and ``bmm``.

    Inputs are [B, L, E] (returns [B, Lq, E]) or, as the transformer's layers keep them,
    flattened [B * L, E] with ``batch`` given (returns [B * Lq, E]): the projections are then
    plain matrix products, without a reshape around each.
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
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | KeyPadding | None = None,
        *,
        batch: int | None = None,
        projected: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """query [B, Lq, E], key/value [B, Lk, E] (or each flattened to [B * L, E], with
        ``batch``), key_padding_mask [B, Lk] (True = ignore) or a :class:`KeyPadding`.

        ``projected``: (query weight, query bias, projected keys, projected values), each
        projection [B * Lk, E], when the caller computed them from this module's ``in_proj``
        (the decoder projects the memory for all its layers at once); ``key`` and ``value``
        are then the inputs they came from, for hooks that read them."""
        if query.dim() == 3:
            batch, len_q, embed = query.shape
            flat_query = query.flatten(0, 1)
            flat_key = flat_query if key is query else key.flatten(0, 1)
            flat_value = flat_key if value is key else value.flatten(0, 1)
            out = self(flat_query, flat_key, flat_value, key_padding_mask, batch=batch,
                       projected=projected)  # fmt: skip
            return out.view(batch, len_q, embed)
        if batch is None:
            raise ValueError("flattened [B * L, E] inputs need batch=B")
        embed, heads = self.embed_dim, self.num_heads
        len_q, len_k = query.shape[0] // batch, key.shape[0] // batch
        head_dim = embed // heads
        if projected is not None:
            weight_q, bias_q, k, v = projected
            q = F.linear(query, weight_q, bias_q)
        elif query is key:  # self-attention: one matmul for q and k
            weight_qk, weight_v = self.in_proj_weight.split([2 * embed, embed])
            bias_qk, bias_v = self.in_proj_bias.split([2 * embed, embed])
            q, k = F.linear(query, weight_qk, bias_qk).split(embed, dim=1)
            v = F.linear(value, weight_v, bias_v)
        else:
            weight_q, weight_k, weight_v = self.in_proj_weight.split(embed)
            bias_q, bias_k, bias_v = self.in_proj_bias.split(embed)
            q, k = F.linear(query, weight_q, bias_q), F.linear(key, weight_k, bias_k)
            v = F.linear(value, weight_v, bias_v)
        padding = _key_padding(key_padding_mask)
        if self.training and self.dropout > 0 and q.device.type == "cpu":
            out = self._cpu_attention_with_dropout(q, k, v, padding, batch, len_q, len_k)
        else:
            q = q.view(batch, len_q, heads, head_dim).transpose(1, 2)
            k = k.view(batch, len_k, heads, head_dim).transpose(1, 2)
            v = v.view(batch, len_k, heads, head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if padding is None else padding.attend(),
                dropout_p=self.dropout if self.training else 0.0,
            )  # fmt: skip
        return self.out_proj(out.transpose(1, 2).reshape(batch * len_q, embed))

    def _cpu_attention_with_dropout(
        self, q: Tensor, k: Tensor, v: Tensor, padding: KeyPadding | None,
        batch: int, len_q: int, len_k: int,
    ) -> Tensor:  # fmt: skip
        """softmax(q k^T / sqrt(d) + mask) with dropout, times v: [B, heads, Lq, head_dim]."""
        heads = self.num_heads
        head_dim = self.embed_dim // heads

        def by_head(x: Tensor, length: int) -> Tensor:  # [B * L, E] -> [B * heads, L, d]
            x = x.view(batch, length, heads, head_dim).transpose(1, 2)
            return x.reshape(batch * heads, length, head_dim)

        q, k, v = by_head(q, len_q), by_head(k, len_k), by_head(v, len_k)
        scale = head_dim**-0.5
        if padding is None:
            scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
        else:
            scores = torch.baddbmm(padding.bias(heads, q.dtype), q, k.transpose(1, 2), alpha=scale)
        weights = _dropout(scores.softmax(-1), self.dropout, True)
        return torch.bmm(weights, v).view(batch, heads, len_q, head_dim)


class _AttentionFFNLayer(nn.Module):
    """What encoder and decoder layers share: self-attention, FFN, two norms, dropouts.

    Layers take and return flattened [B * L, E] activations, with ``batch`` = B."""

    def __init__(
        self, hidden_dim: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(hidden_dim, nheads, dropout=dropout)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class TransformerEncoderLayer(_AttentionFFNLayer):
    """Self-attention + FFN, post-norm (the checkpoints') or pre-norm."""

    def forward(
        self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | KeyPadding | None, batch: int
    ) -> Tensor:
        """src, pos [B * HW, E]; key_padding_mask [B, HW]."""
        if self.pre_norm:
            x = self.norm1(src)
            qk = x + pos
            src = src + self.dropout1(self.self_attn(qk, qk, x, key_padding_mask, batch=batch))
            return src + self.dropout2(self._ffn(self.norm2(src)))
        qk = src + pos
        attended = self.self_attn(qk, qk, src, key_padding_mask, batch=batch)
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(_AttentionFFNLayer):
    """Query self-attention, cross-attention to the encoder memory, FFN."""

    def __init__(
        self, hidden_dim: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool
    ) -> None:
        super().__init__(hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
        self.multihead_attn = MultiheadAttention(hidden_dim, nheads, dropout=dropout)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout3 = Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_with_pos: Tensor,
        query_pos: Tensor,
        memory_key_padding_mask: Tensor | KeyPadding | None,
        batch: int,
        projected: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        query_mask: KeyPadding | None = None,
    ) -> Tensor:
        """tgt, query_pos [B * Q, E]; memory, memory_with_pos [B * HW, E]; mask [B, HW];
        ``projected``: the cross-attention's (query weight, query bias, keys, values), see
        :meth:`MultiheadAttention.forward`; ``query_mask``: which queries each query's
        self-attention may see (training-only query groups), None: all."""
        padding = memory_key_padding_mask
        if self.pre_norm:
            x = self.norm1(tgt)
            qk = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(qk, qk, x, query_mask, batch=batch))
            x = self.norm2(tgt)
            cross = self.multihead_attn(
                x + query_pos, memory_with_pos, memory, padding, batch=batch, projected=projected
            )
            tgt = tgt + self.dropout2(cross)
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        qk = tgt + query_pos
        attended = self.self_attn(qk, qk, tgt, query_mask, batch=batch)
        tgt = self.norm1(tgt + self.dropout1(attended))
        cross = self.multihead_attn(
            tgt + query_pos, memory_with_pos, memory, padding, batch=batch, projected=projected
        )
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(self, layers: list[TransformerEncoderLayer], norm: nn.LayerNorm | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(
        self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | KeyPadding | None, batch: int
    ) -> Tensor:
        """src, pos [B * HW, E] -> [B * HW, E]."""
        padding = _key_padding(key_padding_mask)
        for layer in self.layers:
            src = layer(src, pos, padding, batch)
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
        memory_key_padding_mask: Tensor | KeyPadding | None,
        batch: int,
        query_mask: KeyPadding | None = None,
    ) -> Tensor:
        """tgt, query_pos [B * Q, E]; memory, pos [B * HW, E]; ``query_mask``: see
        :meth:`TransformerDecoderLayer.forward`. Returns [num_layers, B * Q, E]: every layer's
        output after the shared final norm."""
        memory_with_pos = memory + pos  # the same keys for every layer: add once
        padding = _key_padding(memory_key_padding_mask)
        outputs = []
        for layer, projected in zip(self.layers, self._cross_projections(memory, memory_with_pos)):
            tgt = layer(
                tgt, memory, memory_with_pos, query_pos, padding, batch, projected, query_mask
            )
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)

    def _cross_projections(
        self, memory: Tensor, memory_with_pos: Tensor
    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per layer, its cross-attention's query weight and bias and the memory's keys and
        values. The memory is the same for every layer: its keys (and values) for all layers
        are one matrix product with the layers' key (value) weights side by side, instead of
        one small product per layer."""
        embed = memory.shape[-1]
        weights = [layer.multihead_attn.in_proj_weight.split(embed) for layer in self.layers]
        biases = [layer.multihead_attn.in_proj_bias.split(embed) for layer in self.layers]

        def side_by_side(part: int, inputs: Tensor) -> tuple[Tensor, ...]:
            weight = torch.cat([w[part] for w in weights])
            bias = torch.cat([b[part] for b in biases])
            return F.linear(inputs, weight, bias).split(embed, dim=1)

        keys, values = side_by_side(1, memory_with_pos), side_by_side(2, memory)
        return [(w[0], b[0], k, v) for w, b, k, v in zip(weights, biases, keys, values)]


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
        self,
        src: Tensor,
        padding_mask: Tensor,
        query_embed: Tensor | DecoderQueries,
        pos: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Run encoder and decoder.

        Args:
            src: [B, E, h, w] projected backbone features.
            padding_mask: [B, h, w] bool, True on padding.
            query_embed: [Q, E] learned object queries (used as query positions, with zero
                content), or a training step's :class:`DecoderQueries` (per image content and
                positions, and which queries see which).
            pos: [B, E, h, w] positional encoding of ``src``.
        Returns:
            decoder outputs [num_decoder_layers, B, Q, E] and memory [B, E, h, w].
        """
        batch, channels, height, width = src.shape
        # flattened [B * L, E] from here on: every projection is one matrix product
        src = src.flatten(2).transpose(1, 2).reshape(-1, channels)  # [B * hw, E]
        pos = pos.flatten(2).transpose(1, 2).reshape(-1, channels)
        padding = KeyPadding(padding_mask.flatten(1))  # shared by every layer
        memory = self.encoder(src, pos, padding, batch)
        if isinstance(query_embed, Tensor):
            num_queries = query_embed.shape[0]
            query_pos = query_embed.repeat(batch, 1)  # [B * Q, E]
            tgt, query_mask = torch.zeros_like(query_pos), None
        else:
            num_queries = query_embed.position.shape[1]
            query_pos = query_embed.position.reshape(-1, channels)
            tgt = query_embed.content.reshape(-1, channels)
            query_mask = KeyPadding(query_embed.padding, query_embed.blocked)
        hidden = self.decoder(tgt, memory, pos, query_pos, padding, batch, query_mask)
        hidden = hidden.view(hidden.shape[0], batch, num_queries, channels)
        memory = memory.view(batch, height * width, channels).transpose(1, 2)
        return hidden, memory.reshape(batch, channels, height, width)
