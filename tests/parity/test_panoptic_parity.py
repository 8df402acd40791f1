"""The panoptic model (DETR + mask head) against transformers' ``DetrForSegmentation`` with
random weights: its files as ``save_pretrained`` writes them, and the same weights in the
official panoptic checkpoints' layout (``detr.*``, ``bbox_attention.*``, ``mask_head.*``)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from detr_lightning.checkpoints.loading import load_state_into
from detr_lightning.checkpoints.reading import read_checkpoint
from detr_lightning.lightning.specs import build
from detr_lightning.models.segmentation import DETRSegmentation
from helpers.hf_reference import build_hf_detr, official_state_from_hf_file, reference_keys

CASES = [
    pytest.param(("resnet50", False), id="r50"),
    pytest.param(("resnet101", False), id="r101"),
    pytest.param(("resnet101", True), id="r101-dc5"),
]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images of different sizes in one padded batch: ours (True on padding) and HF's
    pixel_mask (1 on valid pixels)."""
    generator = torch.Generator().manual_seed(11)
    pixel_values = torch.zeros(2, 3, 128, 160)
    padding = torch.ones(2, 128, 160, dtype=torch.bool)
    for i, (height, width) in enumerate([(128, 160), (96, 128)]):
        pixel_values[i, :, :height, :width] = torch.randn(3, height, width, generator=generator)
        padding[i, :height, :width] = False
    return pixel_values, padding, (~padding).long()


@pytest.fixture(scope="module", params=CASES)
def hf_panoptic(request, tmp_path_factory):
    backbone, dilation = request.param
    # 250 classes as COCO panoptic; a short transformer keeps the test quick (the layers are
    # those of the detection parity tests)
    model = build_hf_detr(
        backbone, dilation=dilation, num_labels=250, segmentation=True,
        encoder_layers=2, decoder_layers=2, num_queries=20,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp(f"hf-panoptic-{backbone}-{dilation}")
    model.save_pretrained(directory)
    pixel_values, padding, pixel_mask = _inputs()
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    return {
        "directory": directory,
        "inputs": (pixel_values, padding),
        "logits": expected.logits,
        "boxes": expected.pred_boxes,
        "masks": expected.pred_masks,
        "dilation": dilation,
    }


def _panoptic_model(path) -> DETRSegmentation:
    info = read_checkpoint(path)
    assert info["mask_head"] is not None  # the task read off the keys
    model = DETRSegmentation(build(info["model"])).eval()
    state = {f"detr.{key}": value for key, value in info["state_dict"].items()}
    load_state_into(model, {**state, **info["mask_head"]}, path)
    return model


def _check(model: DETRSegmentation, case: dict) -> None:
    with torch.no_grad():
        out = model(*case["inputs"])
    # the reference outputs are not degenerate (otherwise a tolerance check proves little)
    assert case["logits"].std() > 0.5 and case["boxes"].std() > 0.01
    assert case["masks"].std() > 0.1
    assert out["pred_masks"].shape == case["masks"].shape == (2, 20, 32, 40)
    assert (out["pred_logits"] - case["logits"]).abs().max() <= 1e-4
    assert (out["pred_boxes"] - case["boxes"]).abs().max() <= 1e-4
    assert (out["pred_masks"] - case["masks"]).abs().max() <= 1e-3


def test_huggingface_segmentation_directory(hf_panoptic):
    model = _panoptic_model(hf_panoptic["directory"])
    assert model.detr.backbone.dilation == hf_panoptic["dilation"]
    _check(model, hf_panoptic)


def test_huggingface_segmentation_in_memory_names(hf_panoptic, tmp_path):
    """transformers 5's own module names (a ``torch.save(model.state_dict())``)."""
    from transformers import DetrForSegmentation

    reloaded = DetrForSegmentation.from_pretrained(hf_panoptic["directory"])
    state = reloaded.state_dict()
    assert "mask_head.fpn_stages.0.fpn_adapter.weight" in state  # the names under test
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((hf_panoptic["directory"] / "config.json").read_text())
    _check(_panoptic_model(tmp_path), hf_panoptic)


def test_official_panoptic_checkpoint(hf_panoptic, tmp_path):
    hf_state = load_file(hf_panoptic["directory"] / "model.safetensors")
    detector = {k[len("detr.") :]: v for k, v in hf_state.items() if k.startswith("detr.")}
    head = {k: v for k, v in hf_state.items() if not k.startswith("detr.")}
    official = {f"detr.{k}": v for k, v in official_state_from_hf_file(detector).items()}
    official.update(head)  # the head's names in the files are the official ones
    name = "detr-r101-dc5-panoptic-test.pth" if hf_panoptic["dilation"] else "panoptic.pth"
    torch.save({"model": official}, tmp_path / name)
    _check(_panoptic_model(tmp_path / name), hf_panoptic)


def test_official_panoptic_key_names():
    """Our panoptic R50 has exactly the released checkpoint's keys and shapes."""
    from detr_lightning.models.detr import build_detr

    model = DETRSegmentation(build_detr("resnet50", num_classes=250))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: v for k, v in ours.items() if not k.endswith("num_batches_tracked")}
    expected = reference_keys("detr-r50-panoptic")
    renamed = {}
    for key, shape in expected.items():  # official -> ours, as from_official does
        key = key.replace("detr.backbone.0.", "detr.backbone.")
        renamed[key] = shape
    assert ours == renamed
