"""Segmentation and depth metrics against values computed by hand."""

import json
import math

import pytest
import torch

from iedp.metrics.depth import DEPTH_METRICS, DepthMetric, depth_errors
from iedp.metrics.segmentation import SegmentationMetric, intersect_and_union
from iedp.outputs import json_text

# 2×3 maps, 4 classes; the last label pixel is ignored (its prediction too).
LABEL = torch.tensor([[0, 0, 1], [1, 1, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 2, 2]])


def test_intersect_and_union_by_hand():
    intersect, union, pred_area, label_area = intersect_and_union(PRED, LABEL, num_classes=4)
    # class 0: GT {(0,0),(0,1)}, pred {(0,0)}; class 1: GT 3 px, pred 3 px, 2 shared;
    # class 2: predicted once, never in GT (the 2 on the ignored pixel does not count); class 3: absent.
    assert intersect.tolist() == [1, 2, 0, 0]
    assert pred_area.tolist() == [1, 3, 1, 0]
    assert label_area.tolist() == [2, 3, 0, 0]
    assert union.tolist() == [2, 4, 1, 0]


def test_segmentation_metric_by_hand():
    metric = SegmentationMetric(4, ["a", "b", "c", "d"])
    metric.update(PRED, LABEL)
    result = metric.compute()
    assert result["IoU"]["a"] == pytest.approx(50.0)
    assert result["IoU"]["b"] == pytest.approx(50.0)
    assert result["IoU"]["c"] == pytest.approx(0.0)  # predicted but not in GT: counts as 0
    assert math.isnan(result["IoU"]["d"])  # in neither: skipped
    assert result["Acc"]["b"] == pytest.approx(200 / 3)
    assert math.isnan(result["Acc"]["c"])  # no GT pixels: accuracy undefined
    assert result["mIoU"] == pytest.approx(100 / 3)
    assert result["mAcc"] == pytest.approx((50 + 200 / 3) / 2)
    assert result["aAcc"] == pytest.approx(60.0)


def test_ignore_index_prediction_counts_as_wrong():
    metric = SegmentationMetric(2)
    metric.update(torch.tensor([[255, 1]]), torch.tensor([[0, 1]]))
    result = metric.compute()
    assert result["IoU"] == {"class_0": 0.0, "class_1": 100.0}
    assert result["aAcc"] == pytest.approx(50.0)


def test_out_of_range_values_are_errors():
    with pytest.raises(ValueError, match="prediction value 7 outside 0..3"):
        intersect_and_union(torch.tensor([7]), torch.tensor([0]), num_classes=4)
    with pytest.raises(ValueError, match="label value 4 outside 0..3"):
        intersect_and_union(torch.tensor([0]), torch.tensor([4]), num_classes=4)


def test_perfect_segmentation_is_100():
    label = torch.randint(0, 5, (2, 16, 16))
    label[0, :3] = 255
    metric = SegmentationMetric(5)
    metric.update(label.clone(), label)
    result = metric.compute()
    assert result["mIoU"] == pytest.approx(100.0)
    assert result["mAcc"] == pytest.approx(100.0)
    assert result["aAcc"] == pytest.approx(100.0)


def test_segmentation_streaming_merge_equals_one_shot():
    generator = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 6, (4, 10, 12), generator=generator)
    labels = torch.randint(0, 6, (4, 10, 12), generator=generator)
    labels[labels == 5] = 255
    one_shot = SegmentationMetric(6)
    one_shot.update(preds, labels)
    first, second = SegmentationMetric(6), SegmentationMetric(6)
    for pred, label in zip(preds[:2], labels[:2], strict=True):
        first.update(pred, label)
    second.update(preds[2:], labels[2:])
    first.merge(second.state())
    assert _same(first, one_shot)
    assert first.compute()["mIoU"] == one_shot.compute()["mIoU"]
    restored = SegmentationMetric(6)
    restored.load_state(first.state())
    assert _same(restored, one_shot)


def _same(a: SegmentationMetric, b: SegmentationMetric) -> bool:
    return all(torch.equal(a.state()[k], b.state()[k]) for k in a.state())


# ----------------------------------------------------------------------------- depth


