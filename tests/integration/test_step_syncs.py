"""A default training step reads the device on the host twice: the matching's one copy of
its cost, and the one check of the loss and gradients (the host-work counter on a real run)."""

from __future__ import annotations

from detr_lightning.cli.train import train
from detr_lightning.lightning.callbacks import StepWork
from helpers.pipeline import compose_config, tiny_overrides

ITEM = "item()/bool()/int()/float()"


def test_a_training_step_syncs_twice(tmp_path):
    overrides = tiny_overrides(
        tmp_path, "trainer.max_epochs=1", "trainer.limit_val_batches=0",
        "data.synthetic.num_train=24", "data.num_workers=1", "callbacks=default",
        "trainer.enable_progress_bar=true", "trainer.log_every_n_steps=50",
        "callbacks.metrics_history.plot=false",
    )  # fmt: skip
    work = StepWork(warmup=1)
    train(compose_config("train", overrides), [work])
    assert len(work.steps) == 5  # 6 steps, the first is warm-up
    # (the batches are loaded by a worker process: the host's reads there are no step's)
    # the epoch's last step also averages the epoch's losses over the ranks (once per epoch)
    for step in work.steps[:-1]:
        assert step["sync_kinds"] == {".cpu()": 1, ITEM: 1}, step
    assert work.summary()["syncs"] == 2
