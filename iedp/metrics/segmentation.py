"""Semantic segmentation metrics (DESIGN §3): areas summed over the whole dataset, then IoU/Acc.

The maths is two pure functions (:func:`intersect_and_union`, :func:`areas_to_metrics`), as in
mmsegmentation's ``IoUMetric``. :class:`SegmentationMetric` only keeps running sums as int64
tensors, so distributed evaluation can all-reduce its :meth:`~SegmentationMetric.state` (e.g.
``accelerator.reduce(metric.state(), "sum")``) and :meth:`~SegmentationMetric.load_state` the result.
"""

import math
from collections.abc import Sequence

import torch

AREA_KEYS = ("area_intersect", "area_union", "area_pred", "area_label")


def intersect_and_union(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class pixel counts (intersection, union, prediction, label), each int64 of length ``num_classes``.

    Pixels whose label is ``ignore_index`` are left out entirely. A prediction of ``ignore_index``
    means "no class" and counts as wrong. Any other value outside 0..num_classes-1 is an error, so
    a model with the wrong number of classes cannot be scored silently.
    """
    if pred.shape != label.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} does not match label shape {tuple(label.shape)}"
        )
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long().to(pred.device)
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    for name, values, allowed_ignore in (("label", label, False), ("prediction", pred, True)):
        bad = (values < 0) | (values >= num_classes)
        if allowed_ignore:
            bad &= values != ignore_index
        if bad.any():
            raise ValueError(
                f"{name} value {int(values[bad][0])} outside 0..{num_classes - 1} (ignore index {ignore_index})"
            )
    area_label = torch.bincount(label, minlength=num_classes)
    area_intersect = torch.bincount(label[pred == label], minlength=num_classes)
    area_pred = torch.bincount(pred[pred != ignore_index], minlength=num_classes)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def areas_to_metrics(
    area_intersect: torch.Tensor,
    area_union: torch.Tensor,
    area_label: torch.Tensor,
    class_names: Sequence[str],
) -> dict[str, float | dict[str, float]]:
    """Percentages from summed areas.

    IoU_c = I_c / U_c, NaN when the class is in neither ground truth nor prediction; Acc_c =
    I_c / L_c, NaN when the class is absent from the ground truth. mIoU and mAcc average the
    non-NaN classes; aAcc = ΣI / ΣL over all labelled pixels.
    """
    intersect, union, label = (a.double().cpu() for a in (area_intersect, area_union, area_label))
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, intersect / union.clamp(min=1), nan) * 100
    acc = torch.where(label > 0, intersect / label.clamp(min=1), nan) * 100
    total = label.sum()
    return {
        "aAcc": float(intersect.sum() / total * 100) if total > 0 else math.nan,
        "mIoU": float(iou.nanmean()),
        "mAcc": float(acc.nanmean()),
        "IoU": dict(zip(class_names, iou.tolist(), strict=True)),
        "Acc": dict(zip(class_names, acc.tolist(), strict=True)),
    }


class SegmentationMetric:
    """Streaming dataset-level segmentation metric (mIoU, mAcc, aAcc and per-class IoU/Acc)."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = 255):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
        self.num_classes = num_classes
        self.class_names = (
            list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        )
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self._state = {key: torch.zeros(self.num_classes, dtype=torch.int64) for key in AREA_KEYS}

    def to(self, device: torch.device | str) -> "SegmentationMetric":
        """Keep the sums on ``device`` (for example the accelerator's, before an all-reduce)."""
        self._state = {key: value.to(device) for key, value in self._state.items()}
        return self

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add a prediction/label pair of class-index maps (any matching shape, e.g. B×H×W)."""
        areas = intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        for key, area in zip(AREA_KEYS, areas, strict=True):
            self._state[key] += area.to(self._state[key].device)

    def state(self) -> dict[str, torch.Tensor]:
        """Copies of the running sums, keyed by :data:`AREA_KEYS`."""
        return {key: value.clone() for key, value in self._state.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the sums, e.g. with all-reduced ones."""
        self._check(state)
        self._state = {key: state[key].clone().long() for key in AREA_KEYS}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        """Add another metric's sums (from another process or shard)."""
        self._check(state)
        for key in AREA_KEYS:
            self._state[key] += state[key].to(self._state[key].device).long()

    def compute(self) -> dict[str, float | dict[str, float]]:
        """``aAcc``, ``mIoU``, ``mAcc`` and per-class ``IoU`` and ``Acc`` dicts, all in percent."""
        return areas_to_metrics(
            self._state["area_intersect"],
            self._state["area_union"],
            self._state["area_label"],
            self.class_names,
        )

    def _check(self, state: dict[str, torch.Tensor]) -> None:
        for key in AREA_KEYS:
            if key not in state or state[key].shape != (self.num_classes,):
                raise ValueError(f"state must hold {', '.join(AREA_KEYS)} of shape ({self.num_classes},)")
