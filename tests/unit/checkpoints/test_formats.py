"""Checkpoint formats other than parity: our own files, class-head re-initialization, bad files."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

import detr_lightning as dl
from detr_lightning.checkpoints.reading import CheckpointError, read_checkpoint
from helpers.models import tiny_spec


def _tiny_module(**overrides) -> dl.DETRModule:
    label_map = {"category_ids": [1, 3, 4, 7, 9], "names": ["a", "b", "c", "d", "e"]}
    return dl.DETRModule(
        model=tiny_spec(**{"num_queries": 8, **overrides}), label_map=label_map
    ).eval()


def _official_state(module: dl.DETRModule) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in module.model.state_dict().items():
        if key.startswith("backbone."):
            key = "backbone.0." + key[len("backbone.") :]
        state[key] = value.clone()
    return state


def _same_outputs(a: dl.DETRModule, b: dl.DETRModule) -> None:
    images = [torch.randn(3, 64, 80), torch.randn(3, 72, 56)]
    with torch.no_grad():
        out_a, out_b = a(images), b(images)
    assert torch.equal(out_a["pred_logits"], out_b["pred_logits"])
    assert torch.equal(out_a["pred_boxes"], out_b["pred_boxes"])


def test_export_round_trip(tmp_path):
    module = _tiny_module(pre_norm=True)
    directory = dl.save_pretrained(module, tmp_path / "export")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    loaded = dl.load_pretrained(directory)
    assert loaded.hparams.model == module.hparams.model
    assert loaded.label_map == module.label_map
    _same_outputs(module, loaded)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_export_round_trip_of_a_trainable_norm(tmp_path, norm):
    """BatchNorm's step counters (num_batches_tracked) are dropped on reading, as for every
    format, and the export still loads: the CPU demo's model (backbone.norm=batch)."""
    module = _tiny_module(norm=norm, pretrained=False)
    with torch.no_grad():  # statistics away from the initial ones, so that they must load
        for name, buffer in module.model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    directory = dl.save_pretrained(module, tmp_path / "export")
    loaded = dl.load_pretrained(directory)
    _same_outputs(module, loaded)


def test_lightning_checkpoint_round_trip(tmp_path):
    import pytorch_lightning as pl

    module = _tiny_module()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    _same_outputs(module, dl.load_pretrained(tmp_path / "model.ckpt"))
    _same_outputs(module, dl.DETRModule.load_from_checkpoint(tmp_path / "model.ckpt").eval())


def test_official_checkpoint_with_training_args(tmp_path):
    """Official training checkpoints hold an argparse.Namespace; it is allowed, nothing else."""
    module = _tiny_module()
    args = argparse.Namespace(dilation=False, nheads=4, lr=1e-4)
    torch.save({"model": _official_state(module), "args": args, "epoch": 3}, tmp_path / "ck.pth")
    loaded = dl.load_pretrained(tmp_path / "ck.pth")
    assert loaded.hparams.model["nheads"] == 4
    _same_outputs(module, loaded)


def test_inferred_architecture(tmp_path):
    module = _tiny_module(backbone="resnet34", num_queries=12, enc_layers=2, dec_layers=3)
    torch.save({"model": _official_state(module)}, tmp_path / "ck.pth")
    model = read_checkpoint(tmp_path / "ck.pth")["model"]
    assert model["backbone"]["name"] == "resnet34"
    assert (model["num_queries"], model["enc_layers"], model["dec_layers"]) == (12, 2, 3)
    assert (model["num_classes"], model["hidden_dim"], model["dim_feedforward"]) == (5, 32, 64)


def test_num_classes_reinitializes_class_head_only(tmp_path, caplog):
    module = _tiny_module()
    torch.save({"model": _official_state(module)}, tmp_path / "ck.pth")
    with caplog.at_level(logging.INFO, logger="detr_lightning.api"):
        loaded = dl.load_pretrained(tmp_path / "ck.pth", num_classes=2)
    assert "re-initializing the class head" in caplog.text
    assert loaded.model.class_embed.weight.shape == (3, 32)
    ours, theirs = loaded.model.state_dict(), module.model.state_dict()
    for key in ours:
        if key.startswith("class_embed."):
            continue
        assert torch.equal(ours[key], theirs[key]), key
    assert loaded.hparams.model["num_classes"] == 2


# ------------------------------------------------------------------------------ bad inputs
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        dl.load_pretrained(tmp_path / "nope.pth")