def test_depth_errors_by_hand():
    gt = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # 0 = no measurement
    pred = torch.tensor([[1.0, 1.0], [5.0, 3.0]])
    errors = depth_errors(pred, gt, crop="none")
    # valid pixels: p = (1, 1, 5), g = (1, 2, 4); max ratios 1, 2, 1.25
    d = [0.0, -math.log(2), math.log(1.25)]
    expected = {
        "d1": 1 / 3,  # 1.25 is not < 1.25
        "d2": 2 / 3,
        "d3": 2 / 3,  # 2 is not < 1.953
        "abs_rel": (0 + 1 / 2 + 1 / 4) / 3,
        "sq_rel": (0 + 1 / 2 + 1 / 4) / 3,
        "rmse": math.sqrt(2 / 3),
        "rmse_log": math.sqrt(sum(x * x for x in d) / 3),
        "log10": (0 + math.log10(2) + math.log10(1.25)) / 3,
        "silog": math.sqrt(sum(x * x for x in d) / 3 - 0.5 * (sum(d) / 3) ** 2),
    }
    assert errors == pytest.approx(expected)


def test_depth_range_excludes_pixels():
    gt = torch.tensor([[1.0, 10.0, 12.0, 0.0005]])  # only the first is inside (1e-3, 10)
    pred = torch.tensor([[2.0, 1.0, 1.0, 1.0]])
    assert depth_errors(pred, gt, crop="none")["abs_rel"] == pytest.approx(1.0)


def test_eigen_crop_bounds():
    gt = torch.ones(480, 640)
    for row, col, inside in [(44, 300, False), (45, 300, True), (470, 300, True), (471, 300, False),
                             (200, 40, False), (200, 41, True), (200, 600, True), (200, 601, False)]:  # fmt: skip
        pred = torch.ones(480, 640)
        pred[row, col] = 2.0
        rmse = depth_errors(pred, gt, crop="eigen")["rmse"]
        assert (rmse > 0) == inside, (row, col)
    assert depth_errors(pred, gt, crop="none")["rmse"] > 0


def test_eigen_crop_needs_480x640():
    with pytest.raises(ValueError, match="480x640"):
        depth_errors(torch.ones(10, 10), torch.ones(10, 10), crop="eigen")
    with pytest.raises(ValueError, match="crop must be one of"):
        depth_errors(torch.ones(10, 10), torch.ones(10, 10), crop="center")


def test_no_valid_pixels_is_an_error():
    with pytest.raises(ValueError, match="no valid ground-truth pixels"):
        depth_errors(torch.ones(3, 3), torch.zeros(3, 3), crop="none")


def test_perfect_depth():
    gt = torch.rand(480, 640) * 9 + 0.5
    errors = depth_errors(gt.clone(), gt)
    assert errors["rmse"] == 0.0
    assert errors["d1"] == 1.0
    assert errors["silog"] == 0.0


def test_depth_metric_averages_per_image():
    metric = DepthMetric(crop="none")
    metric.update(torch.tensor([[3.0]]), torch.tensor([[2.0]]))  # one pixel, abs_rel 0.5
    metric.update(torch.full((1, 1, 3), 2.0), torch.full((1, 1, 3), 2.0))  # three pixels, abs_rel 0
    result = metric.compute()
    assert result["count"] == 2
    assert result["abs_rel"] == pytest.approx(0.25)  # not the pixel-pooled 0.125


def test_depth_streaming_merge_equals_one_shot():
    generator = torch.Generator().manual_seed(1)
    gts = torch.rand(5, 1, 8, 9, generator=generator) * 5 + 0.5
    preds = gts * (1 + 0.2 * torch.randn(5, 1, 8, 9, generator=generator)).clamp(0.5, 1.5)
    one_shot = DepthMetric(crop="none")
    one_shot.update(preds, gts)
    first, second = DepthMetric(crop="none"), DepthMetric(crop="none")
    first.update(preds[:3], gts[:3])
    second.update(preds[3:], gts[3:])
    first.merge(second.state())
    assert first.compute() == pytest.approx(one_shot.compute())
    restored = DepthMetric(crop="none")
    restored.load_state(first.state())
    assert restored.compute() == pytest.approx(one_shot.compute())
    assert set(one_shot.compute()) == {*DEPTH_METRICS, "count"}


def test_metrics_are_written_as_standard_json():
    """A class without pixels has no IoU (NaN): the metrics files carry null, which strict parsers accept."""
    metric = SegmentationMetric(3, ["wall", "floor", "sky"])
    metric.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [1, 0]]))
    metrics = metric.compute()
    assert math.isnan(metrics["IoU"]["sky"])

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    written = json.loads(json_text({"step": 3, **metrics}), parse_constant=refuse)
    assert written["IoU"] == {"wall": 50.0, "floor": pytest.approx(200 / 3), "sky": None}
    assert written["mIoU"] == pytest.approx(metrics["mIoU"]) and written["step"] == 3
