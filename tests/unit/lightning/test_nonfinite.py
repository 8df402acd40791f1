"""Non-finite loss guard: a NaN/Inf step is skipped (weights, optimizer and BatchNorm statistics
untouched) with a warning naming the batch's images, and a run of such steps stops training
with a checkpoint of the last good state."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from detr_lightning.cli.train import train
from detr_lightning.utils.errors import TrainingStopped
from helpers import ROOT
from helpers.pipeline import compose_config, tiny_overrides

# trainable BatchNorm: its running statistics change in every forward pass in training mode
COMMON = ["trainer.max_epochs=1", "trainer.limit_val_batches=0", "data.synthetic.num_train=16",
          "backbone.norm=batch"]  # fmt: skip


def _state(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Poison(pl.Callback):
    """Makes the chosen batches non-finite and records the module's state around every batch
    and the image ids of every batch.

    ``image``: a NaN pixel, as a corrupt decode would give (the predictions become NaN);
    ``loss``: the criterion's total becomes NaN while the predictions stay finite;
    ``loss_only``: a NaN is added to the total, whose gradients stay finite (only the loss
    check can find it).
    """

    def __init__(self, poisoned: set[int], how: str = "image") -> None:
        self.poisoned, self.how = poisoned, how
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self.image_ids: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append(_state(pl_module))
        self.image_ids.append([int(t["image_id"]) for t in batch[2]])
        bad = batch_idx in self.poisoned
        if bad and self.how == "image":
            batch[0][0, 0, 0, 0] = float("nan")
        if self.how in ("loss", "loss_only"):
            compute = type(pl_module.criterion).losses_and_total
            poisoned = (lambda value: value * torch.nan) if self.how == "loss" else (
                lambda value: value + torch.nan)  # fmt: skip

            def losses_and_total(*args):
                losses, total = compute(pl_module.criterion, *args)
                return losses, poisoned(total) if bad else total

            pl_module.criterion.losses_and_total = losses_and_total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(_state(pl_module))


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize(("how", "reason"), [("image", "the predictions are NaN/Inf"),
                                             ("loss", "the loss is nan"),
                                             ("loss_only", "the loss is nan")])  # fmt: skip
def test_nonfinite_step_is_skipped_and_names_the_images(how, reason, tmp_path, caplog):
    poison = _Poison({1}, how)
    cfg = compose_config("train", tiny_overrides(tmp_path, *COMMON))
    with caplog.at_level("WARNING"):
        train(cfg, [poison])
    assert len(poison.after) == 4
    # the poisoned step changed nothing: weights and BatchNorm statistics
    assert _changed(poison.before[1], poison.after[1]) == []
    # the others trained, BatchNorm statistics included
    changed = _changed(poison.before[2], poison.after[2])
    assert any(k.endswith("running_mean") for k in changed)
    assert any(k.startswith("model.transformer") for k in changed)
    # every value stayed finite
    assert all(torch.isfinite(v.float()).all() for v in poison.after[-1].values())
    warnings = [r.getMessage() for r in caplog.records if "skipping the step" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert reason in warnings[0]
    assert str(poison.image_ids[1]) in warnings[0]


def test_nonfinite_gradient_skips_the_optimizer_update(tmp_path, caplog):
    class _NanGradient(pl.Callback):
        def __init__(self) -> None:
            self.before: dict[str, torch.Tensor] = {}
            self.after: dict[str, torch.Tensor] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 1:
                self.before = _state(pl_module)

        def on_after_backward(self, trainer, pl_module) -> None:
            if trainer.fit_loop.epoch_loop.batch_idx == 1:
                next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = torch.inf

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 1:
                self.after = _state(pl_module)

    hook = _NanGradient()
    cfg = compose_config("train", tiny_overrides(tmp_path, *COMMON))
    with caplog.at_level("WARNING"):
        train(cfg, [hook])
    assert hook.before and _changed(hook.before, hook.after) == []
    assert "a gradient is NaN/Inf" in caplog.text


def test_consecutive_nan_steps_stop_with_the_last_good_state(tmp_path):
    poison = _Poison({1, 2, 3})
    cfg = compose_config("train", tiny_overrides(tmp_path, *COMMON, "nonfinite.max_consecutive=2"))
    with pytest.raises(TrainingStopped, match=r"NaN/Inf in 2 consecutive") as caught:
        train(cfg, [poison])
    # stopped at the end of the second bad step: batch 3 never started
    assert len(poison.before) == 3
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert str(checkpoint) in str(caught.value)
    assert str(poison.image_ids[2][0]) in str(caught.value)
    state = torch.load(checkpoint, weights_only=True)
    # the weights after the last finite step (batch 0), not those of a bad step
    good = poison.after[0]
    assert state["global_step"] == 3
    assert _changed(good, state["state_dict"]) == []
    assert _changed(good, poison.before[2]) == []


def test_max_consecutive_must_be_positive(tmp_path):
    cfg = compose_config("train", tiny_overrides(tmp_path, "nonfinite.max_consecutive=0"))
    with pytest.raises(ValueError, match=r"nonfinite.max_consecutive=0"):
        train(cfg)


DDP_SCRIPT = '''
import sys

import pytorch_lightning as pl
import torch

sys.path.insert(0, {tests!r})
from helpers.pipeline import compose_config, tiny_overrides  # noqa: E402

from detr_lightning.cli.train import train  # noqa: E402


class PoisonRankOne(pl.Callback):
    """In batch 1 of rank 1 only, a NaN image ("image") or a NaN added to the loss, whose
    gradients stay finite ("loss"); rank 0 saves its weights around that step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        poisoned = batch_idx == 1 and trainer.global_rank == 1
        if poisoned and {how!r} == "image":
            batch[0][0, 0, 0, 0] = float("nan")
        if {how!r} == "loss":
            compute = type(pl_module.criterion).losses_and_total

            def losses_and_total(*args):
                losses, total = compute(pl_module.criterion, *args)
                return losses, total + (torch.nan if poisoned else 0)

            pl_module.criterion.losses_and_total = losses_and_total
        if batch_idx == 1 and trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), {before!r})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1 and trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), {after!r})


