"""The synthetic COCO generator: determinism, validity, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from detr_lightning.data import synthetic
from detr_lightning.data.synthetic import ensure_synthetic_coco, synthetic_categories
from helpers.data import TINY_SYNTHETIC, make_tiny_synthetic


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_synthetic(tmp_path_factory.mktemp("synthetic"))


def test_same_seed_gives_identical_files(tiny_root: Path, tmp_path: Path) -> None:
    again = make_tiny_synthetic(tmp_path / "again")
    for split in ("train", "val"):
        name = f"annotations/instances_{split}2017.json"
        assert (tiny_root / name).read_bytes() == (again / name).read_bytes()
    first = sorted((tiny_root / "train2017").iterdir())
    assert [p.read_bytes() for p in first] == [
        (again / "train2017" / p.name).read_bytes() for p in first
    ]
    other = make_tiny_synthetic(tmp_path / "other", seed=4)
    name = "annotations/instances_train2017.json"
    assert (other / name).read_bytes() != (tiny_root / name).read_bytes()


@pytest.mark.parametrize("split", ["train", "val"])
def test_output_is_valid_coco(tiny_root: Path, split: str, capsys: pytest.CaptureFixture) -> None:
    coco = COCO(str(tiny_root / "annotations" / f"instances_{split}2017.json"))
    capsys.readouterr()
    num_images = TINY_SYNTHETIC[f"num_{split}"]
    assert len(coco.imgs) == num_images
    cat_ids = sorted(coco.cats)
    assert len(cat_ids) == TINY_SYNTHETIC["num_categories"]
    assert cat_ids != list(range(cat_ids[0], cat_ids[0] + len(cat_ids)))  # not contiguous
    assert len({c["name"] for c in coco.cats.values()}) == len(cat_ids)
    empty = 0
    for image_id, entry in coco.imgs.items():
        with Image.open(tiny_root / f"{split}2017" / entry["file_name"]) as image:
            assert image.size == (entry["width"], entry["height"])
            assert image.mode == "RGB"
        assert 64 <= entry["width"] <= 128 and 64 <= entry["height"] <= 128
        anns = coco.imgToAnns[image_id]
        empty += not anns
        assert len(anns) <= TINY_SYNTHETIC["max_objects"]
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert all(isinstance(v, float) for v in ann["bbox"])
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= entry["width"] and y + h <= entry["height"]
            assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h
            assert ann["category_id"] in coco.cats
    assert empty >= 1  # empty_fraction 0.2 of 12 / 6 images


def test_categories_are_unique_pairs() -> None:
    categories = synthetic_categories(synthetic.MAX_CATEGORIES)
    assert len({c["name"] for c in categories}) == synthetic.MAX_CATEGORIES
    assert [c["id"] for c in categories[:5]] == [1, 2, 5, 6, 9]
    with pytest.raises(ValueError, match="num_categories"):
        synthetic_categories(synthetic.MAX_CATEGORIES + 1)


@pytest.mark.parametrize(
    "bad",
    [{"min_size": 200, "max_size": 100}, {"min_objects": 3, "max_objects": 1}, {"colour": 1}],
)
def test_invalid_parameters(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        make_tiny_synthetic(tmp_path, **bad)


def test_ensure_generates_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETR_LIGHTNING_CACHE", str(tmp_path / "env_cache"))
    root = ensure_synthetic_coco(**TINY_SYNTHETIC)
    assert root.parent == tmp_path / "env_cache" and root.name.startswith("synthetic-")
    assert (root / "annotations" / "instances_val2017.json").is_file()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached dataset should have been reused")

    monkeypatch.setattr(synthetic, "generate_synthetic_coco", fail)
    assert ensure_synthetic_coco(**TINY_SYNTHETIC) == root
    assert list(root.parent.iterdir()) == [root]  # no leftover staging directories


def test_ensure_tolerates_losing_a_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic.generate_synthetic_coco
    final_dirs: list[Path] = []

    def racing(root: Path, **params: object) -> Path:
        # another process finishes first: the final directory appears meanwhile
        real(root, **params)
        winner = tmp_path / final_dirs[0]
        real(winner, **params)
        return root

    params = {**TINY_SYNTHETIC, "num_train": 2, "num_val": 1}
    expected = ensure_synthetic_coco(cache_dir=tmp_path / "probe", **params)
    final_dirs.append(Path(expected.name))
    monkeypatch.setattr(synthetic, "generate_synthetic_coco", racing)
    root = ensure_synthetic_coco(cache_dir=tmp_path, **params)
    assert root == tmp_path / expected.name
    assert (root / "annotations" / "instances_train2017.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    synthetic.main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--seed", "5"])
    assert str(tmp_path) in capsys.readouterr().out
    data = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())
    assert len(data["images"]) == 2
    assert len(list((tmp_path / "val2017").iterdir())) == 1
