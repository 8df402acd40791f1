"""Detections on your own images: :func:`predict` (the API), :func:`predict_files` and
:func:`predict_cli` (``python predict.py``, see conf/predict.yaml).

Images go through the preprocessing the model was evaluated with
(:func:`~detr_lightning.data.images.inference_transform`) and come back with boxes in the
pixels of the original image (after EXIF orientation). The selection follows the official
DETR demo: softmax over the classes, "no object" dropped, the best class of each query, kept
when its probability exceeds ``threshold``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .data.images import IMAGE_SUFFIXES, inference_size, inference_transform, read_image
from .errors import SetupError
from .io import write_json_atomic
from .ops.boxes import box_cxcywh_to_xyxy

log = logging.getLogger(__name__)

ImageSource = str | os.PathLike | Image.Image | Tensor

# Box colours indexed by label (modulo its length): a class keeps its colour across images.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]  # fmt: skip


@dataclass
class DecodedImage:
    """One decoded image on its way through :func:`iter_predictions`."""

    index: int  # position among the sources
    size: tuple[int, int]  # original (height, width)
    model_input: Tensor  # normalized float [3, H', W']
    pixels: Tensor | None  # uint8 [3, H, W], kept only when the caller draws


# ------------------------------------------------------------------------------------ API
def predict(
    module,
    images: ImageSource | Sequence[ImageSource],
    *,
    threshold: float = 0.7,
    top_k: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    bf16: bool = False,
) -> list[dict[str, Any]]:
    """Detect objects in one image or a list of images.

    An image is a file path, a PIL image, a uint8 tensor [3, H, W] (or [H, W], [1/4, H, W]) or
    a float tensor in [0, 1]; a [B, 3, H, W] tensor is B images. Float tensors are quantized to
    8 bits like a file, so every kind of input gives the same detections.

    Returns, per image in order, a dict of CPU tensors sorted by score (descending):
    ``scores`` float32 [N], ``labels`` int64 [N] (contiguous), ``names`` (N strings),
    ``category_ids`` int64 [N] (dataset ids), ``boxes`` float32 [N, 4] xyxy in original image
    pixels (not clamped to the image, as in evaluation), ``queries`` int64 [N] (the decoder
    query of each detection). Labels whose category id is -1 (unused) are never returned.
    ``device`` None keeps the module where it is; otherwise the module is moved there. ``bf16``
    runs the forward under bfloat16 autocast.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    elif isinstance(images, Tensor):
        images = list(images) if images.dim() == 4 else [images]
    images = list(images)
    results: dict[int, dict[str, Any]] = {}
    for image, detection in iter_predictions(
        module,
        images,
        threshold=threshold,
        top_k=top_k,
        batch_size=batch_size,
        device=device,
        bf16=bf16,
    ):
        results[image.index] = detection
    return [results[i] for i in range(len(images))]


