"""Hugging Face DETR models with random weights, the numeric reference of the parity tests."""

from __future__ import annotations

import torch

from helpers import FIXTURES


def build_hf_detr(
    backbone: str = "resnet50",
    dilation: bool = False,
    num_labels: int = 91,
    segmentation: bool = False,
    **kw,
):
    """``DetrForObjectDetection`` (``DetrForSegmentation`` with ``segmentation``) with a timm
    ResNet, random weights and random frozen-BN stats.

    Random BN statistics make a wrong mapping of any norm buffer visible in the outputs; the
    mask head's GroupNorm affine parameters are spread too.
    """
    from transformers import DetrConfig, DetrForObjectDetection, DetrForSegmentation

    config = DetrConfig(
        use_timm_backbone=True,
        backbone=backbone,
        use_pretrained_backbone=False,
        dilation=dilation,
        num_labels=num_labels,
        id2label={i: f"thing_{i}" for i in range(num_labels)},
        label2id={f"thing_{i}": i for i in range(num_labels)},
        **kw,
    )
    torch.manual_seed(1234)  # the same weights whichever tests ran before in this process
    full = (DetrForSegmentation if segmentation else DetrForObjectDetection)(config)
    model = full.detr if segmentation else full
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        if segmentation:
            for name, param in full.mask_head.named_parameters():
                if ".norm." in name or name.startswith("gn"):
                    base = 1.0 if name.endswith("weight") else 0.0
                    param.copy_(base + torch.randn(param.shape, generator=generator) * 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
            elif "backbone" in name and name.endswith(("weight", "bias")):
                # frozen batch norm keeps its affine parameters as buffers
                scale = 0.2 if name.endswith("bias") else 1.0
                buffer.copy_(
                    1.0
                    - name.endswith("bias")
                    + torch.randn(buffer.shape, generator=generator) * scale * 0.2
                )
        # heads start near zero in HF's init; spread them so that the outputs vary
        model.class_labels_classifier.weight.normal_(0, 0.5, generator=generator)
        for layer in model.bbox_predictor.layers:
            layer.weight.normal_(0, 0.15, generator=generator)
        model.model.query_position_embeddings.weight.normal_(0, 1.0, generator=generator)
    return full.eval()


def official_state_from_hf_file(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face DETR file's tensors to the official repository's layout.

    Written independently of the library's converter, from the two naming schemes.
    """
    out = {}
    enc = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "fc1": "linear1",
           "fc2": "linear2"}  # fmt: skip
    dec = {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2",
           "final_layer_norm": "norm3", "fc1": "linear1", "fc2": "linear2",
           "encoder_attn": "multihead_attn"}  # fmt: skip
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("model.backbone.conv_encoder.model."):
            out["backbone.0.body." + key.split("model.backbone.conv_encoder.model.")[1]] = value
        elif key.startswith("model.input_projection."):
            out["input_proj." + key.rsplit(".", 1)[1]] = value
        elif key == "model.query_position_embeddings.weight":
            out["query_embed.weight"] = value
        elif key.startswith("class_labels_classifier."):
            out["class_embed." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("bbox_predictor."):
            out["bbox_embed." + key[len("bbox_predictor.") :]] = value
        elif key.startswith("model.decoder.layernorm."):
            out["transformer.decoder.norm." + key.rsplit(".", 1)[1]] = value
        else:
            _, part, _, index, *rest = key.split(".")
            names = enc if part == "encoder" else dec
            module = names.get(rest[0], rest[0])
            prefix = f"transformer.{part}.layers.{index}.{module}"
            if rest[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(f"{prefix}.in_proj_{rest[2]}", {})[rest[1][0]] = value
            else:
                out[f"{prefix}.{'.'.join(rest[1:])}"] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def reference_keys(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official checkpoint, from tests/reference/<name>.keys.tsv (the key
    names, shapes and dtypes of the released checkpoints, kept as data)."""

    path = FIXTURES / "reference" / f"{name}.keys.tsv"
    keys = {}
    for row in path.read_text().splitlines()[1:]:
        key, shape, _ = row.split("\t")
        keys[key] = tuple(int(x) for x in shape.strip("[]").split(",") if x.strip())
    return keys