def test_truncated_file(tmp_path):
    module = _tiny_module()
    path = tmp_path / "truncated.pth"
    torch.save({"model": _official_state(module)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth"):
        dl.load_pretrained(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"random\.pth"):
        dl.load_pretrained(path)


def test_a_file_that_is_no_checkpoint_is_not_called_unsafe(tmp_path):
    """An image saved as .pth is garbage to the unpickler: the message says so, and does not
    send the user to the unsafe-pickle advice (nor to weights_only=False)."""
    from PIL import Image

    path = tmp_path / "photo.pth"
    Image.new("RGB", (32, 24), (200, 30, 30)).save(path, format="JPEG")
    with pytest.raises(CheckpointError, match=r"photo\.pth: not a PyTorch checkpoint") as info:
        dl.load_pretrained(path)
    assert "Unsupported operand" in str(info.value)
    assert "could execute code" not in str(info.value) and "weights_only" not in str(info.value)


def test_corrupt_safetensors(tmp_path):
    directory = dl.save_pretrained(_tiny_module(), tmp_path / "export")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        dl.load_pretrained(directory)


def test_unknown_layout(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path)
    with pytest.raises(CheckpointError, match=r"resnet.pth: unknown checkpoint layout"):
        dl.load_pretrained(path)


def test_shape_mismatch_outside_class_head(tmp_path):
    state = _official_state(_tiny_module())
    state["transformer.encoder.layers.0.norm1.weight"] = torch.ones(33)
    torch.save({"model": state}, tmp_path / "bad-shape.pth")
    with pytest.raises(CheckpointError, match=r"bad-shape.pth(.|\n)*shape mismatch") as info:
        dl.load_pretrained(tmp_path / "bad-shape.pth", num_classes=3)
    assert "encoder.layers.0.norm1.weight: checkpoint (33,) vs model (32,)" in str(info.value)


def test_missing_keys(tmp_path):
    state = _official_state(_tiny_module())
    del state["transformer.decoder.layers.1.norm3.weight"]
    torch.save({"model": state}, tmp_path / "missing-key.pth")
    with pytest.raises(CheckpointError, match=r"missing-key.pth(.|\n)*norm3.weight"):
        dl.load_pretrained(tmp_path / "missing-key.pth")


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"model": _Payload(marker)}, handle)
    # torch's legacy (non-zip) format is also refused by weights_only
    zipped = tmp_path / "evil-zip.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": _Payload(marker)}, zipped)
    for bad in (path, zipped):
        with pytest.raises(CheckpointError, match=bad.name) as info:
            dl.load_pretrained(bad)
        assert "weights_only" not in str(info.value)  # no advice to turn the check off
    # torch's own file names the refused class (a bare pickle is no PyTorch file to torch)
    assert "refused to load" in str(info.value) and "Unsupported global" in str(info.value)
    assert not marker.exists()


def test_official_round_trip_after_training_with_groups_and_denoising(tmp_path):
    """Weights trained with training-only queries, saved in the official layout (without
    them), load into a plain model with the same outputs, and back into a grouped one with
    every group copied from the queries."""
    grouped = _tiny_module(query_groups=2, denoising={"groups": 3})
    with torch.no_grad():  # trained-looking training-only tensors
        for parameter in grouped.model.training_queries.parameters():
            parameter.uniform_(-1, 1)
    state = {
        k: v for k, v in _official_state(grouped).items() if not k.startswith("training_queries.")
    }
    args = argparse.Namespace(nheads=grouped.hparams.model["nheads"])  # not in the weights
    torch.save({"model": state, "args": args}, tmp_path / "detr-r18.pth")
    plain = dl.load_pretrained(tmp_path / "detr-r18.pth")
    assert plain.model.training_queries is None
    _same_outputs(grouped, plain)
    regrouped = _tiny_module(query_groups=2, denoising={"groups": 3})
    from detr_lightning.checkpoints.loading import load_state_into

    load_state_into(regrouped.model, read_checkpoint(tmp_path / "detr-r18.pth")["state_dict"],
                    tmp_path / "detr-r18.pth")  # fmt: skip
    queries = regrouped.model.training_queries
    assert torch.equal(queries.group_queries, grouped.model.query_embed.weight)
    _same_outputs(grouped, regrouped)
    # and a grouped Lightning-style state (with the tensors) loads into a plain model
    load_state_into(plain.model, dict(grouped.model.state_dict()), "grouped.ckpt")
    _same_outputs(grouped, plain)