def iter_predictions(
    module,
    sources: Iterable[ImageSource],
    *,
    threshold: float = 0.7,
    top_k: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    bf16: bool = False,
    keep_pixels: bool = False,
    skip_unreadable: bool = False,
) -> Iterator[tuple[DecodedImage, dict[str, Any]]]:
    """Yield ``(image, detection)`` per source as its batch completes (not in input order).

    ``detection`` is as in :func:`predict`; ``image`` a :class:`DecodedImage` (its ``index``
    in ``sources``, original ``size``, and ``pixels`` only with ``keep_pixels``). With
    ``skip_unreadable`` a source that does not decode is logged as a warning and left out,
    otherwise its error propagates. At most ``2 * batch_size`` decoded images are held at once.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive number of detections or None, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if device is not None:
        module.to(device)
    was_training = module.training
    module.eval()
    transform = inference_transform(module.hparams.get("data"))
    run = _BatchRunner(module, threshold, top_k, bf16)
    # DETR's outputs depend on the padding a batch adds: the backbone's receptive fields at
    # the right and bottom edges take in the padded zeros, and the mask downsampled to the
    # feature grid rounds each image's extent, which the position encoding is normalized by.
    # So images share a batch only with others of identical preprocessed size (no padding at
    # all), and a batch gives the detections of one-by-one inference; each size waits in its
    # own bucket.
    buckets: dict[tuple[int, int], list[DecodedImage]] = {}
    pending_limit = 2 * batch_size
    try:
        for index, source in enumerate(sources):
            try:
                pixels = read_image(source)
            except (OSError, ValueError) as err:
                if not skip_unreadable:
                    raise
                log.warning("skipped %s: %s", source, err)
                continue
            model_input = transform(pixels)
            size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
            item = DecodedImage(index, size, model_input, pixels if keep_pixels else None)
            bucket = buckets.setdefault(tuple(model_input.shape[-2:]), [])
            bucket.append(item)
            if len(bucket) >= batch_size:
                yield from run(buckets.pop(tuple(model_input.shape[-2:])))
            elif sum(map(len, buckets.values())) >= pending_limit:
                # bounded memory: the largest bucket goes even though it is not full
                largest = max(buckets, key=lambda key: len(buckets[key]))
                yield from run(buckets.pop(largest))
        for key in list(buckets):
            yield from run(buckets.pop(key))
    finally:
        module.train(was_training)


class _BatchRunner:
    """Forward one batch of same-size images and select the detections of each."""

    def __init__(self, module, threshold: float, top_k: int | None, bf16: bool) -> None:
        self.module = module
        self.threshold = threshold
        self.top_k = top_k
        self.bf16 = bf16
        self.model = module.model
        self.batches = 0
        self.names = module.class_names
        self.category_table = torch.as_tensor(module.category_ids(), dtype=torch.int64)
        self.device = next(module.parameters()).device

    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors in place
    def __call__(self, items: list[DecodedImage]) -> Iterator[tuple[DecodedImage, dict]]:
        batch = torch.stack([item.model_input for item in items]).to(self.device)
        if self.bf16 and self.batches == 1:
            # From the second batch on, a copy with the backbone's weights folded and cast
            # once, not at every call; the same detections (see DETR.bf16_inference_copy). A
            # call with one batch does not pay for the copy.
            self.model = self.module.model.bf16_inference_copy()
        self.batches += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            outputs = self.model(batch)
        logits = outputs["pred_logits"].float().cpu()  # [B, Q, C + 1]
        pred_boxes = outputs["pred_boxes"].float().cpu()  # [B, Q, 4] cxcywh in [0, 1]
        for item, image_logits, image_boxes in zip(items, logits, pred_boxes):
            yield item, self.select(image_logits, image_boxes, item.size)

    def select(self, logits: Tensor, pred_boxes: Tensor, size: tuple[int, int]) -> dict:
        return select_detections(
            logits,
            pred_boxes,
            size,
            threshold=self.threshold,
            top_k=self.top_k,
            category_ids=self.category_table,
            names=self.names,
        )


def select_detections(
    logits: Tensor,
    pred_boxes: Tensor,
    size: tuple[int, int],
    *,
    threshold: float,
    category_ids: Tensor,
    names: Sequence[str],
    top_k: int | None = None,
) -> dict[str, Any]:
    """One image's detections, selected as the official demo does.

    ``logits`` [Q, C + 1] and ``pred_boxes`` [Q, 4] (cxcywh in [0, 1]) of one image; ``size``
    its original (height, width); ``category_ids`` [C] the dataset id of each label (-1:
    unused, never kept). Softmax, "no object" dropped, best class per query, kept when its
    probability > ``threshold``; sorted by score, at most ``top_k``. Returns the dict that
    :func:`predict` documents.
    """
    scores, labels = logits.softmax(-1)[:, :-1].max(-1)
    category_ids = category_ids.to(labels.device)
    keep = (scores > threshold) & (category_ids[labels] != -1)
    queries = keep.nonzero().flatten()
    order = scores[queries].argsort(descending=True, stable=True)[:top_k]
    queries = queries[order]
    labels = labels[queries]
    height, width = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return {
        "scores": scores[queries],
        "labels": labels,
        "names": [names[i] for i in labels.tolist()],
        "category_ids": category_ids[labels],
        "boxes": box_cxcywh_to_xyxy(pred_boxes[queries]) * scale.to(pred_boxes.device),
        "queries": queries,
    }


# -------------------------------------------------------------------------------- drawing
def _caption_font() -> str | None:
    """A TrueType font that scales with the image (matplotlib's DejaVu Sans), if present."""
    try:
        import matplotlib

        font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except ImportError:
        return None
    return str(font) if font.is_file() else None


MIN_DRAWN_SIDE = 480  # px: smaller images are drawn enlarged, or captions cover them


def drawing_scale(height: int, width: int) -> int:
    """Integer enlargement of a drawing so that its long side reaches MIN_DRAWN_SIDE."""
    return max(1, -(-MIN_DRAWN_SIDE // max(int(height), int(width), 1)))


def draw_detections(pixels: Tensor, detection: dict[str, Any]) -> Tensor:
    """uint8 [3, H, W] image with the boxes of a :func:`predict` result and "name 0.93" captions.

    Each class keeps one colour of :data:`PALETTE`; line width and captions grow with the image.
    Images whose long side is under :data:`MIN_DRAWN_SIDE` pixels are enlarged by the integer
    factor :func:`drawing_scale` (nearest neighbour) first, so that captions stay legible.
    """
    from torchvision.utils import draw_bounding_boxes

    scale = drawing_scale(*pixels.shape[-2:])
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    if len(detection["scores"]) == 0:
        return pixels
    height, width = pixels.shape[-2:]
    limits = torch.tensor([width, height, width, height], dtype=torch.float32) - 1
    # reversed: boxes are drawn in turn, so the best detection ends up on top
    boxes = (detection["boxes"] * scale).clamp(min=torch.zeros(4), max=limits).flip(0)
    colors = [PALETTE[label % len(PALETTE)] for label in detection["labels"].flip(0).tolist()]
    scores = detection["scores"].tolist()
    captions = [f"{name} {score:.2f}" for name, score in zip(detection["names"], scores)][::-1]
    # black captions on light colours, white on dark (ITU-R BT.601 luma)
    text_colors = [
        (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)
        for r, g, b in colors
    ]
    font = _caption_font()
    return draw_bounding_boxes(
        pixels,
        boxes,
        labels=captions,
        colors=colors,
        width=max(2, round(max(height, width) / 300)),
        font=font,
        font_size=max(12, round(max(height, width) / 50)) if font else None,
        label_colors=text_colors,
        label_background_colors=colors,
        fill_labels=True,
    )


# ---------------------------------------------------------------------------------- files
def image_files(inputs: str | os.PathLike) -> list[Path]:
    """The image files that ``inputs`` names: one file, a folder's images or a glob's.

    A folder gives its files with an image suffix (:data:`IMAGE_SUFFIXES`), sorted, not
    recursive; a pattern (``*``, ``?``, ``[``; ``**`` recurses) its matches with an image
    suffix, sorted. Raises SetupError when nothing matches.
    """
    text = os.path.expanduser(str(inputs))
    path = Path(text)
    if path.is_file():
        return [path]

    def is_image(candidate: Path) -> bool:
        return candidate.is_file() and candidate.suffix.lower() in IMAGE_SUFFIXES

    suffixes = ", ".join(IMAGE_SUFFIXES)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if is_image(p))
        if not files:
            raise SetupError(f"input folder {path} holds no image files ({suffixes})")
        return files
    if glob.has_magic(text):
        files = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if is_image(p))
        if not files:
            raise SetupError(f"input pattern {inputs} matches no image files ({suffixes})")
        return files
    raise SetupError(
        f"input {inputs} does not exist; pass an image file, a folder of images or a glob "
        "pattern in quotes (input='photos/*.jpg')"
    )


def _drawing_names(files: Sequence[Path]) -> list[str]:
    """``<stem>.png`` per file, numbered ``<stem>-2.png``... where stems repeat."""
    used: set[str] = set()
    names = []
    for file in files:
        name, count = f"{file.stem}.png", 1
        while name in used:  # a.jpg and a.png, or the same name in two folders of a glob
            count += 1
            name = f"{file.stem}-{count}.png"
        used.add(name)
        names.append(name)
    return names


def predict_files(
    module,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    threshold: float = 0.7,
    top_k: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    bf16: bool = False,
    draw: bool = True,
    static_shapes: int | None = None,
) -> Path:
    """Detect objects in image files; write ``detections.json`` (and drawings) into ``out_dir``.

    ``inputs`` is an image file, a folder or a glob pattern (see :func:`image_files`), or a list
    of files. Files that do not decode are skipped with a warning naming them. The JSON is one
    list with an entry per processed image, in input order: ``file_name``, ``height``,
    ``width`` (original pixels), ``drawing`` (with ``draw``) and ``detections``, each with
    ``file_name``, ``category_id``, ``name``, ``score`` and ``bbox`` as absolute
    ``[x, y, width, height]``. With ``draw``, ``drawn/<stem>.png`` shows the detections.
    Returns the path of ``detections.json``.

    ``static_shapes`` N: every model input shape that at least N of the files share (read
    from their headers before any is decoded) is declared static for the run
    (``Backbone.set_static_shapes``): on the CPU in float32 its images go through a graph
    compiled for that shape (the whole model 4-10% faster on a 2-core AVX2 CPU, about 20% on a
    16-core AMX one), for a compilation of a few seconds at the shape's first image (ResNet-101
    at 800 pixels: about 6 s on 2 cores), so worth it from some tens of images of one size,
    e.g. a camera's frames. Chosen from the whole input before the first image, the shapes do
    not depend on the order of the files. None: the general graph for every size.
    """
    from rich.progress import Progress
    from torchvision.io import write_png

    if isinstance(inputs, (str, os.PathLike)):
        files = image_files(inputs)
    else:
        files = [Path(file) for file in inputs]
    out_dir = Path(out_dir)
    drawn_dir = out_dir / "drawn"
    if draw:
        drawn_dir.mkdir(parents=True, exist_ok=True)
    drawing_names = _drawing_names(files)
    records: dict[int, dict[str, Any]] = {}
    backbone, declared = module.model.backbone, None
    if static_shapes is not None:
        shapes = shared_input_shapes(files, module.hparams.get("data"), batch_size, static_shapes)
        if not shapes <= backbone.static_shapes:
            declared = backbone.static_shapes  # put back (and its graphs dropped) at the end
            backbone.set_static_shapes(declared | shapes)
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("predicting", total=len(files))
            # Files are read lazily: only the images of unfinished batches are in memory.
            for image, detection in iter_predictions(
                module,
                files,
                threshold=threshold,
                top_k=top_k,
                batch_size=batch_size,
                device=device,
                bf16=bf16,
                keep_pixels=draw,
                skip_unreadable=True,
            ):
                record = _record(files[image.index], image.size, detection)
                if draw:
                    assert image.pixels is not None  # keep_pixels=draw
                    name = drawing_names[image.index]
                    write_png(draw_detections(image.pixels, detection), str(drawn_dir / name))
                    record["drawing"] = str(Path("drawn") / name)
                records[image.index] = record
                progress.advance(task)
            # unreadable files never come back: complete the bar for them
            progress.update(task, completed=len(files))
    finally:
        if declared is not None:
            backbone.set_static_shapes(declared)
    return write_json_atomic(out_dir / "detections.json", [records[i] for i in sorted(records)])


def shared_input_shapes(
    files: Sequence[Path], data: Any, batch_size: int, min_images: int
) -> set[tuple[int, int, int, int]]:
    """The model input shapes [batch_size, 3, H', W'] of the preprocessed sizes that at least
    ``min_images`` of ``files`` share, from the files' headers (size and EXIF orientation);
    logs what it found. A file whose header does not read counts for no size (its decoding
    reports it later)."""
    if min_images < 1:
        raise ValueError(f"static_shapes must be a number of images >= 1, got {min_images}")
    # the preprocessing runs once per distinct file size (a camera's frames share one)
    file_sizes = Counter(size for size in map(_oriented_size, files) if size is not None)
    sizes: Counter[tuple[int, int]] = Counter()
    for size, count in file_sizes.items():
        sizes[inference_size(data, *size)] += count
    shared = {size: count for size, count in sizes.items() if count >= min_images}
    if shared:
        log.info(
            "static shapes: a graph compiled for each of %d input size(s) shared by at least "
            "%d images (%s); %d of %d images",
            len(shared), min_images,
            ", ".join(f"{h}x{w}" for h, w in sorted(shared)),
            sum(shared.values()), len(files),
        )  # fmt: skip
    else:
        log.info("static shapes: no input size is shared by %d images; none declared", min_images)
    return {(batch_size, 3, height, width) for height, width in shared}


def _oriented_size(file: Path) -> tuple[int, int] | None:
    """(height, width) of an image file as decoded (EXIF orientation applied), from its header."""
    try:
        with Image.open(file) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # transposed or rotated by 90
                height, width = width, height
            return height, width
    except Exception:  # PIL raises many kinds; the scan only steers speed, never results
        return None


def _record(file: Path, size: tuple[int, int], detection: dict[str, Any]) -> dict[str, Any]:
    boxes = detection["boxes"].tolist()
    return {
        "file_name": str(file),
        "height": size[0],
        "width": size[1],
        "detections": [
            {
                "file_name": str(file),
                "category_id": int(category_id),
                "name": name,
                "score": round(float(score), 5),
                "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
            }
            for category_id, name, score, (x0, y0, x1, y1) in zip(
                detection["category_ids"].tolist(),
                detection["names"],
                detection["scores"].tolist(),
                boxes,
            )
        ],
    }


# ------------------------------------------------------------------------------------ CLI
def predict_cli(cfg) -> Path:
    """``python predict.py``: detections for ``cfg.input`` with ``cfg.pretrained`` or
    ``cfg.ckpt_path``, written into ``cfg.run_dir`` (see conf/predict.yaml).

    Returns the path of ``detections.json``; prints where the results went and how many images
    were processed and skipped. Setup problems (no or missing checkpoint, no images) raise
    SetupError.
    """
    from omegaconf import OmegaConf

    from . import host_memory
    from .console import quiet_third_party
    from .pretrained import CheckpointError, load_pretrained

    source = cfg.get("ckpt_path") or cfg.get("pretrained")
    if not source:
        raise SetupError(
            "no model to predict with: pass pretrained=PATH (official .pth, Hugging Face "
            "directory, or export directory) or ckpt_path=PATH (a training checkpoint)"
        )
    source_path = Path(os.path.expanduser(str(source)))
    if not source_path.exists():
        key = "ckpt_path" if cfg.get("ckpt_path") else "pretrained"
        raise SetupError(f"{key}={source}: no such file or directory; check the path")
    if OmegaConf.is_missing(cfg, "input"):
        raise SetupError("nothing to predict on: pass input=IMAGE, input=FOLDER or input='*.jpg'")
    files = image_files(cfg.input)  # before loading the model: a typo fails fast
    static_shapes = _static_shapes_setting(cfg.get("static_shapes"))
    # a config from before the key leaves malloc alone
    reuse = host_memory.reuse_setting(cfg.get("reuse_freed_memory", False))
    quiet_third_party()
    try:
        module = load_pretrained(source_path)
    except (CheckpointError, FileNotFoundError) as err:
        raise SetupError(str(err)) from None
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device_type = torch.device(device).type
    except RuntimeError as err:
        raise SetupError(f"device={device}: {err}; e.g. device=cpu or device=cuda:0") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SetupError(
            f"device={device}: no CUDA device here; use device=cpu (or leave device unset)"
        )
    if reuse and device_type == "cpu":
        host_memory.reuse_freed_memory()
    run_dir = Path(cfg.run_dir)
    json_path = predict_files(
        module,
        files,
        run_dir,
        threshold=float(cfg.threshold),
        top_k=cfg.get("top_k"),
        batch_size=int(cfg.batch_size),
        device=device,
        bf16=bool(cfg.bf16),
        draw=bool(cfg.draw),
        static_shapes=static_shapes,
    )
    processed = len(json.loads(json_path.read_text()))
    skipped = len(files) - processed
    print(f"detections of {processed} image(s) in {json_path}", flush=True)
    if cfg.draw and processed:
        print(f"drawings in {run_dir / 'drawn'}", flush=True)
    if cfg.get("attention") and processed:
        panels = _attention_panels(module, files, run_dir / "attention", float(cfg.threshold))
        print(f"attention panels of {panels} image(s) in {run_dir / 'attention'}", flush=True)
    if skipped:
        print(f"skipped {skipped} unreadable image(s) (named in the warnings above)", flush=True)
    if files and not processed:  # a script must see that it failed
        raise SetupError(
            f"none of the {len(files)} image(s) could be read (named in the warnings above)"
        )
    return json_path


def _static_shapes_setting(value: Any) -> int | None:
    """``static_shapes`` of conf/predict.yaml: null or a number of images >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SetupError(
            f"static_shapes={value}: give the number of images that must share an input size "
            "for it to get a compiled graph (e.g. static_shapes=32), or null for none"
        )
    return value


def _attention_panels(module, files: list[Path], out_dir: Path, threshold: float) -> int:
    """The paper's decoder and encoder attention panels of every readable file; returns how
    many images got them (unreadable ones were already reported by the prediction pass)."""
    from .attention import attention_panels

    seen: dict[str, int] = {}
    done = 0
    for path in files:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        stem = path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}"
        try:
            attention_panels(module, path, out_dir, threshold=threshold, stem=stem)
        except ValueError:
            continue  # does not decode: named in a warning of the prediction pass
        done += 1
    return done
