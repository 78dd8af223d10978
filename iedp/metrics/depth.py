"""Monocular depth metrics (DESIGN §3): computed per image, then averaged over images.

:func:`depth_errors` is the pure per-image computation. :class:`DepthMetric` keeps the sum of
each metric over images and the image count as float64 tensors, so distributed evaluation can
all-reduce its :meth:`~DepthMetric.state` and :meth:`~DepthMetric.load_state` the result.
"""

import torch

DEPTH_METRICS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
CROPS = ("eigen", "garg", "none")
EIGEN_CROP_SIZE = (480, 640)
EIGEN_CROP = (slice(45, 471), slice(41, 601))
"""Rows 45..470 and columns 41..600 (inclusive) of a 480×640 NYUv2 frame (Eigen et al.)."""
GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)
"""Garg et al.'s KITTI crop as fractions (top, bottom, left, right) of the map it is applied to, truncated to
integers as BTS and GLPDepth do; on KITTI's 352×1216 benchmark crop: rows 143..348, columns 43..1171."""


def garg_crop(height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of :data:`GARG_CROP` on a height × width map."""
    top, bottom, left, right = GARG_CROP
    return slice(int(top * height), int(bottom * height)), slice(int(left * width), int(right * width))


def valid_mask(gt: torch.Tensor, min_depth: float, max_depth: float, crop: str) -> torch.Tensor:
    """Pixels that are scored: min_depth < gt < max_depth, inside the Eigen (NYUv2) or Garg (KITTI) crop when
    asked."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    valid = (gt > min_depth) & (gt < max_depth)
    if crop == "eigen":
        if tuple(gt.shape) != EIGEN_CROP_SIZE:
            raise ValueError(
                f"the Eigen crop is defined for 480x640 NYUv2 maps, got {'x'.join(map(str, gt.shape))}; "
                "use crop='none' for other sizes"
            )
        inside = torch.zeros_like(valid)
        inside[EIGEN_CROP] = True
        valid &= inside
    elif crop == "garg":
        inside = torch.zeros_like(valid)
        inside[garg_crop(*gt.shape[-2:])] = True
        valid &= inside
    return valid


def _as_map(depth: torch.Tensor) -> torch.Tensor:
    """Accept 1×H×W as well as H×W."""
    return depth[0] if depth.dim() == 3 and depth.shape[0] == 1 else depth


def depth_errors(
    pred: torch.Tensor,
    gt: torch.Tensor,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    crop: str = "eigen",
) -> dict[str, float]:
    """The :data:`DEPTH_METRICS` of one H×W prediction against its ground truth, both in metres.

    Over valid pixels (see :func:`valid_mask`), with p the prediction clamped to [min_depth,
    max_depth] (the BTS convention, so logs stay finite) and g the ground truth:
    δk = mean(max(g/p, p/g) < 1.25^k), abs_rel = mean(|p−g|/g), sq_rel = mean((p−g)²/g),
    rmse = sqrt(mean((p−g)²)), rmse_log = sqrt(mean((ln p − ln g)²)),
    log10 = mean(|log10 p − log10 g|), silog = sqrt(mean(d²) − 0.5·mean(d)²) with d = ln p − ln g.
    """
    pred, gt = _as_map(pred), _as_map(gt)
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} does not match ground truth shape {tuple(gt.shape)}"
        )
    if gt.dim() != 2:
        raise ValueError(f"depth maps must be H×W, got shape {tuple(gt.shape)}")
    valid = valid_mask(gt, min_depth, max_depth, crop)
    if not valid.any():
        raise ValueError(f"no valid ground-truth pixels ({min_depth} < gt < {max_depth}, crop={crop})")
    g = gt[valid].double()
    p = pred[valid].double().nan_to_num(nan=min_depth, posinf=max_depth).clamp(min_depth, max_depth)
    ratio = torch.maximum(g / p, p / g)
    diff = p - g
    log_diff = torch.log(p) - torch.log(g)
    return {
        "d1": float((ratio < 1.25).double().mean()),
        "d2": float((ratio < 1.25**2).double().mean()),
        "d3": float((ratio < 1.25**3).double().mean()),
        "abs_rel": float((diff.abs() / g).mean()),
        "sq_rel": float((diff**2 / g).mean()),
        "rmse": float(torch.sqrt((diff**2).mean())),
        "rmse_log": float(torch.sqrt((log_diff**2).mean())),
        "log10": float((torch.log10(p) - torch.log10(g)).abs().mean()),
        "silog": float(torch.sqrt((log_diff**2).mean() - 0.5 * log_diff.mean() ** 2)),
    }


class DepthMetric:
    """Streaming depth metric: per-image :func:`depth_errors`, averaged over images."""

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, crop: str = "eigen"):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        self.min_depth, self.max_depth, self.crop = min_depth, max_depth, crop
        self.reset()

    def reset(self) -> None:
        self._state = {
            "sums": torch.zeros(len(DEPTH_METRICS), dtype=torch.float64),
            "count": torch.zeros((), dtype=torch.float64),
        }

    def to(self, device: torch.device | str) -> "DepthMetric":
        """Keep the sums on ``device`` (for example the accelerator's, before an all-reduce)."""
        self._state = {key: value.to(device) for key, value in self._state.items()}
        return self

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one image (H×W or 1×H×W) or a batch (B×H×W or B×1×H×W) of predictions and ground truths."""
        if pred.shape != gt.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} does not match ground truth shape {tuple(gt.shape)}"
            )
        images = gt.reshape(-1, *gt.shape[-2:]) if gt.dim() > 2 else gt[None]
        preds = pred.reshape(images.shape)
        for one_pred, one_gt in zip(preds, images, strict=True):
            errors = depth_errors(one_pred, one_gt, self.min_depth, self.max_depth, self.crop)
            values = torch.tensor([errors[key] for key in DEPTH_METRICS], dtype=torch.float64)
            self._state["sums"] += values.to(self._state["sums"].device)
            self._state["count"] += 1

    def state(self) -> dict[str, torch.Tensor]:
        """Copies of the running sums: ``sums`` (one per :data:`DEPTH_METRICS`) and image ``count``."""
        return {key: value.clone() for key, value in self._state.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the sums, e.g. with all-reduced ones."""
        self._check(state)
        self._state = {key: state[key].clone().double() for key in ("sums", "count")}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        """Add another metric's sums (from another process or shard)."""
        self._check(state)
        for key in ("sums", "count"):
            self._state[key] += state[key].to(self._state[key].device).double()

    def compute(self) -> dict[str, float]:
        """Mean of each metric over the images seen, plus ``count``."""
        count = float(self._state["count"])
        if count == 0:
            raise ValueError("no images were added to the depth metric")
        means = (self._state["sums"] / count).tolist()
        return {**dict(zip(DEPTH_METRICS, means, strict=True)), "count": int(count)}

    def _check(self, state: dict[str, torch.Tensor]) -> None:
        if "sums" not in state or "count" not in state or state["sums"].shape != (len(DEPTH_METRICS),):
            raise ValueError(f"state must hold 'sums' of shape ({len(DEPTH_METRICS)},) and 'count'")
