"""Config tree: the base is the paper's recipe, every group maps onto constructor arguments,
every experiment composes and instantiates, bad overrides fail."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method
from omegaconf import OmegaConf

from detr_lightning.cli.build import build_module, instantiate_data
from detr_lightning.cli.train import train
from detr_lightning.cli.trainer import build_trainer
from detr_lightning.lightning import CocoDataModule
from detr_lightning.models import (
    DETR,
    Backbone,
    HungarianMatcher,
    PostProcess,
    SetCriterion,
    Transformer,
    build_criterion,
    build_detr,
)
from detr_lightning.utils.errors import SetupError
from helpers import ROOT
from helpers.data import make_tiny_synthetic
from helpers.pipeline import compose_config

CONF = ROOT / "src" / "detr_lightning" / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

# DETR-R50 on COCO as in Carion et al. 2020 (section 4 and A.4) and the official main.py,
# with the 500-epoch schedule of the 42.0 AP model.
PAPER_RECIPE = {
    "backbone._target_": "detr_lightning.models.Backbone",
    "backbone.name": "resnet50",
    "backbone.dilation": False,
    "backbone.pretrained": True,  # ImageNet initialization
    "backbone.weights": None,
    "backbone.norm": "frozen",
    "backbone.lr": 1e-5,
    "backbone.trainable_layers": 3,  # the stem and layer1 stay frozen
    "backbone.num_stages": 4,
    "model._target_": "detr_lightning.models.build_detr",
    "model.num_classes": None,  # from the data: 91 for COCO with label_mapping=category_id
    "model.num_queries": 100,
    "model.hidden_dim": 256,
    "model.nheads": 8,
    "model.enc_layers": 6,
    "model.dec_layers": 6,
    "model.dim_feedforward": 2048,
    "model.dropout": 0.1,
    "model.pre_norm": False,
    "model.aux_loss": True,
    "model.position_embedding": "sine",
    "model.batch_invariant": False,  # the padded batch through the backbone, as official
    # the paper's DETR: no training-only queries
    "model.query_groups": 1,
    "model.denoising": {"groups": 0, "label_noise": 0.2, "box_noise": 0.4},
    "loss._target_": "detr_lightning.models.build_criterion",
    "loss.set_cost_class": 1.0,
    "loss.set_cost_bbox": 5.0,
    "loss.set_cost_giou": 2.0,
    "loss.ce_loss_coef": 1.0,
    "loss.bbox_loss_coef": 5.0,
    "loss.giou_loss_coef": 2.0,
    "loss.eos_coef": 0.1,
    # the panoptic mask head's focal and dice weights (the official 1 and 1); no effect on a
    # model without masks
    "loss.mask_loss_coef": 1.0,
    "loss.dice_loss_coef": 1.0,
    "optimizer._target_": "torch.optim.AdamW",
    "optimizer.lr": 1e-4,
    "optimizer.weight_decay": 1e-4,
    "schedule._target_": "detr_lightning.lightning.optim.step_lr",
    "schedule.lr_drop": 400,
    "schedule.gamma": 0.1,
    "trainer.max_epochs": 500,
    "trainer.gradient_clip_val": 0.1,
    "trainer.gradient_clip_algorithm": "norm",
    "trainer.precision": "auto",  # 32-true except for training on GPUs with bf16
    "data._target_": "detr_lightning.lightning.CocoDataModule",
    "data.root": None,  # must be given (or $COCO_ROOT)
    "data.train_images": "train2017",
    "data.val_images": "val2017",
    "data.train_annotations": "annotations/instances_train2017.json",
    "data.val_annotations": "annotations/instances_val2017.json",
    "data.batch_size": 64,  # 16 GPUs x 4 images
    "data.scales": list(range(480, 801, 32)),
    "data.max_size": 1333,
    "data.crop": True,
    "data.crop_resize": [400, 500, 600],
    "data.crop_min": 384,
    "data.crop_max": 600,
    "data.val_size": 800,
    "data.label_mapping": "category_id",
    "data.synthetic": None,
    "pretrained": None,
    "postprocess._target_": "detr_lightning.models.PostProcess",
    "postprocess.score_threshold": 0.0,
    "postprocess.top_k": None,
}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_tiny_synthetic(tmp_path_factory.mktemp("coco"))


def test_base_config_is_the_paper_recipe(monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    cfg = compose_config("train", ["run_dir=x"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key, expected in PAPER_RECIPE.items():
        node = resolved
        for part in key.split("."):
            node = node[part]
        assert node == expected, (key, node, expected)
    # nothing beyond the recipe slipped in through a default experiment
    for group in ("backbone", "loss", "postprocess"):
        stated = {k.split(".")[1] for k in PAPER_RECIPE if k.split(".")[0] == group}
        assert set(resolved[group]) == stated, group
    stated = {k.split(".")[1] for k in PAPER_RECIPE if k[:6] == "model."}
    assert set(resolved["model"]) == stated | {"backbone"}
    assert resolved["model"]["backbone"] == resolved["backbone"]  # the backbone group's spec


def _defaults(*targets) -> dict:
    defaults = {}
    for target in targets:
        for name, parameter in inspect.signature(target).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                defaults.setdefault(name, parameter.default)
    return defaults


def test_library_defaults_are_the_recipe():
    """The constructors' defaults, the one source of the groups' defaults, are the paper's
    recipe, and the config states the recipe through them."""
    library = {
        "backbone": _defaults(Backbone),
        "model": _defaults(DETR, Transformer),
        "loss": _defaults(HungarianMatcher, SetCriterion),
        "postprocess": _defaults(PostProcess),
    }
    # the config's own choices: classes from the data, ImageNet weights (the library
    # downloads nothing unless asked)
    choices = {"model.num_classes": (91, None), "backbone.pretrained": (False, True)}
    for key, expected in PAPER_RECIPE.items():
        group, _, name = key.partition(".")
        if group not in library or name == "_target_":
            continue
        default, config = choices.get(key, (expected, expected))
        value = library[group][name]
        if dataclasses.is_dataclass(value):  # a group of settings (model.denoising)
            value = dataclasses.asdict(value)
        assert value == default, key
        assert expected == config, key


def _arguments(target) -> set[str]:
    return set(inspect.signature(target).parameters)


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_every_group_key_is_one_constructor_argument(experiment):
    overrides = ["run_dir=x"] + ([f"experiment={experiment}"] if experiment else [])
    cfg = compose_config("train", overrides)
    spec = lambda node: {k for k in node if k not in ("_target_", "_partial_")}
    assert spec(cfg.schedule) <= _arguments(get_method(cfg.schedule._target_)) - {"optimizer"}
    assert spec(cfg.optimizer) <= _arguments(get_method(cfg.optimizer._target_))
    assert spec(cfg.data) <= _arguments(CocoDataModule)
    assert spec(cfg.trainer) <= _arguments(pl.Trainer)
    # model: build_detr shares its settings out to DETR and its Transformer; its backbone is
    # the backbone group's spec
    assert get_method(cfg.model._target_) is build_detr
    assert spec(cfg.model) - {"backbone"} <= _arguments(DETR) | _arguments(Transformer)
    assert OmegaConf.to_container(cfg.model.backbone) == OmegaConf.to_container(cfg.backbone)
    assert get_method(cfg.backbone._target_) is Backbone
    assert spec(cfg.backbone) == _arguments(Backbone)
    assert get_method(cfg.loss._target_) is build_criterion
    assert spec(cfg.loss) <= _arguments(HungarianMatcher) | _arguments(SetCriterion)
    assert get_method(cfg.postprocess._target_) is PostProcess
    assert spec(cfg.postprocess) <= _arguments(PostProcess)


def test_no_experiment_by_default():
    assert "experiment" not in OmegaConf.to_container(compose_config("train", ["run_dir=x"]))


@pytest.mark.parametrize("model", ["detr_r101", "detr_r101_dc5"])
def test_other_models_inherit_and_state_only_the_backbone(model):
    base = OmegaConf.to_container(compose_config("train", ["run_dir=x"]), resolve=True)
    other = OmegaConf.to_container(compose_config("train", [f"model={model}", "run_dir=x"]),
                                   resolve=True)  # fmt: skip
    expected_backbone = {**base["backbone"], "name": "resnet101", "dilation": model.endswith("dc5")}
    assert other["backbone"] == expected_backbone
    assert other["model"]["backbone"] == expected_backbone  # the model builds that backbone
    without_backbone = lambda c: (
        {k: v for k, v in c.items() if k != "backbone"}
        | {"model": {k: v for k, v in c["model"].items() if k != "backbone"}}
    )
    assert without_backbone(other) == without_backbone(base)
    # and a backbone chosen explicitly wins over the model's
    cfg = compose_config("train", [f"model={model}", "backbone=resnet50", "run_dir=x"])
    assert cfg.backbone.name == "resnet50"


def test_schedules_carry_no_dead_keys():
    cosine = compose_config("train", ["schedule=cosine", "run_dir=x"]).schedule
    assert set(cosine) == {"_target_", "_partial_", "warmup_steps"}
    step = compose_config("train", ["run_dir=x"]).schedule
    assert set(step) == {"_target_", "_partial_", "lr_drop", "gamma"}


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_config_composes_and_instantiates(experiment, coco_root, tmp_path):
    overrides = [f"run_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=1",
                 "backbone.pretrained=false"]  # fmt: skip
    if experiment:
        overrides.append(f"experiment={experiment}")
    if experiment != "synthetic_cpu":
        overrides.append(f"data.root={coco_root}")
    if experiment == "finetune_custom":
        overrides.append("pretrained=null")  # the real job names a checkpoint here
    cfg = compose_config("train", overrides)
    datamodule = instantiate_data(cfg.data)
    module = build_module(cfg, datamodule)
    assert module.model.backbone.name == cfg.backbone.name
    assert module.model.backbone.dilation == cfg.backbone.dilation
    assert module.model.num_queries == cfg.model.num_queries
    assert module.model.num_classes == (cfg.model.num_classes or datamodule.num_classes)
    assert module.hparams.data == datamodule.evaluation_settings()
    trainer = build_trainer(cfg)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert trainer.gradient_clip_val == cfg.trainer.gradient_clip_val
    if experiment != "synthetic_cpu":  # the paper clips the gradient norm at 0.1
        assert trainer.gradient_clip_val == pytest.approx(0.1)
    if experiment is None:  # category_id labels: max id 9 of the tiny dataset + 1
        assert module.model.num_classes == 10


def test_no_dataset_is_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    cfg = compose_config("train", [f"run_dir={tmp_path}"])
    with pytest.raises(SetupError, match=r"data\.root=.*: detr-train experiment=synthetic_cpu"):
        train(cfg)
    cfg = compose_config("train", [f"run_dir={tmp_path}", f"data.root={tmp_path / 'none'}"])
    with pytest.raises(SetupError, match=r"data\.root=.*none is not a directory"):
        train(cfg)


def test_any_trainer_argument_is_overridable():
    cfg = compose_config("train", ["run_dir=x", "trainer.accumulate_grad_batches=4",
                                   "trainer.limit_val_batches=0.5"])  # fmt: skip
    assert cfg.trainer.accumulate_grad_batches == 4 and cfg.trainer.limit_val_batches == 0.5


@pytest.mark.parametrize("override", ["model.num_clases=3", "data.batchsize=2", "lr=0.1"])
def test_unknown_override_key_is_an_error(override):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("train", ["run_dir=x", override])
    assert override.split("=")[0] in str(info.value) + str(info.value.__cause__)


LAUNCHERS = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))


def _compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides, return_hydra_config=True)


def test_plain_training_needs_no_launcher_or_sweeper_plugin():
    hydra_cfg = _compose_with_hydra(["run_dir=x"]).hydra
    assert (
        hydra_cfg.launcher._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    )
    assert hydra_cfg.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    assert compose_config("train", ["run_dir=x"]).optimized_metric is None


@pytest.mark.parametrize("name", ["train", "eval", "predict", "export"])
def test_hydra_output_dir_follows_a_given_run_dir(name, tmp_path, monkeypatch):
    """run_dir=PATH moves Hydra's directory too (its log and .hydra/ go with the run); without
    it, run_dir is Hydra's default directory, named after the start time or SLURM's job id."""
    from hydra import compose, initialize_config_dir

    import detr_lightning.cli.config  # noqa: F401  (what the entry scripts import)

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # resolved at once: the default reads the environment
        given = compose(name, [f"run_dir={tmp_path / 'run'}"], return_hydra_config=True)
        assert given.hydra.run.dir == str(tmp_path / "run")
        default = compose(name, [], return_hydra_config=True).hydra.run.dir
        assert re.fullmatch(rf"outputs/{name}/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d", default)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        slurm = compose(name, [], return_hydra_config=True).hydra.run.dir
        assert slurm == f"outputs/{name}/4242"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_configs_follow_the_trainer(launcher):
    cfg = _compose_with_hydra([f"hydra/launcher={launcher}", "trainer.devices=4",
                               "trainer.num_nodes=2", "run_dir=x"])  # fmt: skip
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].startswith("hydra_plugins.hydra_submitit_launcher.")
    assert params["gpus_per_node"] == 4
    if launcher == "slurm":  # one SLURM task per GPU, as Lightning's SLURM detection wants
        assert (params["nodes"], params["tasks_per_node"]) == (2, 4)
    else:  # one local process; Lightning starts the DDP processes
        assert params["tasks_per_node"] == 1
    # the training config itself is untouched
    assert compose_config("train", [f"hydra/launcher={launcher}", "run_dir=x"]) == compose_config(
        "train", ["run_dir=x"]
    )


@pytest.mark.parametrize("search", SEARCHES)
def test_hparams_search_configs_search_existing_keys(search):
    cfg = _compose_with_hydra([f"hparams_search={search}", "run_dir=x"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "detr_lightning.cli.tune"  # read by detr-tune, not a sweeper
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val/map"
    assert cfg.hydra.mode.name == "MULTIRUN"
    for key in sweeper.params:  # every searched key exists, so no trial fails on a typo
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    searched = {"optimizer.lr", "backbone.lr", "loss.eos_coef", "loss.set_cost_class",
                "loss.set_cost_bbox", "loss.set_cost_giou", "model.num_queries"}  # fmt: skip
    assert searched <= set(sweeper.params)
