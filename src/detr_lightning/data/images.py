"""Images from users for inference: any common file or object in, uint8 RGB out, and the
preprocessing a model was evaluated with.

``read_image`` accepts a path, a PIL image or a uint8 tensor. Files are decoded by torchvision
(fast, EXIF orientation applied) and, for what it cannot read, by PIL; grey, grey+alpha,
palette, RGBA, CMYK and 16-bit images all come out as 8-bit RGB. Transparent pixels are
composited on white, as an image viewer shows them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from .presets import make_val_transforms

__all__ = ["IMAGE_SUFFIXES", "inference_size", "inference_transform", "read_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _from_pil(image: Image.Image) -> Tensor:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: keep the top 8 bits
        values = np.asarray(image, dtype=np.float64)
        # Mode "I" (32-bit) is how Pillow holds 16-bit PNG/TIFF data after convert("I") or in
        # older versions: scaled as 32-bit it would come out black. Only values beyond 16 bits
        # mark a genuinely 32-bit image.
        is_32_bit = image.mode == "I" and values.size > 0 and values.max() > 65535
        scale = 16843009.0 if is_32_bit else 257.0  # (2**32 - 1) / 255 or 65535 / 255
        grey = torch.from_numpy(values / scale)
        return grey.round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1).contiguous()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return F.pil_to_tensor(image.convert("RGB"))


def _to_rgb8(image: Tensor) -> Tensor:
    """torchvision's [C, H, W] (C = 1..4, uint8 or uint16) -> uint8 RGB, alpha on white."""
    if image.dtype != torch.uint8:  # 16-bit: 65535 -> 255
        image = (image.to(torch.float32) / 257.0).round().clamp(0, 255).to(torch.uint8)
    if image.shape[0] in (2, 4):
        alpha = image[-1:].to(torch.float32) / 255.0
        color = image[:-1].to(torch.float32)
        image = (color * alpha + 255.0 * (1 - alpha)).round().to(torch.uint8)
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def _needs_pil(data: Tensor) -> bool:
    """Whether the encoded bytes (uint8 [N]) are a format torchvision decodes wrongly.

    torchvision returns a palette PNG's colour indices as grey levels, and a GIF's transparent
    colour as opaque (all its frames, for an animation); PIL reads both as they display.
    """
    head = bytes(data[:26].tolist())
    is_gif = head.startswith(b"GIF8")
    is_palette_png = head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) > 25 and head[25] == 3
    return is_gif or is_palette_png


def read_image(source: str | os.PathLike | Image.Image | Tensor) -> Tensor:
    """uint8 [3, H, W] RGB of a file path, a PIL image or an image tensor.

    A tensor may be [H, W], [1, H, W], [3, H, W] or [4, H, W] (alpha dropped), uint8 or
    float in [0, 1]. Raises ValueError naming the file when it does not decode.
    """
    if isinstance(source, Tensor):
        image = source if source.dim() == 3 else source[None]
        if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"expected an image tensor [C, H, W] with C in 1/3/4, got {tuple(source.shape)}"
            )
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        elif image.dtype != torch.uint8:
            raise ValueError(f"image tensors must be uint8 or float in [0, 1], got {image.dtype}")
        return image[:3].expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image[:3]
    if isinstance(source, Image.Image):
        return _from_pil(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    if path.stat().st_size == 0:  # torchvision's read_file fails with a C++ trace on these
        raise ValueError(f"image {path} is an empty file (0 bytes); replace or remove it")
    data = read_file(str(path))
    if not _needs_pil(data):
        try:
            decoded = decode_image(data, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)
            if decoded.dim() == 3:
                return _to_rgb8(decoded)
        except RuntimeError:
            pass  # a format torchvision does not decode (TIFF, CMYK JPEG, ...): PIL below
    try:
        with Image.open(path) as opened:
            opened.load()
            return _from_pil(opened)
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"image {path} does not decode ({err}); is it an image file?") from None


def _val_settings(data: Mapping[str, Any] | None) -> dict[str, int]:
    settings = {k: v for k, v in (data or {}).items() if k in ("val_size", "max_size")}
    return {k: int(v) for k, v in settings.items() if v is not None}


def inference_size(data: Mapping[str, Any] | None, height: int, width: int) -> tuple[int, int]:
    """(H', W') that :func:`inference_transform` gives an image of ``height`` x ``width``,
    computed by that same transform on an empty box list of that canvas (no pixels)."""
    transform = make_val_transforms(**_val_settings(data))
    canvas = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
    resized = transform(canvas).canvas_size
    return int(resized[0]), int(resized[1])


def inference_transform(data: Mapping[str, Any] | None = None) -> Callable[[Tensor], Tensor]:
    """uint8 [3, H, W] -> the normalized float [3, H', W'] a model was evaluated on.

    ``data`` is a module's ``hparams["data"]`` (``val_size``, ``max_size``); missing keys take
    the evaluation defaults of :func:`~detr_lightning.data.presets.make_val_transforms` (the
    paper's 800 / 1333).
    """
    transform = make_val_transforms(**_val_settings(data))
    return lambda image: transform(tv_tensors.Image(image)).as_subclass(Tensor)
