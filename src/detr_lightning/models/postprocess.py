"""Turn DETR's raw outputs into scored, labelled boxes in image pixels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.boxes import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Softmax, drop "no object", best class per query, boxes to absolute xyxy.

    Args:
        score_threshold: keep detections with score > threshold (0 keeps all queries, as the
            official evaluation does).
        top_k: keep at most this many detections per image, highest score first.
    """

    def __init__(self, score_threshold: float = 0.0, top_k: int | None = None) -> None:
        super().__init__()
        self.score_threshold = score_threshold
        self.top_k = top_k

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Tensor], target_sizes: Tensor | list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per image ``scores`` [N], ``labels`` int64 [N] and ``boxes`` [N, 4] xyxy in pixels.

        ``target_sizes`` is [B, 2] (height, width) of each image as the boxes should be scaled,
        usually the original image size.
        """
        logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"target_sizes must be [B, 2] (h, w) with B={logits.shape[0]}, "
                f"got {tuple(target_sizes.shape)}"
            )
        prob = logits.float().softmax(-1)
        scores, labels = prob[..., :-1].max(-1)
        height, width = target_sizes.unbind(1)
        scale = torch.stack([width, height, width, height], dim=1).to(torch.float32)
        boxes = box_cxcywh_to_xyxy(pred_boxes.float()) * scale[:, None, :]

        results = []
        for image_scores, image_labels, image_boxes in zip(scores, labels, boxes):
            if self.score_threshold > 0:
                keep = image_scores > self.score_threshold
                image_scores, image_labels, image_boxes = (
                    image_scores[keep],
                    image_labels[keep],
                    image_boxes[keep],
                )
            if self.top_k is not None:
                order = image_scores.argsort(descending=True)[: self.top_k]
                image_scores, image_labels, image_boxes = (
                    image_scores[order],
                    image_labels[order],
                    image_boxes[order],
                )
            results.append({"scores": image_scores, "labels": image_labels, "boxes": image_boxes})
        return results
