"""A dataset that training or evaluation cannot use is reported as one ``error:`` line (a
SetupError naming the dataset), before the trainer starts, as checkpoint problems are."""

from __future__ import annotations

import pytest

from detr_lightning.cli.train import train
from detr_lightning.utils.errors import SetupError
from helpers.data import make_tiny_synthetic
from helpers.pipeline import compose_config, tiny_overrides


def test_a_missing_image_is_a_setup_error_naming_the_file(tmp_path):
    root = make_tiny_synthetic(tmp_path / "data", num_train=4, num_val=2)
    missing = sorted((root / "train2017").iterdir())[0]
    missing.unlink()
    cfg = compose_config("train", tiny_overrides(tmp_path / "run", f"data.root={root}"))
    with pytest.raises(SetupError) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith(f"data.root={root}: 1 image(s) listed in ")
    assert missing.name in message and "\n" not in message


def test_an_invalid_annotation_file_is_a_setup_error(tmp_path):
    root = make_tiny_synthetic(tmp_path / "data", num_train=4, num_val=2)
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    cfg = compose_config("train", tiny_overrides(tmp_path / "run", f"data.root={root}"))
    with pytest.raises(SetupError, match=r"^data\.root=.*instances_val2017\.json"):
        train(cfg)
