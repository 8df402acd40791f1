"""detr-preview: the PNG it writes, the samples it shows against those the training run
trains first, and its one-line setup errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from detr_lightning.cli.build import instantiate_data
from detr_lightning.cli.preview import main, preview
from detr_lightning.cli.train import train
from detr_lightning.cli.validate import main as validate_main
from detr_lightning.data.paths import check_data_source
from detr_lightning.tools.preview import training_keys
from detr_lightning.utils.errors import SetupError
from detr_lightning.viz.augmentation_grid import grid_size
from helpers.pipeline import TINY_DATA, compose_config, tiny_overrides

# the random crop on, so that every random step of the augmentation is drawn
AUGMENTED = [*TINY_DATA, "data.crop=true"]


def test_writes_the_grid_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "out" / "grid.png"
    options = ["num_samples=3", "columns=2", "tile_size=64", f"output={output}"]
    assert main([*AUGMENTED, *options]) == 0
    assert f"wrote {output}: 3 training samples of epoch 0" in capsys.readouterr().out
    # 2 columns of 64 px tiles, 2 rows of 64 + 20 px (caption) cells, 16 px margins
    assert Image.open(output).size == (2 * 64 + 3 * 16, 2 * 84 + 3 * 16)
    assert grid_size(3, 2, 64) == (216, 176)
    assert main([*AUGMENTED, *options, "show_original=true"]) == 0
    assert Image.open(output).size == (2 * (2 * 64 + 4) + 3 * 16, 216)
    with Image.open(output) as image:
        assert image.mode == "RGB" and len(set(image.getdata())) > 100  # drawn images


class RecordSamples(pl.Callback):
    """The training samples of each batch: (epoch, image_id, unpadded image, target)."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, int, torch.Tensor, dict]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        images, padding_mask, targets = batch
        for image, mask, target in zip(images, padding_mask, targets):
            height, width = (int(v) for v in target["size"])
            assert not mask[:height, :width].any() and mask.sum() == mask.numel() - height * width
            unpadded = image[:, :height, :width].clone()
            self.samples.append((trainer.current_epoch, int(target["image_id"]), unpadded, target))


@pytest.mark.slow  # trains the tiny model for two epochs of two steps
def test_shows_what_the_first_epochs_of_training_train(tmp_path: Path) -> None:
    """Same seed and data settings: the preview's samples are the training loader's, one for
    one, in order (grouped by size into batches of 4), with the same augmented pixels, boxes
    and labels; epoch=1 shows the second epoch."""
    record = RecordSamples()
    run = [*AUGMENTED, "trainer.max_epochs=2", "trainer.limit_val_batches=0", "seed=7"]
    train(compose_config("train", tiny_overrides(tmp_path / "run", *run)), callbacks=[record])
    assert len(record.samples) == 2 * 8  # two epochs of the 8 synthetic training images
    for epoch in (0, 1):
        trained = [sample for sample in record.samples if sample[0] == epoch]
        cfg = compose_config("preview", [*run, "num_samples=8", f"epoch={epoch}",
                                         f"output={tmp_path / f'epoch{epoch}.png'}"])  # fmt: skip
        path, shown = preview(cfg)
        assert path.is_file()
        assert [s.target["image_id"] for s in shown] == [image_id for _, image_id, *_ in trained]
        for sample, (_, _, image, target) in zip(shown, trained):
            assert torch.equal(sample.image, image)
            assert torch.equal(sample.target["boxes"], target["boxes"])
            assert torch.equal(sample.target["labels"], target["labels"])
    first, second = (torch.cat([s[2].flatten() for s in record.samples[k : k + 8]]) for k in (0, 8))
    assert not torch.equal(first, second)  # the epochs draw other augmentations
    # another seed shows other samples or augmentations: the comparison above tells seeds apart
    other = compose_config("preview", [*run, "seed=8", "num_samples=8", f"output={tmp_path}/o.png"])
    _, shown = preview(other)
    assert any(
        s.target["image_id"] != image_id or not torch.equal(s.image, image)
        for s, (_, image_id, image, _) in zip(shown, record.samples[:8])
    )


def test_each_sample_is_augmented_alike_on_any_number_of_devices(tmp_path: Path) -> None:
    """The world size and batch size change the order (each rank trains its share), never a
    sample's augmentation: the key (index, seed) of an image is the same in every layout."""
    cfg = compose_config("preview", [*AUGMENTED, f"output={tmp_path}/p.png"])
    datamodule = instantiate_data(cfg.data)
    datamodule.setup("fit")
    dataset = datamodule.train_dataset
    single = training_keys(dataset, 8, seed=7, batch_size=4)
    shares = [training_keys(dataset, 8, seed=7, world_size=2, rank=r, batch_size=2) for r in (0, 1)]
    assert sorted(single) == sorted(shares[0] + shares[1])  # the same keys, split in two
    assert len(shares[0]) == len(shares[1]) == 4 and shares[0] != single[:4]
    ungrouped = training_keys(dataset, 8, seed=7, batch_size=4, group_by_aspect_ratio=False)
    assert sorted(ungrouped) == sorted(single)
    index, seed = shares[1][0]
    assert torch.equal(dataset[(index, seed)][0], dataset[(index, seed)][0])  # seeded per key
    assert training_keys(dataset, 8, seed=7, epoch=1, batch_size=4) != single


def test_setup_problems_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(SetupError) as expected:
        check_data_source(str(missing), None)
    assert main([f"data.root={missing}"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {expected.value}\n"  # what detr-train prints, on one line
    assert validate_main([f"data.root={missing}"]) == 2
    assert capsys.readouterr().err == err  # and detr-validate
    monkeypatch.delenv("COCO_ROOT", raising=False)
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("error: no dataset: set data.root=")
    (tmp_path / "empty").mkdir()
    assert main([f"data.root={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: annotation file ") and "instances_val2017.json" in err
    assert err.count("\n") == 1
    # the order depends on the number of processes: it must be a count
    assert main([*TINY_DATA, "trainer.devices=auto"]) == 2
    assert "error: trainer.devices=auto: " in capsys.readouterr().err
    assert main([*TINY_DATA, "trainer=ddp", "data.batch_size=3"]) == 2  # 2 devices
    assert "error: data.batch_size=3 must be a positive multiple" in capsys.readouterr().err
    assert main([*TINY_DATA, "world_size=2", "rank=2"]) == 2
    assert "error: rank=2: choose a rank in 0..1" in capsys.readouterr().err
