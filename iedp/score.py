"""``iedp score seg|depth``: score saved predictions against ground-truth files, matched by file stem.

Segmentation predictions and labels are 8-bit PNG label maps in the dataset's own convention
(ADE20K: 1..150 with 0 = other, read with reduce-zero-label). Depth predictions are uint16
millimetre PNGs or ``.npy`` arrays in metres; ground truth is uint16 millimetre PNGs, in a folder or, with
``--list``, where an NYUv2 list file names them under the NYUv2 root (each matched to the prediction named
as ``iedp evaluate --save-predictions`` names it: "bathroom_rgb_00045"). The metrics are those of
:mod:`iedp.metrics` (DESIGN §3).
"""

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from iedp.data.build import locate
from iedp.data.images import check_same_size, read_depth_png, read_label
from iedp.data.nyu import LIST_FOLDERS, read_list_file, sample_name
from iedp.errors import InputError
from iedp.metrics.depth import DEPTH_METRICS, EIGEN_CROP_SIZE, DepthMetric
from iedp.metrics.segmentation import SegmentationMetric
from iedp.outputs import check_output_file, json_text
from iedp.resources import read_names

ADE20K_CLASSES = 150  # the default --num-classes
_PREVIEW = 5
SHOWN = 5  # classes printed at each end of the table without --all


def run(args: argparse.Namespace) -> int:
    """Score, print a table and the summary, optionally write JSON; 0 on success."""
    list_file = getattr(args, "list", None)
    if args.task == "seg" and list_file:
        raise InputError("--list: only for depth (an NYUv2 list file); seg matches --gt's files by name")
    if args.task == "seg" and not 1 <= args.num_classes <= 255:
        raise InputError(f"--num-classes: {args.num_classes} must be in 1..255 (8-bit label maps)")
    if args.json is not None:
        check_output_file(args.json, "--json")  # before scoring: a folder, read-only or /proc fails at once
    if args.task == "seg":
        pairs = _match(
            _list(args.pred, (".png",), "prediction"), _list(args.gt, (".png",), "ground-truth"), args
        )
        metrics = _score_seg(pairs, args.num_classes, args.reduce_zero_label)
        _print_seg(metrics, len(pairs), show_all=getattr(args, "all", False))
    else:
        gts = _listed(list_file, args.gt) if list_file else _list(args.gt, (".png",), "ground-truth")
        pairs = _match(_list(args.pred, (".png", ".npy"), "prediction"), gts, args)
        metrics = _score_depth(pairs, args.crop)
        _print_depth(metrics)
    if args.json is not None:
        report = {"task": args.task, "pred": str(args.pred), "gt": str(args.gt), "num_images": len(pairs)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json_text({**report, "metrics": metrics}) + "\n")
        print(f"wrote {args.json}")
    return 0


def _list(folder: Path, suffixes: tuple[str, ...], role: str) -> dict[str, Path]:
    """Files of ``folder`` with one of ``suffixes``, keyed by stem; a stem may appear only once."""
    if not folder.is_dir():
        raise InputError(f"{folder}: {role} folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in files:
                raise InputError(
                    f"{folder}: two {role} files for {path.stem!r}: {files[path.stem].name}, {path.name}"
                )
            files[path.stem] = path
    if not files:
        raise InputError(f"{folder}: no {role} files ({' or '.join(suffixes)})")
    return files


def _listed(list_file: Path, root: Path) -> dict[str, Path]:
    """The depth files an NYUv2 list file (in the working folder or ``root``, as ``data.test_list``) names under
    ``root``, keyed by sample name."""
    if not root.is_dir():
        raise InputError(f"{root}: --gt with --list is the NYUv2 root, and this folder was not found")
    entries = read_list_file(locate(str(list_file), root), root, LIST_FOLDERS["test"])
    return {sample_name(e.rgb): e.depth for e in entries}


def _preview(names: list[str]) -> str:
    shown = ", ".join(names[:_PREVIEW])
    return shown + (f", ... ({len(names) - _PREVIEW} more)" if len(names) > _PREVIEW else "")


def _match(preds: dict[str, Path], gts: dict[str, Path], args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """(prediction, ground truth) pairs; every file must have its partner."""
    missing = sorted(set(gts) - set(preds))
    extra = sorted(set(preds) - set(gts))
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} ground-truth file(s) in {args.gt} have no prediction: {_preview(missing)}"
        )
    if extra:
        problems.append(f"{len(extra)} prediction(s) in {args.pred} have no ground truth: {_preview(extra)}")
    if problems:
        raise InputError("; ".join(problems))
    return [(preds[stem], gts[stem]) for stem in sorted(gts)]