overrides = [o for o in tiny_overrides({run_dir!r}) if not o.startswith("trainer.max")]
train(compose_config("train", [*overrides, *{extra!r}]), [PoisonRankOne()])
'''


@pytest.mark.slow
@pytest.mark.parametrize(("how", "reason"), [("image", "the predictions are NaN/Inf"),
                                             ("loss", "the loss is nan")])  # fmt: skip
def test_ddp_ranks_skip_a_nan_step_together(how, reason, tmp_path):
    """Only rank 1's predictions or loss are NaN: both ranks skip the step (a rank that skipped
    alone would leave the other waiting in the gradient all-reduce, or train on alone), and
    training goes on. The NaN loss has finite gradients: only the ranks' joint loss check
    finds it."""
    import os
    import subprocess
    import sys

    root = ROOT
    extra = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.max_epochs=1",
             "trainer.limit_val_batches=0", "data.synthetic.num_train=12", "cpu_threads=1",
             "backbone.norm=batch", "callbacks=default", "callbacks.progress_bar=null",
             "callbacks.metrics_history.plot=false"]  # fmt: skip
    script = tmp_path / "poisoned_ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(root / "tests"), run_dir=str(tmp_path / "run"),
                                        before=str(tmp_path / "before.pt"),
                                        after=str(tmp_path / "after.pt"), extra=extra,
                                        how=how))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=300)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert f"{reason} for the batch of images" in output
    assert "on rank 1; skipping the step on every rank" in output
    before = torch.load(tmp_path / "before.pt", weights_only=True)
    after = torch.load(tmp_path / "after.pt", weights_only=True)
    assert _changed(before, after) == []  # rank 0 skipped too, BatchNorm statistics included
    # 12 images / global batch 4: 3 steps, the skipped one counted
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3
