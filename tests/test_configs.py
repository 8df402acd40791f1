"""Every config composes and instantiates; public override keys exist; bad overrides fail."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from data_fixtures import make_tiny_synthetic
from detr_lightning.train import build_module, build_trainer, model_settings
from pipeline_fixtures import compose_config

EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")
)
PUBLIC_KEYS = [
    "model.num_classes",
    "model.num_queries",
    "model.hidden_dim",
    "model.nheads",
    "model.enc_layers",
    "model.dec_layers",
    "model.dim_feedforward",
    "model.dropout",
    "model.pre_norm",
    "model.aux_loss",
    "backbone.name",
    "backbone.dilation",
    "backbone.lr",
    "backbone.pretrained",
    "backbone.norm",
    "loss.set_cost_class",
    "loss.set_cost_bbox",
    "loss.set_cost_giou",
    "loss.bbox_loss_coef",
    "loss.giou_loss_coef",
    "loss.eos_coef",
    "optimizer.lr",
    "optimizer.weight_decay",
    "schedule.lr_drop",
    "data.root",
    "data.batch_size",
    "data.num_workers",
    "data.scales",
    "data.max_size",
    "data.crop",
    "data.crop_resize",
    "data.crop_min",
    "data.crop_max",
    "data.val_size",
    "pretrained",
    "ckpt_path",
    "seed",
]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_tiny_synthetic(tmp_path_factory.mktemp("coco"))


def test_experiment_list_is_complete():
    expected = {"detr_r50_coco", "detr_r101_coco", "detr_r101_dc5_coco", "finetune_custom",
                "synthetic_cpu"}  # fmt: skip
    assert expected <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, coco_root, tmp_path):
    overrides = [f"experiment={experiment}", f"run_dir={tmp_path}", "trainer.accelerator=cpu",
                 "trainer.devices=1", "backbone.pretrained=false"]  # fmt: skip
    if experiment != "synthetic_cpu":
        overrides.append(f"data.root={coco_root}")
    if experiment == "finetune_custom":
        overrides.append("pretrained=null")  # the real job names a checkpoint here
    cfg = compose_config("train", overrides)
    for key in PUBLIC_KEYS:
        node, _, leaf = key.rpartition(".")
        assert leaf in (OmegaConf.select(cfg, node) if node else cfg), key
    datamodule = instantiate(cfg.data, _convert_="all")
    module = build_module(cfg, datamodule)
    settings = model_settings(cfg, datamodule.num_classes)
    assert module.model.backbone.name == cfg.backbone.name
    assert module.model.backbone.dilation == cfg.backbone.dilation
    assert module.model.num_queries == cfg.model.num_queries
    assert module.model.num_classes == settings["num_classes"]
    trainer = build_trainer(cfg)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert trainer.gradient_clip_val == cfg.trainer.gradient_clip_val
    if experiment != "synthetic_cpu":  # the paper clips the gradient norm at 0.1
        assert trainer.gradient_clip_val == pytest.approx(0.1)


def test_paper_recipes():
    r101 = compose_config("train", ["experiment=detr_r101_coco", "run_dir=x"])
    assert (r101.backbone.name, r101.backbone.dilation, r101.model.num_classes) == (
        "resnet101",
        False,
        91,
    )
    assert (r101.optimizer.lr, r101.backbone.lr, r101.optimizer.weight_decay) == (1e-4, 1e-5, 1e-4)
    assert (r101.loss.eos_coef, r101.loss.bbox_loss_coef, r101.loss.giou_loss_coef) == (0.1, 5, 2)
    assert (r101.schedule.name, r101.schedule.lr_drop, r101.trainer.max_epochs) == (
        "step",
        400,
        500,
    )
    assert r101.data.scales == list(range(480, 801, 32)) and r101.data.max_size == 1333
    dc5 = compose_config("train", ["experiment=detr_r101_dc5_coco", "run_dir=x"])
    assert (dc5.backbone.name, dc5.backbone.dilation) == ("resnet101", True)


def test_model_group_selects_backbone():
    cfg = compose_config("train", ["~experiment", "model=detr_r101", "run_dir=x"])
    assert cfg.backbone.name == "resnet101"
    cfg = compose_config(
        "train", ["~experiment", "model=detr_r101", "backbone=resnet50", "run_dir=x"]
    )
    assert cfg.backbone.name == "resnet50"


def test_any_trainer_argument_is_overridable():
    cfg = compose_config("train", ["run_dir=x", "trainer.accumulate_grad_batches=4",
                                   "trainer.limit_val_batches=0.5"])  # fmt: skip
    assert cfg.trainer.accumulate_grad_batches == 4 and cfg.trainer.limit_val_batches == 0.5


@pytest.mark.parametrize("override", ["model.num_clases=3", "data.batchsize=2", "lr=0.1"])
def test_unknown_override_key_is_an_error(override):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("train", ["run_dir=x", override])
    assert override.split("=")[0] in str(info.value) + str(info.value.__cause__)