def _score_seg(pairs: list[tuple[Path, Path]], num_classes: int, reduce_zero_label: bool) -> dict:
    names = read_names("ade20k_classes.txt") if num_classes == ADE20K_CLASSES else None
    metric = SegmentationMetric(num_classes, names)
    for pred_path, gt_path in pairs:
        gt = read_label(gt_path, num_classes, reduce_zero_label)
        pred = read_label(pred_path, num_classes, reduce_zero_label)
        check_same_size(gt, gt_path, pred, pred_path)
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    return metric.compute()


def _read_depth_prediction(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".png":
        return read_depth_png(path)
    try:
        depth = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read .npy depth ({err})") from err
    depth = depth[0] if depth.ndim == 3 and depth.shape[0] == 1 else depth
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
        raise InputError(f"{path}: expected an H×W array of metres, got {depth.dtype} of shape {depth.shape}")
    bad = int((~np.isfinite(depth)).sum())
    if bad:
        raise InputError(f"{path}: {bad} NaN or infinite depth values (a prediction must be finite metres)")
    negative = int((depth < 0).sum())
    if negative:
        raise InputError(
            f"{path}: {negative} negative depth values (min {depth.min():g}); depth is metres >= 0"
        )
    return depth.astype(np.float32)


def _score_depth(pairs: list[tuple[Path, Path]], crop: str) -> dict:
    metric = DepthMetric(crop=crop)
    for pred_path, gt_path in pairs:
        gt = read_depth_png(gt_path)
        pred = _read_depth_prediction(pred_path)
        check_same_size(gt, gt_path, pred, pred_path)
        if crop == "eigen" and gt.shape != EIGEN_CROP_SIZE:
            raise InputError(
                f"{gt_path}: {gt.shape[0]}x{gt.shape[1]}, but --crop eigen is for 480x640 NYUv2 maps; "
                "use --crop none (or garg for KITTI)"
            )
        try:
            metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
        except ValueError as err:
            raise InputError(f"{gt_path}: {err}") from err
    return metric.compute()


def _fmt(value: float) -> str:
    return "    -" if math.isnan(value) else f"{value:6.2f}"


def _print_seg(metrics: dict, num_images: int, show_all: bool = False) -> None:
    """The per-class table: every class with ``show_all``, else the best and worst SHOWN by IoU."""
    width = max(len(name) for name in metrics["IoU"])
    rows = list(metrics["IoU"].items())
    if not show_all and len(rows) > 2 * SHOWN:
        scored = sorted((r for r in rows if not math.isnan(r[1])), key=lambda r: -r[1])
        unscored = len(rows) - len(scored)
        if len(scored) > 2 * SHOWN:
            hidden = len(scored) - 2 * SHOWN
            rows = [*scored[:SHOWN], (f"... {hidden} more (--all)", math.nan), *scored[-SHOWN:]]
        else:
            rows = scored
        if unscored:
            rows.append((f"({unscored} classes absent)", math.nan))
    print(f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}")
    for name, iou in rows:
        print(f"{name:<{width}}  {_fmt(iou)}  {_fmt(metrics['Acc'].get(name, math.nan))}")
    print(
        f"\n{num_images} images: aAcc {_fmt(metrics['aAcc']).strip()}  mIoU {_fmt(metrics['mIoU']).strip()}  "
        f"mAcc {_fmt(metrics['mAcc']).strip()}"
    )


def _print_depth(metrics: dict) -> None:
    print("  ".join(f"{key:>8}" for key in DEPTH_METRICS))
    print("  ".join(f"{metrics[key]:8.4f}" for key in DEPTH_METRICS))
    print(
        f"\n{metrics['count']} images: d1 {metrics['d1']:.4f}  abs_rel {metrics['abs_rel']:.4f}  rmse {metrics['rmse']:.4f}"
    )
