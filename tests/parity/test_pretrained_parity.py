"""Parity with transformers' DetrForObjectDetection through every checkpoint format.

The reference model has random weights and random frozen-BN statistics; it is saved with
``save_pretrained`` (the Hub's file layout), converted independently to the official layout,
and both files are loaded with ``load_pretrained``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import detr_lightning as dl
from helpers.hf_reference import build_hf_detr, official_state_from_hf_file, reference_keys

CASES = [
    pytest.param(("resnet50", False, "detr-r50"), id="r50"),
    pytest.param(("resnet101", False, "detr-r101"), id="r101"),
    pytest.param(("resnet101", True, "detr-r101"), id="r101-dc5"),
]


def _inputs() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Two images of different sizes, as a list and as HF's padded batch + pixel_mask."""
    generator = torch.Generator().manual_seed(7)
    images = [
        torch.randn(3, 128, 160, generator=generator),
        torch.randn(3, 96, 192, generator=generator),
    ]
    pixel_values = torch.zeros(2, 3, 128, 192)
    pixel_mask = torch.zeros(2, 128, 192, dtype=torch.long)  # HF: 1 on valid pixels
    for i, image in enumerate(images):
        pixel_values[i, :, : image.shape[1], : image.shape[2]] = image
        pixel_mask[i, : image.shape[1], : image.shape[2]] = 1
    return images, pixel_values, pixel_mask


@pytest.fixture(scope="module", params=CASES)
def hf_checkpoint(request, tmp_path_factory):
    backbone, dilation, reference = request.param
    model = build_hf_detr(backbone, dilation=dilation)
    directory = tmp_path_factory.mktemp(f"hf-{backbone}-{dilation}")
    model.save_pretrained(directory)
    images, pixel_values, pixel_mask = _inputs()
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    # padding matters: the second image is narrower in height than the batch
    assert bool((pixel_mask == 0).any())
    return {
        "directory": directory,
        "images": images,
        "logits": expected.logits,
        "boxes": expected.pred_boxes,
        "backbone": backbone,
        "dilation": dilation,
        "reference": reference,
    }


def _check(module: dl.DETRModule, case: dict) -> None:
    assert not module.training
    with torch.no_grad():
        out = module(case["images"])
    # the reference outputs are not degenerate (otherwise a tolerance check proves little)
    assert case["logits"].std() > 0.5 and case["boxes"].std() > 0.01
    assert (out["pred_logits"] - case["logits"]).abs().max() <= 1e-3
    assert (out["pred_boxes"] - case["boxes"]).abs().max() <= 1e-4


def test_huggingface_directory(hf_checkpoint):
    module = dl.load_pretrained(hf_checkpoint["directory"])
    assert module.model.backbone.name == hf_checkpoint["backbone"]
    assert module.model.backbone.dilation == hf_checkpoint["dilation"]  # from config.json
    assert module.class_names[:2] == ["thing_0", "thing_1"]  # id2label kept
    _check(module, hf_checkpoint)


def test_huggingface_weights_file(hf_checkpoint):
    module = dl.load_pretrained(hf_checkpoint["directory"] / "model.safetensors")
    _check(module, hf_checkpoint)


def test_huggingface_pytorch_bin(hf_checkpoint, tmp_path):
    state = load_file(hf_checkpoint["directory"] / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((hf_checkpoint["directory"] / "config.json").read_text())
    _check(dl.load_pretrained(tmp_path), hf_checkpoint)


def test_official_checkpoint(hf_checkpoint, tmp_path):
    official = official_state_from_hf_file(
        load_file(hf_checkpoint["directory"] / "model.safetensors")
    )
    expected_keys = reference_keys(hf_checkpoint["reference"])
    assert set(official) == set(expected_keys)
    assert all(tuple(official[k].shape) == expected_keys[k] for k in official)
    name = "detr-r101-dc5-test.pth" if hf_checkpoint["dilation"] else "detr-test.pth"
    torch.save({"model": official}, tmp_path / name)
    module = dl.load_pretrained(tmp_path / name)  # DC5 from the file name, like the releases
    assert module.model.backbone.dilation == hf_checkpoint["dilation"]
    _check(module, hf_checkpoint)
    # an explicit flag wins over the name
    renamed = tmp_path / "weights.pth"
    (tmp_path / name).rename(renamed)
    _check(dl.load_pretrained(renamed, dilation=hf_checkpoint["dilation"]), hf_checkpoint)
