"""Settings of the package's first layout, read into today's: hand-written old settings and
the specs they must become."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import detr_lightning as dl
from detr_lightning.checkpoints.legacy import moved_target, upgrade_model, upgrade_module_hparams
from detr_lightning.cli.config import upgrade_config
from helpers import FIXTURES

FLAT_MODEL = {  # DETRModule's "model" hyper-parameter in the first layout
    "num_classes": 3,
    "num_queries": 8,
    "hidden_dim": 32,
    "nheads": 2,
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 64,
    "backbone": "resnet18",
    "dilation": False,
    "pretrained_backbone": False,
    "backbone_weights": None,
    "norm": "frozen",
    "trainable_layers": 3,
    "num_stages": 3,
}
SPEC = {
    "_target_": "detr_lightning.models.build_detr",
    "num_classes": 3,
    "num_queries": 8,
    "hidden_dim": 32,
    "nheads": 2,
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 64,
    "backbone": {
        "_target_": "detr_lightning.models.Backbone",
        "name": "resnet18",
        "dilation": False,
        "pretrained": False,
        "weights": None,
        "norm": "frozen",
        "trainable_layers": 3,
        "num_stages": 3,
        "lr": 0.0,
    },
}


def test_a_flat_model_and_its_backbone_lr_become_the_spec():
    assert upgrade_model(FLAT_MODEL, backbone_lr=0.0) == SPEC
    assert upgrade_model(SPEC) == SPEC  # today's layout comes back as it is
    frozen = upgrade_model({**FLAT_MODEL, "train_backbone": False}, backbone_lr=1e-5)
    assert frozen["backbone"]["lr"] == 0.0  # train_backbone=False froze it


def test_module_settings_of_the_first_layout():
    old = {
        "model": FLAT_MODEL,
        "loss": {"set_cost_class": 2.0, "eos_coef": 0.2},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4},
        "backbone_lr": 0.0,
        "schedule": {"_target_": "detr_lightning.schedules.step_lr", "lr_drop": 4},
        "postprocess": {"score_threshold": 0.0, "top_k": None},
        "label_map": None,
    }
    new = upgrade_module_hparams(old)
    assert "backbone_lr" not in new and new["model"] == SPEC
    assert new["loss"] == {"_target_": "detr_lightning.models.build_criterion",
                           "set_cost_class": 2.0, "eos_coef": 0.2}  # fmt: skip
    assert new["postprocess"]["_target_"] == "detr_lightning.models.PostProcess"
    assert new["schedule"]["_target_"] == "detr_lightning.lightning.optim.step_lr"
    assert new["optimizer"] == old["optimizer"]
    assert upgrade_module_hparams(new) == new


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("detr_lightning.schedules.warmup_cosine", "detr_lightning.lightning.optim.warmup_cosine"),
        ("detr_lightning.callbacks.StepCheckpoint",
         "detr_lightning.lightning.callbacks.StepCheckpoint"),
        ("detr_lightning.callbacks.NonFiniteStop",
         "detr_lightning.lightning.nonfinite.NonFiniteStop"),
        ("detr_lightning.loggers.CSVLogger", "detr_lightning.lightning.loggers.CSVLogger"),
        ("detr_lightning.data.CocoDataModule", "detr_lightning.lightning.CocoDataModule"),
        ("detr_lightning.sweeps.SaveBestTrial", "detr_lightning.cli.sweeps.SaveBestTrial"),
        ("torch.optim.AdamW", "torch.optim.AdamW"),
        ("detr_lightning.models.Backbone", "detr_lightning.models.Backbone"),
    ],
)  # fmt: skip
def test_moved_targets(old, new):
    assert moved_target(old) == new


def test_the_first_layouts_config_is_upgraded_with_a_warning(caplog):
    old = OmegaConf.load(FIXTURES / "legacy_run" / ".hydra" / "config.yaml")
    new = upgrade_config(old)
    assert "earlier version of detr-lightning" in caplog.text
    assert new.model._target_ == "detr_lightning.models.build_detr"
    assert new.model.backbone == new.backbone  # the interpolation of the backbone group
    assert new.backbone._target_ == "detr_lightning.models.Backbone"
    assert new.backbone.lr == 0 and new.model.hidden_dim == 32
    assert new.loss._target_ == "detr_lightning.models.build_criterion"
    assert new.schedule._target_ == "detr_lightning.lightning.optim.step_lr"
    assert new.data._target_ == "detr_lightning.lightning.CocoDataModule"
    caplog.clear()
    assert upgrade_config(new) is new and not caplog.text  # today's: untouched, no warning


def test_a_spec_with_the_backbone_by_name_saves_and_loads(tmp_path):
    spec = {**SPEC, "backbone": "resnet18"}
    module = dl.DETRModule(model=spec).eval()
    assert module.hparams.model["backbone"] == "resnet18"
    loaded = dl.load_pretrained(dl.save_pretrained(module, tmp_path / "export"))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)["pred_boxes"], module(images)["pred_boxes"])
