"""Segmentation metrics as mmseg computes them: per-class areas accumulated over a split, then the
scores from the totals (``intersect_and_union`` and ``total_area_to_metrics``).

Per image, pixels whose label is the ignore index are dropped; a prediction or label outside
0..classes-1 counts for no class (as ``torch.histc`` drops values outside its range). Over the split:

- aAcc (pixel accuracy): correct pixels / labelled pixels;
- IoU per class: intersection / union; Acc per class: intersection / label area;
- mIoU and mAcc: their means over the classes that have a value. A class absent from both the
  predictions and the labels has IoU 0/0 = NaN, and a class absent from the labels has Acc NaN; NaN
  is left out of the mean (numpy's nanmean, as mmseg). A class predicted but never labelled has IoU 0,
  which counts.

Areas are counted as integers (mmseg counts in float32, which is exact below 2^24 pixels a class).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def intersect_and_union(prediction: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-class areas of one prediction against its label map (any equal shapes).

    Returns:
        (intersection, union, predicted, labelled), each (num_classes,) int64 pixel counts.
    """
    keep = label != ignore_index
    prediction, label = prediction[keep].long(), label[keep].long()

    def area(values: torch.Tensor) -> torch.Tensor:
        inside = values[(values >= 0) & (values < num_classes)]
        return torch.bincount(inside, minlength=num_classes)

    intersect = area(prediction[prediction == label])
    predicted, labelled = area(prediction), area(label)
    return intersect, predicted + labelled - intersect, predicted, labelled


def total_area_to_metrics(intersect: torch.Tensor, union: torch.Tensor, predicted: torch.Tensor,
                          labelled: torch.Tensor) -> dict:
    """The scores from areas summed over a split (fractions, not percentages).

    Returns:
        {"aAcc": float, "mIoU": float, "mAcc": float, "IoU": (C,) float64, "Acc": (C,) float64}; the
        per-class values NaN where undefined, the means NaN where no class has a value.
    """
    intersect, union, labelled = intersect.double(), union.double(), labelled.double()
    iou, acc = intersect / union, intersect / labelled  # 0/0 = NaN: absent classes
    return {"aAcc": float(intersect.sum() / labelled.sum()), "mIoU": float(iou.nanmean()),
            "mAcc": float(acc.nanmean()), "IoU": iou, "Acc": acc}


@dataclass
class SegmentationMeter:
    """Areas accumulated over the images of a split; :meth:`scores` gives the metrics."""

    num_classes: int
    ignore_index: int = 255
    areas: torch.Tensor = field(init=False)  # (4, C): intersection, union, predicted, labelled

    def __post_init__(self) -> None:
        self.areas = torch.zeros(4, self.num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """Add one image's (or a batch's) areas: ``prediction`` and ``label`` of the same shape."""
        self.areas += torch.stack(intersect_and_union(prediction.cpu(), label.cpu(), self.num_classes,
                                                      self.ignore_index))

    def scores(self) -> dict:
        """:func:`total_area_to_metrics` of the areas so far."""
        return total_area_to_metrics(*self.areas)
