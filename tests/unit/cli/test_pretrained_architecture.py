"""``pretrained=``: the settings a checkpoint records are checked against the config before a
model is built, shape-neutral ones (backbone.norm, model.nheads) too, each with its override."""

from __future__ import annotations

import argparse
import json
import re
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

import detr_lightning as dl
from detr_lightning.cli.build import build_module
from detr_lightning.utils.errors import SetupError
from helpers.pipeline import compose_config, tiny_overrides

LABEL_MAP = {"category_ids": [1, 2, 3], "names": ["a", "b", "c"]}
# what build_module reads off a data module
DATA = SimpleNamespace(label_map=LABEL_MAP, evaluation_settings=lambda: {})


def _config(tmp_path, *overrides: str):
    return compose_config("train", tiny_overrides(tmp_path / "run", *overrides))


def _source(tmp_path, *overrides: str) -> dl.DETRModule:
    """A module of the tiny training config with ``overrides``, its BatchNorm statistics (if
    any) moved away from their initial values so that loading them shows."""
    module = build_module(_config(tmp_path, *overrides), DATA)
    with torch.no_grad():
        for name, buffer in module.model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    return module


def _lightning_checkpoint(module: dl.DETRModule, path):
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def _forget(checkpoint, *keys: tuple[str, ...]) -> None:
    """Drop the settings at ``keys`` (paths into the model spec) from a Lightning checkpoint,
    as files written before they were recorded."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for path in keys:
        spec = content["hyper_parameters"]["model"]
        for key in path[:-1]:
            spec = spec[key]
        del spec[path[-1]]
    torch.save(content, checkpoint)


def _same_weights(a: dl.DETRModule, b: dl.DETRModule) -> None:
    ours, theirs = a.model.state_dict(), b.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "weights not loaded"


def test_a_norm_batch_4_head_checkpoint_names_both_overrides(tmp_path):
    """The CPU demo's kind of checkpoint (trainable BatchNorm, 4 heads) in a config with frozen
    BatchNorm and 2 heads: the same tensor shapes, another model. Refused before anything is
    built, naming each key and the overrides; with them the checkpoint loads."""
    source = _source(tmp_path / "a", "backbone.norm=batch", "model.nheads=4")
    checkpoint = _lightning_checkpoint(source, tmp_path / "demo.ckpt")
    other = _config(tmp_path / "b", "backbone.norm=frozen", f"pretrained={checkpoint}")
    with pytest.raises(SetupError) as info:
        build_module(other, DATA)
    message = str(info.value)
    assert f"pretrained={checkpoint} holds the weights of another architecture" in message
    assert "norm: checkpoint batch, config frozen: set backbone.norm=batch" in message
    assert "nheads: checkpoint 4, config 2: set model.nheads=4" in message
    assert "all together: backbone.norm=batch model.nheads=4" in message
    assert "num_batches_tracked" not in message and "hidden_dim" not in message

    fixed = ["backbone.norm=batch", "model.nheads=4", f"pretrained={checkpoint}"]
    module = build_module(_config(tmp_path / "c", *fixed), DATA)
    assert module.model.transformer.encoder.layers[0].self_attn.num_heads == 4
    _same_weights(module, source)


def test_one_setting_that_differs_has_no_all_together_line(tmp_path):
    """An export with 4 heads in a 2-head config: the one override, once."""
    exported = dl.save_pretrained(_source(tmp_path / "a", "model.nheads=4"), tmp_path / "x")
    with pytest.raises(SetupError) as info:
        build_module(_config(tmp_path / "b", f"pretrained={exported}"), DATA)
    message = str(info.value)
    assert "nheads: checkpoint 4, config 2: set model.nheads=4" in message
    assert "all together" not in message and "norm:" not in message


def test_the_official_files_head_count_is_checked_when_their_args_record_it(tmp_path):
    source = _source(tmp_path / "a")  # 2 heads
    state = {
        key.replace("backbone.", "backbone.0.", 1) if key.startswith("backbone.") else key: value
        for key, value in source.model.state_dict().items()
    }
    official = tmp_path / "official.pth"
    torch.save({"model": state, "args": argparse.Namespace(nheads=8)}, official)
    with pytest.raises(SetupError, match=r"nheads: checkpoint 8, config 2: set model\.nheads=8"):
        build_module(_config(tmp_path / "b", f"pretrained={official}"), DATA)
    # without args the file records no head count: the config's is taken, as always
    torch.save({"model": state}, official)
    module = build_module(_config(tmp_path / "c", f"pretrained={official}"), DATA)
    assert torch.equal(module.model.query_embed.weight, source.model.query_embed.weight)


def test_checkpoints_that_do_not_record_the_settings_load_as_before(tmp_path):
    """Files without backbone.norm or model.nheads in their settings: not compared."""
    source = _source(tmp_path / "a", "backbone.norm=frozen", "model.nheads=4")
    checkpoint = _lightning_checkpoint(source, tmp_path / "old.ckpt")
    _forget(checkpoint, ("backbone", "norm"), ("nheads",))
    # frozen statistics fit trainable BatchNorm; the head count leaves the shapes alone
    cfg = _config(tmp_path / "b", "backbone.norm=batch", f"pretrained={checkpoint}")
    module = build_module(cfg, DATA)
    assert module.model.transformer.encoder.layers[0].self_attn.num_heads == 2
    ours, theirs = module.model.state_dict(), source.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    # an export's config.json without them
    exported = dl.save_pretrained(source, tmp_path / "export")
    config = json.loads((exported / "config.json").read_text())
    del config["hparams"]["model"]["backbone"]["norm"], config["hparams"]["model"]["nheads"]
    (exported / "config.json").write_text(json.dumps(config))
    cfg = _config(tmp_path / "c", "backbone.norm=frozen", f"pretrained={exported}")
    _same_weights(build_module(cfg, DATA), source)


@pytest.mark.parametrize(
    ("theirs", "ours", "fix"),
    [("batch", "frozen", "backbone.norm=batch"), ("group", "frozen", "backbone.norm=group"),
     ("frozen", "group", "backbone.norm=frozen (or batch)")],
)  # fmt: skip
def test_a_norm_the_checkpoint_does_not_record_is_named_by_its_buffers(tmp_path, theirs, ours, fix):
    """An older file that does not record its norm, in a config with another: the weights do
    not fit, and the error says which norm they need instead of only listing the keys."""
    source = _source(tmp_path / "a", f"backbone.norm={theirs}")
    checkpoint = _lightning_checkpoint(source, tmp_path / "old.ckpt")
    _forget(checkpoint, ("backbone", "norm"))
    cfg = _config(tmp_path / "b", f"backbone.norm={ours}", f"pretrained={checkpoint}")
    with pytest.raises(SetupError, match=r"does not fit the model(.|\n)*set " + re.escape(fix)):
        build_module(cfg, DATA)
