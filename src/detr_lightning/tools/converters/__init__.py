"""Convert a YOLO or Pascal VOC detection dataset into the COCO layout that ``data.root=``
reads: :func:`convert_yolo`, :func:`convert_voc`, :func:`format_summary`. ``detr-convert`` is
the command (:mod:`detr_lightning.cli.convert`).

The modules, by role: :mod:`.yolo` and :mod:`.voc` read the two formats (their layouts and
box conventions); :mod:`.reading` holds what both readers share (class names, image headers,
boxes fitted to their image); :mod:`.writing` writes the COCO dataset (output layout, ids,
splits); :mod:`.summary` is what a conversion wrote, left out and noted (errors and skips).

Why no library: supervision (0.31; ``DetectionDataset.from_yolo`` / ``from_pascal_voc``) was
the candidate, and it is no longer tied to OpenCV, but it brings PyAV, requests, tqdm and
pydeprecate. Its VOC loader decodes every image in full to learn its size, does not read
``difficult`` and numbers the classes in the order it meets them; its YOLO boxes are float32;
and it returns in-memory detections, so the layouts, the skips by reason, the id conventions and
the COCO files would still be written here. Reading the two formats with these checks takes a
few hundred lines.
"""

from .reading import read_class_names
from .summary import (
    ANNOTATION_FILES,
    IMAGE_DIRS,
    NOTES,
    SKIPS,
    ConversionSummary,
    SplitSummary,
    format_summary,
)
from .voc import convert_voc
from .yolo import convert_yolo

__all__ = [
    "ANNOTATION_FILES",
    "IMAGE_DIRS",
    "NOTES",
    "SKIPS",
    "ConversionSummary",
    "SplitSummary",
    "convert_voc",
    "convert_yolo",
    "format_summary",
    "read_class_names",
]
