"""Tiny DETR models for the tests: random weights, seconds on a CPU."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from detr_lightning.lightning import DETRModule
from detr_lightning.models import DETR, Backbone, build_detr
from detr_lightning.models.backbone import FrozenBatchNorm2d

NUM_CLASSES, NUM_QUERIES = 5, 7
# the model spec of a tiny DETR (DETRModule's ``model``; the model group's layout)
TINY_MODEL = {
    "_target_": "detr_lightning.models.build_detr",
    "backbone": {"_target_": "detr_lightning.models.Backbone", "name": "resnet18"},
    "num_classes": NUM_CLASSES,
    "hidden_dim": 32,
    "nheads": 4,
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 64,
    "num_queries": NUM_QUERIES,
}
BACKBONE_ARGUMENTS = set(inspect.signature(Backbone).parameters)


def tiny_spec(**overrides) -> dict:
    """:data:`TINY_MODEL` with ``overrides``: model settings, or Backbone arguments (``name``,
    ``num_stages``, ``norm``, ``lr`` ...; ``backbone`` for its name)."""
    backbone = dict(TINY_MODEL["backbone"])
    spec = {**TINY_MODEL, "backbone": backbone}
    for key, value in overrides.items():
        if key == "backbone":
            backbone["name"] = value
        elif key in BACKBONE_ARGUMENTS:
            backbone[key] = value
        else:
            spec[key] = value
    return spec


def tiny_detr(**overrides) -> DETR:
    """The tiny DETR of :func:`tiny_spec`, built as the model group builds it."""
    spec = tiny_spec(**overrides)
    settings = {k: v for k, v in spec.items() if k not in ("_target_", "backbone")}
    backbone = {k: v for k, v in spec["backbone"].items() if k != "_target_"}
    return build_detr(backbone, **settings)


@torch.no_grad()
def randomize_frozen_batchnorm(model: nn.Module, generator: torch.Generator) -> int:
    """Give every FrozenBatchNorm2d non-trivial statistics; returns how many there are."""
    count = 0
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            channels = module.weight.shape[0]
            module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            count += 1
    return count


class PatchBackbone(nn.Module):
    """Non-overlapping 32x32 patches: no receptive field crosses an image's border.

    A ResNet's receptive field does cross it (features of padded cells next to the border are
    non-zero), in the reference implementation too, so exact invariance to padding only holds
    from the backbone's output on; this stub isolates that part of the model.
    """

    num_channels = 24

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.num_channels, kernel_size=32, stride=32)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor):
        return self.conv(images), padding_mask[:, ::32, ::32]


def tiny_eval_detr() -> DETR:
    """:func:`tiny_detr` in eval mode with seeded weights and random frozen-BN statistics."""
    torch.manual_seed(0)
    detr = tiny_detr().eval()
    with torch.no_grad():
        randomize_frozen_batchnorm(detr, torch.Generator().manual_seed(0))
    return detr


# A label map whose label 1 is unused (category id -1): its detections must never come out.
VARIED_LABEL_MAP = {"category_ids": [1, -1, 3, 7], "names": ["cat", "N/A", "dog", "bird"]}
VARIED_DATA = {"val_size": 48, "max_size": 72}  # the preprocessing it was "evaluated" with


def varied_module():
    """A tiny DETRModule whose queries disagree: varied classes and scores, some on the
    unused label (for the prediction tests)."""
    from detr_lightning.data.images import inference_transform
    from helpers.data import noise

    torch.manual_seed(0)
    detr = DETRModule(
        model=tiny_spec(num_stages=3, num_classes=4, num_queries=12, dec_layers=1, dropout=0.0),
        label_map=VARIED_LABEL_MAP,
        data=VARIED_DATA,
    )
    detr.eval()
    # An untrained head gives every query about the same scores, of one class: spread the
    # queries apart, and centre each class's logit over the queries so that every class
    # (the unused one too) wins some of them.
    with torch.no_grad():
        detr.model.query_embed.weight.mul_(3)
        detr.model.class_embed.weight.normal_(0, 1)
        probe = inference_transform(VARIED_DATA)(noise(90, 130, seed=99))
        detr.model.class_embed.bias.sub_(detr.model(probe[None])["pred_logits"][0].mean(0))
    return detr


def assert_same_predictions(actual: dict, expected: dict, atol: float = 1e-4) -> None:
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=1e-4)


@torch.no_grad()
def badly_scaled_resnet50(dilation: bool) -> tuple[Backbone, torch.Generator]:
    """A seeded random ResNet-50 backbone in eval mode whose frozen BN statistics are drawn
    badly scaled (variances down to 0.01), and the generator that drew them, for the inputs."""
    torch.manual_seed(0)
    backbone = Backbone("resnet50", dilation=dilation).eval()
    generator = torch.Generator().manual_seed(1)
    for name, buffer in backbone.named_buffers():
        if name.endswith("running_var"):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.99 + 0.01)
        elif name.endswith(("running_mean", "bias")):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return backbone, generator


CONFIDENT_LABEL_MAP = {
    "category_ids": [1, 2, 3],
    "names": ["cat", "dog", "bird"],
}  # labels 3, 4: none


def confident_module(confident_label: int) -> DETRModule:
    """A random tiny module whose queries all favour ``confident_label``, with varied scores."""
    module = DETRModule(
        model=TINY_MODEL, label_map=CONFIDENT_LABEL_MAP, data={"val_size": 128, "max_size": 200}
    )
    with torch.no_grad():
        classifier = module.model.class_embed
        classifier.weight.copy_(torch.randn_like(classifier.weight) * 0.2)
        classifier.bias.zero_()
        classifier.bias[confident_label] = 3.0
    return module.eval()


DEPLOY_LABEL_MAP = {"category_ids": [1, 2, 4, 7, 9], "names": ["a", "b", "c", "d", "e"]}


def deploy_module() -> DETRModule:
    """The tiny module that the export tests export, in eval mode with non-trivial frozen-BN
    statistics."""
    torch.manual_seed(0)
    detr = DETRModule(
        model=TINY_MODEL, label_map=DEPLOY_LABEL_MAP, data={"val_size": 96, "max_size": 160}
    ).eval()
    with torch.no_grad():
        randomize_frozen_batchnorm(detr.model, torch.Generator().manual_seed(0))
    return detr
