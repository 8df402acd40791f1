"""The transformer's parts: pre-norm, positional encodings against hand-computed values,
attention against torch's."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detr_lightning.models import (
    MultiheadAttention,
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    transformer,
)
from detr_lightning.models.transformer import Dropout, KeyPadding
from helpers.models import tiny_detr


def test_pre_norm_encoder_has_final_norm() -> None:
    pre = tiny_detr(pre_norm=True).eval()
    post = tiny_detr(pre_norm=False)
    assert isinstance(pre.transformer.encoder.norm, nn.LayerNorm)
    assert post.transformer.encoder.norm is None
    assert all(layer.pre_norm for layer in pre.transformer.encoder.layers)
    assert all(layer.pre_norm for layer in pre.transformer.decoder.layers)
    with torch.no_grad():
        out = pre(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out["pred_logits"]).all()


def test_sine_position_encoding_hand_computed() -> None:
    # Image 0 is 2x2 padded to 2x3 (last column); image 1 fills the 2x3 map.
    padding_mask = torch.tensor([[[0, 0, 1], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    encoding = PositionEmbeddingSine(num_pos_feats=4, temperature=10000.0, normalize=True)
    pos = encoding(padding_mask)
    assert pos.shape == (2, 8, 2, 3) and pos.dtype == torch.float32

    eps, two_pi = 1e-6, 2 * math.pi
    frequencies = [1.0, 1.0, 100.0, 100.0]  # 10000 ** (2 * (k // 2) / 4)
    for image, valid_width in ((0, 2), (1, 3)):
        for row in range(2):
            for col in range(3):
                valid_column = col < valid_width
                y = (row + 1) if valid_column else 0  # valid pixels above, inclusive
                y_total = 2 if valid_column else 0
                x = min(col + 1, valid_width)  # valid pixels to the left, inclusive
                y_norm = y / (y_total + eps) * two_pi
                x_norm = x / (valid_width + eps) * two_pi
                expected = []
                for value in (y_norm, x_norm):
                    for k, frequency in enumerate(frequencies):
                        angle = value / frequency
                        expected.append(math.sin(angle) if k % 2 == 0 else math.cos(angle))
                torch.testing.assert_close(
                    pos[image, :, row, col], torch.tensor(expected), atol=1e-5, rtol=0
                )


def test_sine_position_encoding_ignores_padding() -> None:
    encoding = PositionEmbeddingSine(num_pos_feats=8)
    alone = encoding(torch.zeros(1, 3, 4, dtype=torch.bool))
    padded_mask = torch.ones(1, 5, 7, dtype=torch.bool)
    padded_mask[0, :3, :4] = False
    padded = encoding(padded_mask)
    torch.testing.assert_close(padded[..., :3, :4], alone)


def test_sine_scale_requires_normalize() -> None:
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(normalize=False, scale=1.0)


def test_learned_position_encoding_shape_and_limit() -> None:
    encoding = PositionEmbeddingLearned(num_pos_feats=6, max_size=5)
    pos = encoding(torch.zeros(2, 3, 4, dtype=torch.bool))
    assert pos.shape == (2, 12, 3, 4)
    # x (column) embedding first, then y (row).
    torch.testing.assert_close(pos[0, :6, 1, 2], encoding.col_embed.weight[2])
    torch.testing.assert_close(pos[1, 6:, 1, 2], encoding.row_embed.weight[1])
    with pytest.raises(ValueError, match="6x4"):
        encoding(torch.zeros(1, 6, 4, dtype=torch.bool))


def copied_torch_attention(ours: MultiheadAttention) -> nn.MultiheadAttention:
    reference = nn.MultiheadAttention(ours.embed_dim, ours.num_heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.in_proj_weight)
        reference.in_proj_bias.copy_(ours.in_proj_bias)
        reference.out_proj.weight.copy_(ours.out_proj.weight)
        reference.out_proj.bias.copy_(ours.out_proj.bias)
    return reference.eval()


@pytest.mark.parametrize("self_attention", [True, False])
def test_multihead_attention_matches_torch(self_attention: bool) -> None:
    torch.manual_seed(2)
    ours = MultiheadAttention(32, 4).eval()
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    reference = copied_torch_attention(ours)
    query = torch.randn(3, 9, 32)
    key = query if self_attention else torch.randn(3, 11, 32)
    value = torch.randn(3, key.shape[1], 32)
    key_padding_mask = torch.zeros(3, key.shape[1], dtype=torch.bool)
    key_padding_mask[0, -4:] = True
    key_padding_mask[2, 1::2] = True
    with torch.no_grad():
        actual = ours(query, key, value, key_padding_mask)
        expected, _ = reference(query, key, value, key_padding_mask=key_padding_mask)
        actual_unmasked = ours(query, key, value)
        expected_unmasked, _ = reference(query, key, value)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual_unmasked, expected_unmasked, atol=1e-5, rtol=1e-5)


def test_multihead_attention_rejects_indivisible_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(30, 4)


@pytest.mark.parametrize("masked", [True, False])
def test_cpu_attention_with_dropout_is_sdpas_math(masked: bool, monkeypatch) -> None:
    """In training with dropout on a CPU the attention runs as baddbmm/softmax/dropout/bmm:
    with the dropout itself made the identity, it equals SDPA's result (and torch's
    nn.MultiheadAttention), masked keys included, for batched and flattened inputs."""
    torch.manual_seed(4)
    ours = MultiheadAttention(32, 4, dropout=0.5)
    with torch.no_grad():
        ours.in_proj_bias.normal_()
    query, key = torch.randn(3, 7, 32), torch.randn(3, 11, 32)
    value = torch.randn(3, 11, 32)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    if masked:
        mask[0, -4:] = True
        mask[2, ::2] = True
    expected = ours.eval()(query, key, value, mask if masked else None)
    monkeypatch.setattr(transformer, "_dropout", lambda x, p, training: x)
    called = []
    original = MultiheadAttention._cpu_attention_with_dropout
    monkeypatch.setattr(MultiheadAttention, "_cpu_attention_with_dropout",
                        lambda self, *args: called.append(1) or original(self, *args))  # fmt: skip
    actual = ours.train()(query, key, value, mask if masked else None)
    assert called  # the explicit path ran
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    flat = ours(query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1),
                KeyPadding(mask) if masked else None, batch=3)  # fmt: skip
    torch.testing.assert_close(flat.view(3, 7, 32), expected, atol=1e-5, rtol=1e-5)
    reference = copied_torch_attention(ours)
    with torch.no_grad():
        torch_out, _ = reference(query, key, value, key_padding_mask=mask if masked else None)
    torch.testing.assert_close(actual.detach(), torch_out, atol=1e-5, rtol=1e-5)


def test_dropout_is_one_operator_that_drops_and_rescales() -> None:
    from detr_lightning.utils.host_work import HostWorkCounter

    dropout = Dropout(0.25)
    x = torch.ones(200, 200, requires_grad=True)
    with HostWorkCounter() as work:
        y = dropout.train()(x)
    assert dict(work.operators) == {"aten.native_dropout.default": 1}
    kept = y != 0
    assert 0.72 < kept.float().mean() < 0.78
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert torch.equal(dropout.eval()(x), x)
