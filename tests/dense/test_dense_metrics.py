"""mIoU, mean accuracy and pixel accuracy: against mmseg's intersect_and_union / total_area_to_metrics
(tests/dense/mmseg_transcription.py) and on cases computed by hand."""

import math

import numpy as np
import pytest
import torch

from tieta.dense.metrics import SegmentationMeter, intersect_and_union, total_area_to_metrics
from tests.dense import mmseg_transcription as mmseg


def test_a_case_by_hand():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 2]])  # the last two pixels are ignored
    intersect, union, predicted, labelled = intersect_and_union(prediction, label, 4, 255)
    assert intersect.tolist() == [1, 2, 1, 0]
    assert predicted.tolist() == [2, 3, 1, 0] and labelled.tolist() == [2, 2, 2, 0]
    assert union.tolist() == [3, 3, 2, 0]
    scores = total_area_to_metrics(intersect, union, predicted, labelled)
    assert scores["aAcc"] == pytest.approx(4 / 6)
    assert scores["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)  # class 3: in neither, left out
    assert scores["mAcc"] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
    assert math.isnan(scores["IoU"][3]) and math.isnan(scores["Acc"][3])


def test_a_class_predicted_but_never_labelled_counts_as_iou_zero():
    label, prediction = torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 1, 1])
    scores = total_area_to_metrics(*intersect_and_union(prediction, label, 2, 255))
    assert scores["IoU"].tolist() == [0.5, 0.0] and scores["mIoU"] == pytest.approx(0.25)
    assert math.isnan(scores["Acc"][1]) and scores["mAcc"] == 0.5  # no label of class 1: its accuracy is NaN


def test_predictions_outside_the_classes_count_for_none():
    label, prediction = torch.tensor([0, 1, 1]), torch.tensor([0, 7, 1])
    intersect, union, predicted, labelled = intersect_and_union(prediction, label, 2, 255)
    assert predicted.tolist() == [1, 1] and union.tolist() == [1, 2]
    assert total_area_to_metrics(intersect, union, predicted, labelled)["aAcc"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_the_accumulated_scores_are_mmsegs(seed):
    rng = np.random.RandomState(seed)
    classes, meter = 6, SegmentationMeter(6)
    totals = [torch.zeros(classes) for _ in range(4)]
    for _ in range(4):
        label = torch.from_numpy(rng.randint(0, classes - 1, (9, 13)))  # class 5 never labelled
        label[rng.rand(9, 13) < 0.2] = 255
        prediction = torch.from_numpy(rng.randint(0, classes - 2 + seed % 2, (9, 13)))  # 5: predicted in odd seeds
        meter.update(prediction, label)
        for total, area in zip(totals, mmseg.intersect_and_union(prediction, label, classes, 255)):
            total += area
    ours, reference = meter.scores(), mmseg.total_area_to_metrics(*totals)
    assert np.allclose(ours["IoU"].numpy(), reference["IoU"], equal_nan=True)
    assert np.allclose(ours["Acc"].numpy(), reference["Acc"], equal_nan=True)
    for name, value in mmseg.summary(reference).items():
        assert ours[name] == pytest.approx(value, rel=1e-6)
    assert torch.equal(meter.areas.double(), torch.stack(totals).double())


def test_another_ignore_index_and_a_batch_at_once():
    label = torch.tensor([[[0, 1], [9, 1]], [[1, 1], [0, 9]]])
    prediction = torch.tensor([[[0, 1], [1, 0]], [[1, 1], [1, 0]]])
    meter = SegmentationMeter(2, ignore_index=9)
    meter.update(prediction, label)
    assert meter.areas.tolist() == [[1, 3], [3, 5], [2, 4], [2, 4]]
    assert meter.scores()["aAcc"] == pytest.approx(4 / 6)
