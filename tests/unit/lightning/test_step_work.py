"""StepWork: the host's work per training step of a Lightning run, against a known read."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from detr_lightning.lightning.callbacks import StepWork


class _Regression(pl.LightningModule):
    def __init__(self, read_loss: bool) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.read_loss = read_loss
        self.read: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.read_loss:
            self.read.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(read_loss: bool) -> StepWork:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randn(12, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    work = StepWork(warmup=1)
    trainer = pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[work], accelerator="cpu")  # fmt: skip
    trainer.fit(_Regression(read_loss), loader)
    return work


def test_step_work_counts_a_steps_item_once_per_step():
    plain, reading = _fit(read_loss=False), _fit(read_loss=True)
    # 5 steps, the first is warmup: 4 windows, each from a batch's start to the next's or the end
    assert len(plain.steps) == len(reading.steps) == 4
    for without, with_item in zip(plain.steps, reading.steps):
        assert with_item["syncs"] == without["syncs"] + 1
        item = "item()/bool()/int()/float()"
        assert with_item["sync_kinds"][item] == without["sync_kinds"].get(item, 0) + 1
        assert with_item["operators"] == without["operators"] + 1  # _local_scalar_dense
    summary = reading.summary(top=3)
    assert summary["steps"] == 4 and summary["syncs"] == reading.steps[0]["syncs"]
    assert len(summary["top_operators"]) == 3
