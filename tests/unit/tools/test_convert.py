"""YOLO and Pascal VOC datasets converted to COCO: boxes against hand-computed pixels, round
trips from COCO, every bad input's error or counted skip, splits, and the dataset check."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from detr_lightning.tools.converters import (
    SKIPS,
    ConversionSummary,
    convert_voc,
    convert_yolo,
    format_summary,
    read_class_names,
)
from detr_lightning.tools.dataset_check import check_dataset
from helpers.data import make_tiny_synthetic, write_image

# ------------------------------------------------------------------------------ writers


def image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, width, height)
    return path


def text(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def voc_xml(
    objects: list[tuple[str, tuple[float, float, float, float], int]],
    size: tuple[int, int] | None = None,
    filename: str | None = None,
) -> str:
    """A VOC annotation: objects as (name, (xmin, ymin, xmax, ymax), difficult)."""
    parts = ["<annotation>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height>"
                     "<depth>3</depth></size>")  # fmt: skip
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x0!r}</xmin><ymin>{y0!r}</ymin>"
            f"<xmax>{x1!r}</xmax><ymax>{y1!r}</ymax></bndbox></object>"
        )
    return "".join([*parts, "</annotation>"])


def coco(summary: ConversionSummary, split: str) -> dict[str, Any]:
    return json.loads(summary.paths(split)[1].read_text())


def boxes_by_file(dataset: dict[str, Any]) -> dict[str, list[tuple[str, list[float]]]]:
    """file_name -> [(category name, bbox)] in annotation order."""
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    files = {entry["id"]: entry["file_name"] for entry in dataset["images"]}
    found: dict[str, list] = {name: [] for name in files.values()}
    for ann in dataset["annotations"]:
        found[files[ann["image_id"]]].append((names[ann["category_id"]], ann["bbox"]))
    return found


def assert_boxes(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, objects in expected.items():
        assert [c for c, _ in actual[name]] == [c for c, _ in objects], name
        for (_, got), (_, want) in zip(actual[name], objects):
            assert got == pytest.approx(want, abs=1e-6), name


def checked(summary: ConversionSummary) -> None:
    report = check_dataset(summary.paths("train"), summary.paths("val"))
    assert report.ok, report.errors


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------- YOLO
def yolo_source(root: Path) -> Path:
    """data.yaml (names as a dict) with train and val; hand-computed boxes in test_yolo_*."""
    text(root / "data.yaml", "path: .\ntrain: images/train\nval: images/val\n"
                             "names:\n  0: cat\n  1: dog\n")  # fmt: skip
    image(root / "images/train/a.png", 100, 50)
    text(root / "labels/train/a.txt", "0 0.5 0.5 0.2 0.4\n1 0.25 0.5 0.5 1.0\n")
    image(root / "images/train/b.png", 64, 80)
    text(root / "labels/train/b.txt", "\n1 0.125 0.75 0.25 0.1\n\n")
    image(root / "images/train/sub/c.png", 30, 40)
    text(root / "labels/train/sub/c.txt", "")  # an empty label file: no objects
    image(root / "images/train/d.png", 30, 40)  # no label file
    image(root / "images/val/e.png", 200, 100)
    text(root / "labels/val/e.txt", "0 0.3 0.6 0.1 0.2\n")
    image(root / "images/val/f.png", 100, 50)
    text(root / "labels/val/f.txt", "0 0.5 0.5 1.01 0.5\n")  # 0.5 px beyond each side
    return root


def test_yolo_boxes_are_the_normalized_boxes_times_the_image_size(tmp_path: Path) -> None:
    source = yolo_source(tmp_path / "yolo")
    before = tree_digest(source)
    summary = convert_yolo(source, tmp_path / "out")
    assert summary.categories == ["cat", "dog"]
    train, val = coco(summary, "train"), coco(summary, "val")
    assert (
        train["categories"]
        == val["categories"]
        == [
            {"id": 1, "name": "cat"},
            {"id": 2, "name": "dog"},
        ]
    )
    # ids 1..N: train sorted by path, then val
    assert [(e["id"], e["file_name"], e["width"], e["height"]) for e in train["images"]] == [
        (1, "a.png", 100, 50),
        (2, "b.png", 64, 80),
        (3, "d.png", 30, 40),
        (4, "sub/c.png", 30, 40),
    ]
    assert [(e["id"], e["file_name"]) for e in val["images"]] == [(5, "e.png"), (6, "f.png")]
    # a.png (100x50): cat center (50, 25), 20x20; dog center (25, 25), 50x50
    # b.png (64x80): dog center (8, 60), 16x8; e.png (200x100): cat center (60, 60), 20x20
    # f.png: cat x from -0.5 to 100.5 px, clipped to the image: [0, 12.5, 100, 25]
    assert_boxes(boxes_by_file(train), {
        "a.png": [("cat", [40, 15, 20, 20]), ("dog", [0, 0, 50, 50])],
        "b.png": [("dog", [0, 56, 16, 8])], "d.png": [], "sub/c.png": [],
    })  # fmt: skip
    assert_boxes(boxes_by_file(val), {"e.png": [("cat", [50, 50, 20, 20])],
                                      "f.png": [("cat", [0, 12.5, 100, 25])]})  # fmt: skip
    annotations = train["annotations"] + val["annotations"]
    assert [a["id"] for a in annotations] == [1, 2, 3, 4, 5]
    assert [a["image_id"] for a in annotations] == [1, 1, 2, 5, 6]
    assert [a["area"] for a in annotations] == pytest.approx([400, 2500, 128, 400, 2500])
    assert {a["iscrowd"] for a in annotations} == {0}
    assert summary.notes == {"no_label_file": 1, "clipped": 1} and not summary.skipped
    assert summary.examples["no_label_file"] == [str(source / "images/train/d.png")]
    assert (summary.splits["train"].images, summary.splits["train"].objects) == (4, 3)
    assert summary.splits["train"].images_without_objects == 2
    lines = format_summary(summary).splitlines()
    assert "categories: 1 cat, 2 dog" in lines
    assert "train: 4 images (2 without objects), 3 objects (cat 1, dog 2)" in lines
    assert "val: 2 images (0 without objects), 2 objects (cat 2, dog 0)" in lines
    # the copies are the source's bytes; the source is untouched
    out = tmp_path / "out"
    assert (out / "train2017/sub/c.png").read_bytes() == (
        source / "images/train/sub/c.png"
    ).read_bytes()
    assert tree_digest(source) == before
    checked(summary)


@pytest.mark.parametrize(
    "layout",
    ["names_list", "classes_txt", "flat", "export_paths", "root_path", "input_is_yaml"],
)
def test_yolo_layouts(tmp_path: Path, layout: str) -> None:
    """The same two labelled images found in each layout."""
    src = tmp_path / "src"
    if layout == "flat":  # images and labels side by side, classes.txt
        images, labels, val = src, src, None
        text(src / "classes.txt", "cat\ndog\n")
    elif layout == "export_paths":  # train/images, valid/images; ../ paths in data.yaml
        images, labels, val = src / "train/images", src / "train/labels", src / "valid"
        text(src / "data.yaml", "train: ../train/images\nval: ../valid/images\nnc: 2\n"
                                "names: ['cat', 'dog']\n")  # fmt: skip
    else:
        images, labels, val = src / "images/train", src / "labels/train", src / "images/val"
    if layout == "names_list":
        text(src / "data.yaml", "train: images/train\nval: images/val\nnames: [cat, dog]\n")
    elif layout == "classes_txt":
        text(src / "labels/classes.txt", "cat\ndog\n")
    elif layout in ("root_path", "input_is_yaml"):  # path: relative to the YAML's folder
        name = "data.yaml" if layout == "root_path" else "mine.yaml"
        text(src / "config" / name, "path: ..\ntrain: images/train\nval: images/val\n"
                                    "names: {0: cat, 1: dog}\n")  # fmt: skip
    image(images / "a.png", 40, 20)
    text(labels / "a.txt", "1 0.5 0.5 0.5 0.5\n")
    if val is not None:
        image(val / ("images" if layout == "export_paths" else "") / "v.png", 40, 20)
        label_dir = val / "labels" if layout == "export_paths" else src / "labels/val"
        text(label_dir / "v.txt", "0 0.25 0.25 0.5 0.5\n")
    else:
        image(src / "v.png", 40, 20)
        text(src / "v.txt", "0 0.25 0.25 0.5 0.5\n")
    source = src / "config/mine.yaml" if layout == "input_is_yaml" else src
    if layout == "root_path":
        source = src / "config"
    summary = convert_yolo(source, tmp_path / "out", val_fraction=0.5 if val is None else None)
    assert summary.categories == ["cat", "dog"]
    found = {**boxes_by_file(coco(summary, "train")), **boxes_by_file(coco(summary, "val"))}
    assert_boxes(found, {"a.png": [("dog", [10, 5, 20, 10])], "v.png": [("cat", [0, 0, 20, 10])]})


LINE_ERRORS = [
    ("0 0.5 0.5 0.2", "not a YOLO box"),
    ("0 0.5 0.5 0.2 0.4 0.1 0.1", "not a YOLO box"),  # a segmentation polygon
    ("0 0.5 0.5 0.2 abc", "not a YOLO box"),
    ("0 nan 0.5 0.2 0.2", "not a YOLO box"),
    ("2 0.5 0.5 0.2 0.4", r"class 2 is not one of the 2 class ids 0\.\.1"),
    ("-1 0.5 0.5 0.2 0.4", r"class -1 is not one of the 2 class ids"),
    ("0.5 0.5 0.5 0.2 0.4", r"class 0\.5 is not one of the 2 class ids"),
]


@pytest.mark.parametrize(("line", "message"), LINE_ERRORS)
def test_yolo_malformed_lines_are_errors_naming_the_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    src = tmp_path / "src"
    text(src / "classes.txt", "cat\ndog\n")
    image(src / "a.png", 40, 20)
    text(src / "a.txt", f"0 0.5 0.5 0.5 0.5\n{line}\n")
    with pytest.raises(ValueError, match=rf"a\.txt:2: .*{message}"):
        convert_yolo(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("0 1.5 0.5 0.2 0.2", "outside_image"),  # x from 56 to 64 px of a 40 px wide image
        ("0 30 10 8 4", "outside_image"),  # pixel coordinates, not normalized
        ("0 0.5 0.5 0 0.2", "empty_box"),
        ("0 0.5 0.5 0.2 -0.1", "empty_box"),
        ("1 0.5 0.5 0.5 0.5", "duplicate_box"),  # the same line as line 1
    ],
)
def test_yolo_bad_boxes_are_counted_skips(tmp_path: Path, line: str, reason: str) -> None:
    src = tmp_path / "src"
    text(src / "classes.txt", "cat\ndog\n")
    image(src / "a.png", 40, 20)
    image(src / "b.png", 40, 20)
    text(src / "a.txt", f"1 0.5 0.5 0.5 0.5\n{line}\n")
    summary = convert_yolo(src, tmp_path / "out", val_fraction=0.5)
    assert summary.skipped == {reason: 1}
    assert summary.examples[reason][0].startswith(f"{src / 'a.txt'}:2")
    found = {**boxes_by_file(coco(summary, "train")), **boxes_by_file(coco(summary, "val"))}
    assert_boxes(found, {"a.png": [("dog", [10, 5, 20, 10])], "b.png": []})
    assert f"left out:\n  1 x {SKIPS[reason]}" in format_summary(summary)


def test_yolo_tolerance_is_one_pixel(tmp_path: Path) -> None:
    """A box 0.8 px beyond a 20 px high image is clipped; 1.2 px beyond is left out."""
    src = tmp_path / "src"
    text(src / "classes.txt", "cat\n")
    image(src / "a.png", 40, 20)
    image(src / "b.png", 40, 20)
    # heights 21.6 px (0.8 px beyond top and bottom) and 22.4 px (1.2 px beyond)
    text(src / "a.txt", "0 0.5 0.5 0.5 1.08\n0 0.5 0.5 0.25 1.12\n")
    summary = convert_yolo(src, tmp_path / "out", val_fraction=0.5)
    assert (summary.notes["clipped"], summary.skipped["outside_image"]) == (1, 1)
    found = {**boxes_by_file(coco(summary, "train")), **boxes_by_file(coco(summary, "val"))}
    assert_boxes(found, {"a.png": [("cat", [10, 0, 20, 20])], "b.png": []})


def test_unreadable_images_are_left_out_with_their_labels(tmp_path: Path) -> None:
    src = tmp_path / "src"
    text(src / "classes.txt", "cat\n")
    for name in ("a", "b", "c"):
        image(src / f"{name}.png", 40, 20)
        text(src / f"{name}.txt", "0 0.5 0.5 0.5 0.5\n")
    (src / "b.png").write_bytes(b"not an image")
    summary = convert_yolo(src, tmp_path / "out", val_fraction=0.5)
    assert summary.skipped == {"unreadable_image": 1}
    assert summary.examples["unreadable_image"][0].startswith(str(src / "b.png"))
    files = [e["file_name"] for s in ("train", "val") for e in coco(summary, s)["images"]]
    assert sorted(files) == ["a.png", "c.png"]
    assert summary.splits["train"].objects + summary.splits["val"].objects == 2
    checked(summary)


def test_yolo_setup_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"input=.*missing does not exist"):
        convert_yolo(tmp_path / "missing", tmp_path / "out")
    src = tmp_path / "src"
    image(src / "a.png", 40, 20)
    with pytest.raises(ValueError, match=r"no class names .*classes\.txt"):
        convert_yolo(src, tmp_path / "out")
    text(src / "data.yaml", "train: images/train\nnames: [cat]\n")
    with pytest.raises(FileNotFoundError, match=r"data\.yaml: train: images/train not found"):
        convert_yolo(src, tmp_path / "out")
    text(src / "data.yaml", "train: .\nnames: {0: cat, 2: dog}\n")
    with pytest.raises(ValueError, match=r"names: has the keys \['0', '2'\]"):
        convert_yolo(src, tmp_path / "out")
    text(src / "data.yaml", "train: .\nnc: 3\nnames: [cat, dog]\n")
    with pytest.raises(ValueError, match=r"nc: 3 but names: lists 2 classes"):
        convert_yolo(src, tmp_path / "out")
    text(src / "data.yaml", "train: .\nnames: [cat, cat]\n")
    with pytest.raises(ValueError, match=r"repeats \['cat'\]"):
        convert_yolo(src, tmp_path / "out")
    (src / "data.yaml").unlink()
    image(src / "a.jpg", 40, 20)  # a.png and a.jpg: both would read a.txt
    with pytest.raises(ValueError, match=r"share the label file .*a\.txt"):
        convert_yolo(src, tmp_path / "out", classes=["cat"])
    assert not (tmp_path / "out").exists()


def test_output_is_refused_when_not_empty_or_overlapping(tmp_path: Path) -> None:
    source = yolo_source(tmp_path / "yolo")
    out = tmp_path / "out"
    (out / "train2017").mkdir(parents=True)
    (out / "train2017" / "stale.png").write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"output=.*out is not empty.*overwrite=true"):
        convert_yolo(source, out)
    summary = convert_yolo(source, out, overwrite=True)
    assert not (out / "train2017" / "stale.png").exists()
    assert summary.splits["train"].images == 4
    with pytest.raises(ValueError, match="overlaps the source folder"):
        convert_yolo(source, source / "coco")
    with pytest.raises(ValueError, match="overlaps the source folder"):
        convert_yolo(source, tmp_path, overwrite=True)  # would hold the source
    with pytest.raises(ValueError, match=r"val_fraction=0\.2, but the source has its own val"):
        convert_yolo(source, tmp_path / "other", val_fraction=0.2)


def test_symlinked_images_point_at_the_source(tmp_path: Path) -> None:
    source = yolo_source(tmp_path / "yolo")
    before = tree_digest(source)
    summary = convert_yolo(source, tmp_path / "out", copy_images=False)
    link = tmp_path / "out" / "train2017" / "sub" / "c.png"
    assert link.is_symlink() and link.resolve() == (source / "images/train/sub/c.png").resolve()
    assert "(images symlinked)" in format_summary(summary)
    checked(summary)
    # overwriting removes the links, never what they point at
    convert_yolo(source, tmp_path / "out", overwrite=True)
    assert not link.is_symlink() and link.is_file()
    assert tree_digest(source) == before


def test_exif_rotation_is_noted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    text(src / "classes.txt", "cat\n")
    for name, orientation in (("a", 6), ("b", 1)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.new("RGB", (40, 20)).save(src / f"{name}.jpg", exif=exif)
    summary = convert_yolo(src, tmp_path / "out", val_fraction=0.5)
    assert summary.notes["exif_rotated"] == 1
    assert summary.examples["exif_rotated"] == [f"{src / 'a.jpg'} (orientation 6)"]
    widths = {
        e["file_name"]: e["width"] for s in ("train", "val") for e in coco(summary, s)["images"]
    }
    assert widths == {"a.jpg": 40, "b.jpg": 40}  # the stored pixels' size


# -------------------------------------------------------------------------------- splits
def flat_yolo(root: Path, count: int) -> Path:
    text(root / "classes.txt", "cat\n")
    for index in range(count):
        image(root / f"{index:02d}.png", 30, 20)
        text(root / f"{index:02d}.txt", "0 0.5 0.5 0.5 0.5\n")
    return root


def test_val_fraction_split_is_seeded_and_keeps_image_ids(tmp_path: Path) -> None:
    source = flat_yolo(tmp_path / "src", 10)

    def split(out: str, **options: Any) -> tuple[list, list]:
        summary = convert_yolo(source, tmp_path / out, **options)
        return tuple(  # type: ignore[return-value]
            [(e["id"], e["file_name"]) for e in coco(summary, s)["images"]]
            for s in ("train", "val")
        )

    train, val = split("a", val_fraction=0.3, seed=1)
    assert (len(train), len(val)) == (7, 3)
    # an image keeps the id of its place in the sorted source, whichever split it lands in
    assert sorted(train + val) == [(i + 1, f"{i:02d}.png") for i in range(10)]
    assert split("b", val_fraction=0.3, seed=1) == (train, val)
    assert len(split("c")[1]) == 1  # the default: 10% of 10
    assert len(split("d", val_fraction=0.01)[1]) == 1  # at least one
    summary = convert_yolo(source, tmp_path / "e", val_fraction=0)
    assert list(summary.splits) == ["train"] and not summary.paths("val")[1].exists()
    assert "val: not written" in format_summary(summary)
    with pytest.raises(ValueError, match=r"val_fraction=1: give a fraction in \[0, 1\)"):
        convert_yolo(source, tmp_path / "f", val_fraction=1)


def test_different_seeds_draw_different_val_images(tmp_path: Path) -> None:
    source = flat_yolo(tmp_path / "src", 10)
    drawn = set()
    for seed in range(4):
        summary = convert_yolo(source, tmp_path / str(seed), val_fraction=0.3, seed=seed)
        drawn.add(tuple(e["file_name"] for e in coco(summary, "val")["images"]))
    assert len(drawn) > 1


# ---------------------------------------------------------------------------- Pascal VOC
def voc_source(root: Path) -> Path:
    """VOC layout with ImageSets; hand-computed boxes in test_voc_*."""
    (root / "ImageSets/Main").mkdir(parents=True)
    text(root / "ImageSets/Main/train.txt", "000001\n000002\n000005\n")
    text(root / "ImageSets/Main/val.txt", "000003\n000004\n")
    text(root / "ImageSets/Main/dog_train.txt", "000001  1\n")  # class files are not splits
    image(root / "JPEGImages/000001.jpg", 100, 50)
    text(root / "Annotations/000001.xml", voc_xml([
        ("dog", (11, 6, 30, 15), 0), ("cat", (1, 1, 100, 50), 0), ("person", (51, 21, 60, 40), 1),
    ], size=(100, 50)))  # fmt: skip
    image(root / "JPEGImages/000002.jpg", 64, 80)
    text(root / "Annotations/000002.xml", voc_xml([("cat", (5, 5, 20, 30), 0)]))  # no <size>
    image(root / "JPEGImages/000003.jpg", 40, 40)
    text(root / "Annotations/000003.xml", voc_xml([("cat", (1, 1, 40, 40), 0)], size=(50, 50)))
    image(root / "JPEGImages/000004.jpg", 40, 40)  # listed, without an XML
    text(root / "Annotations/000005.xml", voc_xml([("cat", (1, 1, 5, 5), 0)]))  # no image
    return root


def test_voc_one_based_pixel_indices(tmp_path: Path) -> None:
    source = voc_source(tmp_path / "voc")
    summary = convert_voc(source, tmp_path / "out")
    assert summary.categories == ["cat", "dog", "person"]  # sorted, as VOC's own classes
    train, val = coco(summary, "train"), coco(summary, "val")
    assert [(e["id"], e["file_name"], e["width"], e["height"]) for e in train["images"]] == [
        (1, "000001.jpg", 100, 50),
        (2, "000002.jpg", 64, 80),
    ]
    assert [(e["id"], e["file_name"]) for e in val["images"]] == [
        (3, "000003.jpg"),
        (4, "000004.jpg"),
    ]
    # pixels xmin..xmax (1-based, inclusive) cover [xmin - 1, xmax]:
    # x = xmin - 1, w = xmax - xmin + 1
    assert_boxes(boxes_by_file(train), {
        "000001.jpg": [("dog", [10, 5, 20, 10]), ("cat", [0, 0, 100, 50]),
                       ("person", [50, 20, 10, 20])],
        "000002.jpg": [("cat", [4, 4, 16, 26])],
    })  # fmt: skip
    assert_boxes(boxes_by_file(val), {"000003.jpg": [("cat", [0, 0, 40, 40])], "000004.jpg": []})
    assert {a["iscrowd"] for a in train["annotations"]} == {0}
    assert summary.skipped == {"missing_image": 1}
    assert summary.examples["missing_image"] == [
        f"{source / 'Annotations/000005.xml'} (listed in {source / 'ImageSets/Main/train.txt'})"
    ]
    assert summary.notes == {"difficult_kept": 1, "size_mismatch": 1, "no_label_file": 1}
    assert summary.examples["size_mismatch"][0].endswith("<size> 50x50, the image 40x40")
    checked(summary)


def test_voc_zero_based_edges_difficult_and_class_list(tmp_path: Path) -> None:
    source = voc_source(tmp_path / "voc")
    summary = convert_voc(source, tmp_path / "a", coordinates="zero_based", difficult="skip",
                          classes=["person", "dog", "cat"])  # fmt: skip
    assert coco(summary, "train")["categories"] == [
        {"id": 1, "name": "person"},
        {"id": 2, "name": "dog"},
        {"id": 3, "name": "cat"},
    ]
    # 0-based edges: x = xmin, w = xmax - xmin; the difficult person is left out
    assert_boxes(boxes_by_file(coco(summary, "train")), {
        "000001.jpg": [("dog", [11, 6, 19, 9]), ("cat", [1, 1, 99, 49])],
        "000002.jpg": [("cat", [5, 5, 15, 25])],
    })  # fmt: skip
    assert summary.skipped == {"difficult": 1, "missing_image": 1}
    assert summary.examples["difficult"] == [
        f"{source / 'Annotations/000001.xml'}: object 3 (person)"
    ]
    assert coco(summary, "train")["annotations"][0]["category_id"] == 2  # dog


def test_voc_unknown_class(tmp_path: Path) -> None:
    source = voc_source(tmp_path / "voc")
    with pytest.raises(ValueError, match=r"000001\.xml: object 3 \(person\): the class 'person' "
                                         r"is not among classes= \(cat, dog\)"):  # fmt: skip
        convert_voc(source, tmp_path / "a", classes=["cat", "dog"])
    assert not (tmp_path / "a").exists()
    summary = convert_voc(source, tmp_path / "b", classes=["cat", "dog"], unknown_classes="skip")
    assert summary.skipped["unknown_class"] == 1 and summary.categories == ["cat", "dog"]
    checked(summary)


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<annotation><object>", r"a\.xml is not valid XML"),
        ("<annotation><object><name>cat</name></object></annotation>",
         r"a\.xml: object 1 \(cat\): <bndbox> needs the numbers"),
        ("<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>x</ymin><xmax>5"
         "</xmax><ymax>5</ymax></bndbox></object></annotation>", r"<bndbox> needs the numbers"),
        ("<annotation><object><bndbox/></object></annotation>",
         r"a\.xml: <object> 1 has no <name>"),
    ],
)  # fmt: skip
def test_voc_malformed_files_are_errors(tmp_path: Path, xml: str, message: str) -> None:
    src = tmp_path / "src"
    image(src / "a.jpg", 40, 20)
    text(src / "a.xml", xml)
    with pytest.raises(ValueError, match=message):
        convert_voc(src, tmp_path / "out")


def test_voc_flat_folder_pairs_by_name_then_filename(tmp_path: Path) -> None:
    src = tmp_path / "src"
    image(src / "a.jpg", 40, 20)
    text(src / "a.xml", voc_xml([("cat", (1, 1, 10, 10), 0)], size=(40, 20)))
    image(src / "sub/b.png", 30, 30)
    text(src / "sub/b.xml", voc_xml([("dog", (2, 3, 4, 5), 0)], filename="elsewhere.png"))
    image(src / "real.jpg", 50, 50)  # named by c.xml's <filename> only
    text(src / "c.xml", voc_xml([("dog", (11, 11, 20, 20), 0)], filename="real.jpg"))
    summary = convert_voc(src, tmp_path / "out", val_fraction=0)
    assert_boxes(boxes_by_file(coco(summary, "train")), {
        "a.jpg": [("cat", [0, 0, 10, 10])],
        "real.jpg": [("dog", [10, 10, 10, 10])],
        "sub/b.png": [("dog", [1, 2, 3, 3])],
    })  # fmt: skip
    assert not summary.notes and not summary.skipped  # real.jpg is not an image without labels


def test_voc_setup_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no VOC dataset in .*empty.*VOCdevkit/VOC2012"):
        convert_voc(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "layout" / "Annotations").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"Annotations/ but no JPEGImages/"):
        convert_voc(tmp_path / "layout", tmp_path / "out")
    with pytest.raises(ValueError, match=r"difficult='drop': choose one of keep, skip"):
        convert_voc(tmp_path / "layout", tmp_path / "out", difficult="drop")
    image(tmp_path / "images" / "a.jpg", 20, 20)
    with pytest.raises(ValueError, match=r"no objects in the XML files .*classes=\[\.\.\.\]"):
        convert_voc(tmp_path / "images", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_class_list_files(tmp_path: Path) -> None:
    assert read_class_names(text(tmp_path / "names.txt", "\ufeffcat\n\n dog \n")) == ["cat", "dog"]
    with pytest.raises(FileNotFoundError, match=r"class list .*nope\.txt does not exist"):
        read_class_names(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="names no classes"):
        read_class_names(text(tmp_path / "empty.txt", "\n"))


# ---------------------------------------------------------------------------- round trips
def write_yolo_from_coco(coco_root: Path, target: Path) -> list[str]:
    """The COCO dataset at ``coco_root`` as YOLO files (data.yaml, images/, labels/); returns
    the class names in category-id order."""
    names: list[str] = []
    for split in ("train", "val"):
        dataset = json.loads((coco_root / f"annotations/instances_{split}2017.json").read_text())
        categories = sorted(dataset["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in categories]
        label_of = {c["id"]: index for index, c in enumerate(categories)}
        lines: dict[int, list[str]] = {e["id"]: [] for e in dataset["images"]}
        sizes = {e["id"]: (e["width"], e["height"]) for e in dataset["images"]}
        for ann in dataset["annotations"]:
            width, height = sizes[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            values = ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
            lines[ann["image_id"]].append(
                " ".join([str(label_of[ann["category_id"]]), *(repr(v) for v in values)])
            )
        for entry in dataset["images"]:
            name = Path(entry["file_name"])
            image_path = target / "images" / split / name
            image_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(coco_root / f"{split}2017" / name, image_path)
            text(
                target / "labels" / split / name.with_suffix(".txt"), "\n".join(lines[entry["id"]])
            )
    text(target / "data.yaml", json.dumps({"train": "images/train", "val": "images/val",
                                           "names": names}))  # fmt: skip
    return names


def write_voc_from_coco(coco_root: Path, target: Path) -> list[str]:
    """The COCO dataset at ``coco_root`` in the VOC layout (1-based pixel indices); returns the
    class names in category-id order."""
    names: list[str] = []
    for split in ("train", "val"):
        dataset = json.loads((coco_root / f"annotations/instances_{split}2017.json").read_text())
        names = [c["name"] for c in sorted(dataset["categories"], key=lambda c: c["id"])]
        category = {c["id"]: c["name"] for c in dataset["categories"]}
        objects: dict[int, list] = {e["id"]: [] for e in dataset["images"]}
        for ann in dataset["annotations"]:
            x, y, w, h = ann["bbox"]
            box = (x + 1, y + 1, x + w, y + h)
            objects[ann["image_id"]].append((category[ann["category_id"]], box, 0))
        stems = []
        for entry in dataset["images"]:
            stem = Path(entry["file_name"]).stem
            stems.append(stem)
            image_path = target / "JPEGImages" / entry["file_name"]
            image_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(coco_root / f"{split}2017" / entry["file_name"], image_path)
            size = (entry["width"], entry["height"])
            text(target / "Annotations" / f"{stem}.xml", voc_xml(objects[entry["id"]], size))
        text(target / "ImageSets/Main" / f"{split}.txt", "\n".join(stems) + "\n")
    return names


@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_round_trip_from_coco(tmp_path: Path, fmt: str) -> None:
    """COCO -> YOLO or VOC files -> convert: the same images, classes and boxes."""
    original = make_tiny_synthetic(tmp_path / "coco")
    source = tmp_path / fmt
    if fmt == "yolo":
        names = write_yolo_from_coco(original, source)
        summary = convert_yolo(source, tmp_path / "out")
    else:
        names = write_voc_from_coco(original, source)
        summary = convert_voc(source, tmp_path / "out", classes=names)
    assert summary.categories == names and not summary.skipped
    total = 0
    for split in ("train", "val"):
        before = json.loads((original / f"annotations/instances_{split}2017.json").read_text())
        after = coco(summary, split)
        assert_boxes(boxes_by_file(after), boxes_by_file(before))
        sizes = {e["file_name"]: (e["width"], e["height"]) for e in before["images"]}
        assert {e["file_name"]: (e["width"], e["height"]) for e in after["images"]} == sizes
        total += len(after["annotations"])
    assert total > 10
    checked(summary)
