"""``iedp data check``: what a run of a config would read, and every problem with it, without training.

For each split: the number of samples; for segmentation how many samples each class appears in and its share of
labelled pixels; for depth the range of valid depths, the share of valid pixels and the scenes; the sizes of the
maps as loaded; and every problem: the dataset's own validation (all problems of a folder at once) plus each file
that fails to load. Samples are read without augmentation, as evaluation reads them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from iedp.classes import load_class_names
from iedp.config import Config
from iedp.data.folders import DataProblems
from iedp.data.images import IGNORE_INDEX
from iedp.errors import InputError
from iedp.metrics.depth import EIGEN_CROP_SIZE


@dataclass
class SplitReport:
    """What one split holds; filled by :func:`check_split`."""

    split: str
    built: bool = False  # False: the dataset refused the split (its problems say why), so nothing was counted
    count: int = 0
    checked: int = 0
    sizes: Counter = field(default_factory=Counter)
    class_samples: np.ndarray | None = None  # seg: samples containing each class
    class_pixels: np.ndarray | None = None  # seg: labelled pixels of each class
    depth_min: float = float("inf")
    depth_max: float = 0.0
    valid_pixels: int = 0
    total_pixels: int = 0
    above_max: int = 0  # depth pixels beyond model.max_depth
    scenes: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


def check_split(config: Config, split: str, limit: int | None = None, progress: bool = False) -> SplitReport:
    """Build the ``split`` dataset of ``config`` and read (at most ``limit`` of) its samples."""
    from iedp.engine.data import build_dataset

    report = SplitReport(split)
    try:
        dataset = build_dataset(config, split, augment=False)
    except DataProblems as err:
        report.problems += err.problems
        return report
    except InputError as err:
        report.problems.append(str(err))
        return report
    report.built, report.count = True, len(dataset)
    task = config.model.task
    if task == "seg":
        num_classes = len(getattr(dataset, "class_names", None) or load_class_names(config.model.classes))
        report.class_samples = np.zeros(num_classes, np.int64)
        report.class_pixels = np.zeros(num_classes, np.int64)
    count = report.count if limit is None else min(report.count, limit)
    for index in tqdm(range(count), desc=f"check {split}", disable=not progress, leave=False):
        try:
            sample = dataset[index]
        except InputError as err:
            report.problems.append(str(err))
            continue
        report.checked += 1
        if task == "seg":
            _add_label(report, sample["label"].numpy())
        else:
            _add_depth(report, sample["depth"][0].numpy(), config.model.max_depth)
            report.scenes[sample.get("scene") or "(none)"] += 1
    if task == "depth" and config.eval.depth_crop == "eigen":
        other = sorted({f"{h}x{w}" for h, w in report.sizes if (h, w) != EIGEN_CROP_SIZE})
        if other:
            report.problems.append(
                f"maps of {', '.join(other[:5])}: eval.depth_crop=eigen is defined on NYUv2's 480x640 frames only; "
                "set eval.depth_crop=none (or garg for KITTI)"
            )
    if report.above_max:
        # only custom depth folders have a depth_scale; NYUv2 is millimetres and KITTI 1/256 m by definition
        scale = " or check data.depth_scale" if config.data.dataset == "custom_depth" else ""
        report.problems.append(
            f"{report.above_max} depth pixels lie beyond model.max_depth={config.model.max_depth} m: the head cannot "
            f"predict them and evaluation ignores them; raise model.max_depth{scale}"
        )
    return report


def _add_label(report: SplitReport, label: np.ndarray) -> None:
    report.sizes[label.shape[-2:]] += 1
    labelled = label[label != IGNORE_INDEX].astype(np.int64)
    counts = np.bincount(labelled, minlength=len(report.class_pixels))[: len(report.class_pixels)]
    report.class_pixels += counts
    report.class_samples += counts > 0


def _add_depth(report: SplitReport, depth: np.ndarray, max_depth: float) -> None:
    report.sizes[depth.shape[-2:]] += 1
    valid = depth[depth > 0]
    report.total_pixels += depth.size
    report.valid_pixels += valid.size
    if valid.size:
        report.depth_min = min(report.depth_min, float(valid.min()))
        report.depth_max = max(report.depth_max, float(valid.max()))
        report.above_max += int((valid >= max_depth).sum())


def format_report(config: Config, reports: list[SplitReport], class_names: list[str]) -> str:
    """The printed report: one block per split, then every problem."""
    data = config.data
    lines = [f"data.dataset={data.dataset} root={data.root} task={config.model.task}"]
    for r in reports:
        if not r.built:
            lines.append(f"\n[{r.split}] not read: the problems below stop the whole split from loading")
            continue
        checked = "" if r.checked == r.count else f" ({r.checked} read)"
        lines.append(f"\n[{r.split}] {r.count} samples{checked}")
        if r.sizes:
            sizes = ", ".join(f"{h}x{w} ×{n}" for (h, w), n in r.sizes.most_common(5))
            more = f" and {len(r.sizes) - 5} more sizes" if len(r.sizes) > 5 else ""
            lines.append(f"  sizes (HxW as loaded for evaluation): {sizes}{more}")
        if r.class_samples is not None and r.checked:
            total = max(int(r.class_pixels.sum()), 1)
            lines.append(f"  classes: {int((r.class_samples > 0).sum())} of {len(r.class_samples)} appear")
            width = max((len(n) for n in class_names), default=5)
            for index, name in enumerate(class_names[: len(r.class_samples)]):
                samples, share = int(r.class_samples[index]), r.class_pixels[index] / total
                flag = "" if samples else "  (never)"
                lines.append(
                    f"    {index:>3} {name:<{width}} in {samples:>6} samples, {share:7.2%} of labelled pixels{flag}"
                )
        if r.total_pixels:
            lines.append(
                f"  depth: {r.depth_min:.3f} .. {r.depth_max:.3f} m over valid pixels, "
                f"{r.valid_pixels / r.total_pixels:.1%} of pixels valid (model.max_depth={config.model.max_depth})"
            )
            lines.append("  scenes: " + ", ".join(f"{s} ×{n}" for s, n in r.scenes.most_common()))
    problems = [f"[{r.split}] {p}" for r in reports for p in r.problems]
    lines.append(f"\n{len(problems)} problem{'s' if len(problems) != 1 else ''}" + (":" if problems else ""))
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def check_data(config: Config, limit: int | None = None, progress: bool = True) -> tuple[str, int]:
    """The report of both splits and the number of problems found."""
    reports = [check_split(config, split, limit, progress) for split in ("train", "val")]
    try:
        names = load_class_names(config.model.classes)
    except InputError:
        names = []
    return format_report(config, reports, names), sum(len(r.problems) for r in reports)
