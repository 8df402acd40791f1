"""Training with query groups, denoising queries, EMA weights and early stopping through the
training entry point: they train, resume exactly, and leave DETR's layout in exports."""

from __future__ import annotations

import json

import torch

from detr_lightning import load_pretrained, save_pretrained
from detr_lightning.checkpoints.reading import read_checkpoint
from detr_lightning.cli.train import train
from detr_lightning.lightning.callbacks import EMA
from detr_lightning.models.training_queries import TRAINING_ONLY_PREFIX
from helpers import FIXTURES
from helpers.pipeline import RecordBatches, compose_config, tiny_overrides

OPTIONS = [
    "model.query_groups=2",
    "model.denoising.groups=2",
    "callbacks=default",
    "callbacks.progress_bar=null",
    "callbacks.ema.decay=0.9",
    "callbacks.ema.warmup_steps=2",
    "schedule=cosine",
    "schedule.warmup_steps=2",
]


class StopAfterFirstEpoch(RecordBatches):
    """The run of the same config, stopped after its first epoch (as a kill would): the
    learning-rate schedule is the one of the whole run."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


class ValidationWeights(RecordBatches):
    """Checks that validation runs on the averaged weights: during validation the model holds
    the average, and the averaging callback holds the training weights of the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.trained = pl_module.model.class_embed.weight.detach().clone()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        if trainer.sanity_checking or batch_idx:
            return
        (ema,) = [c for c in trainer.callbacks if isinstance(c, EMA)]
        held = ema._average_model.module.model.class_embed.weight
        assert torch.equal(held, self.trained)
        assert not torch.equal(pl_module.model.class_embed.weight, self.trained)
        self.checked += 1


def _state(path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def test_groups_denoising_and_ema_train_and_resume_exactly(tmp_path):
    straight = ValidationWeights()
    train(compose_config("train", tiny_overrides(tmp_path / "straight", *OPTIONS)), [straight])
    assert straight.checked == 2  # both epochs' validations
    first = StopAfterFirstEpoch()
    train(compose_config("train", tiny_overrides(tmp_path / "first", *OPTIONS)), [first])
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = RecordBatches()
    overrides = tiny_overrides(tmp_path / "resumed", *OPTIONS, f"ckpt_path={checkpoint}")
    train(compose_config("train", overrides), [resumed])
    steps = len(first.losses)
    assert steps == 2 and resumed.losses == straight.losses[steps:]

    ends = [_state(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("straight", "resumed")]
    for key in ("state_dict", "current_model_state"):  # the average, and the trained weights
        assert ends[0][key].keys() == ends[1][key].keys()
        for name, value in ends[0][key].items():
            assert torch.equal(value, ends[1][key][name]), (key, name)
    average, current = ends[0]["state_dict"], ends[0]["current_model_state"]
    assert any(k.startswith("model." + TRAINING_ONLY_PREFIX) for k in current)
    assert not torch.equal(average["model.class_embed.weight"], current["model.class_embed.weight"])

    # the denoising terms were logged
    header = (tmp_path / "straight" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert {"train/loss_ce_dn", "train/loss_giou_dn_0", "val/map"} <= set(header.split(","))

    # exports: DETR's layout, the averaged weights
    module = load_pretrained(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(module.model.class_embed.weight,
                               average["model.class_embed.weight"])  # fmt: skip
    exported = save_pretrained(module, tmp_path / "export")
    info = read_checkpoint(exported)
    assert not any(k.startswith(TRAINING_ONLY_PREFIX) for k in info["state_dict"])
    assert info["model"]["query_groups"] == 1 and info["model"]["denoising"]["groups"] == 0
    assert set(info["state_dict"]) == {
        k for k in module.model.state_dict() if not k.startswith(TRAINING_ONLY_PREFIX)
    }


def test_fine_tuning_with_groups_starts_every_group_from_the_checkpoint_queries(tmp_path):
    """pretrained= a checkpoint without query groups: each extra group copies its queries."""
    plain_run = tmp_path / "plain"
    train(compose_config("train", tiny_overrides(plain_run, "trainer.max_epochs=1",
                                                 "callbacks=default",
                                                 "callbacks.progress_bar=null")))  # fmt: skip
    source = plain_run / "checkpoints" / "last.ckpt"
    grouped = []

    class Capture(RecordBatches):
        def on_train_start(self, trainer, pl_module) -> None:
            grouped.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    train(compose_config("train", tiny_overrides(tmp_path / "grouped", "model.query_groups=3",
                                                 f"pretrained={source}",
                                                 "trainer.max_epochs=1")), [Capture()])  # fmt: skip
    queries = _state(source)["state_dict"]["model.query_embed.weight"]
    start = grouped[0]
    assert torch.equal(start["query_embed.weight"], queries)
    assert torch.equal(start["training_queries.group_queries"], queries.repeat(2, 1))


def test_early_stopping_stops_a_run_whose_map_does_not_improve(tmp_path):
    cfg = compose_config("train", tiny_overrides(
        tmp_path / "run", "callbacks=default", "callbacks.progress_bar=null",
        "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=1.0",
        "trainer.max_epochs=6",
    ))  # fmt: skip
    record = RecordBatches()
    train(cfg, [record])
    # min_delta 1.0: no validation improves; the second one stops the run
    assert len(record.losses) == 2 * 2


def test_with_everything_off_training_is_exactly_the_earlier_codes(tmp_path):
    """The fixture's losses were written by the code before these options existed, from the
    same config and seed: with them off (the defaults) every step's loss is the same float."""
    fixture = json.loads((FIXTURES / "tiny_training_losses.json").read_text())
    record = RecordBatches()
    # one thread: the same float sums in any process (xdist workers or not)
    overrides = tiny_overrides(tmp_path / "run", "trainer.max_epochs=2", "callbacks=default",
                               "callbacks.progress_bar=null", "cpu_threads=1")  # fmt: skip
    train(compose_config("train", overrides), [record])
    assert record.losses == fixture["losses"]
