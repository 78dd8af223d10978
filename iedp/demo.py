"""``iedp demo``: the project's main job on its embedded default, on a CPU.

Tiny SD + CLIP preset, synthetic indoor scenes; ``iedp`` and ``vpd`` trained for segmentation and depth on the
same budget, evaluated with the real protocols next to the trivial baselines (majority class, mean depth), and a
report with metrics and pictures: ``{out}/report.md``.

The four runs are independent, so they run in parallel worker processes, one per CPU core (at most four), each
with one intra-op thread: the tiny models' operations are too small to gain from threads, and threads that wait
for each other stall whenever another job holds a core.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import platform
import signal
import time
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from iedp.config import Config, load_config
from iedp.engine.data import build_dataset
from iedp.engine.inference import predict_sample
from iedp.engine.latents import prepare_latents
from iedp.engine.train import train
from iedp.errors import Interrupted
from iedp.metrics.depth import DepthMetric
from iedp.metrics.segmentation import SegmentationMetric
from iedp.model_files import load_model
from iedp.models.iedp import IEDPModel
from iedp.outputs import json_text
from iedp.visualize import (
    beside,
    classes_by_area,
    colorize_depth,
    colorize_labels,
    heatmap,
    legend,
    palette,
    panel,
    vstack,
)
from iedp.weights import resolve_weights
from iedp.workers import one_thread_per_worker, start_worker, usable_cores

logger = logging.getLogger(__name__)

METHODS = ("iedp", "vpd")
TASKS = ("seg", "depth")
NUM_PICTURES = 4


@dataclass(frozen=True)
class RunResult:
    task: str
    method: str
    metrics: dict
    train_seconds: float
    checkpoint: Path


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((image.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).round().astype(np.uint8)


def trivial_baseline(config: Config) -> dict:
    """Majority class (segmentation) or mean depth (depth), learnt from the training set, scored like a model."""
    train_set, val_set = build_dataset(config, "train"), build_dataset(config, "val")
    count = min(len(train_set), 200)
    if config.model.task == "seg":
        names = train_set.class_names
        votes = torch.zeros(len(names), dtype=torch.long)
        for i in range(count):
            label = train_set[i]["label"]
            votes += torch.bincount(label[label != 255].flatten(), minlength=len(names))
        majority = int(votes.argmax())
        metric = SegmentationMetric(len(names), names)
        for i in range(len(val_set)):
            label = val_set[i]["label"]
            metric.update(torch.full_like(label, majority), label)
        return {**metric.compute(), "baseline": f"majority class ({names[majority]})"}
    depths = torch.cat([train_set[i]["depth"][train_set[i]["depth"] > 0] for i in range(count)])
    mean = float(depths.mean())
    metric = DepthMetric(crop=config.eval.depth_crop, max_depth=config.model.max_depth)
    for i in range(len(val_set)):
        gt = val_set[i]["depth"][0]
        metric.update(torch.full_like(gt, mean), gt)
    return {**metric.compute(), "baseline": f"mean depth ({mean:.2f} m)"}


def demo_config(task: str, method: str, out: Path, weights: str | None, steps: int | None) -> Config:
    sets = [f"model.method={method}", f"train.out={out / f'{task}_{method}'}"]
    if weights is not None:
        sets.append(f"model.weights={weights}")
    if steps is not None:
        sets += [f"train.max_steps={steps}", f"train.checkpoint_every={steps}", f"train.eval_every={steps}"]
    return load_config(f"demo_{task}", sets)


_STOPPED: multiprocessing.synchronize.Event | None = None
"""In a demo worker: set by the parent once it is told to stop, so the worker starts no further run."""


def _single_thread_worker(level: int, stopped: multiprocessing.synchronize.Event | None = None) -> None:
    """Initialiser of a demo worker process: one intra-op thread, the parent's log level, and SIGTERM left to the
    training loop (outside a run the parent's ``stopped`` event says what to do, so a worker between two runs or
    still building its model does not die and break the pool)."""
    global _STOPPED
    _STOPPED = stopped
    start_worker(level)
    if stopped is not None:
        signal.signal(signal.SIGTERM, lambda *_: None)


def run_one(task: str, method: str, out: Path, weights: str | None, steps: int | None) -> RunResult:
    if _STOPPED is not None and _STOPPED.is_set():
        raise Interrupted(signal.SIGTERM, f"demo stopped by SIGTERM before the {task} {method} run started")
    config = demo_config(task, method, out, weights, steps)
    tic = time.perf_counter()
    checkpoint = train(config)
    seconds = time.perf_counter() - tic
    metrics = json.loads((Path(config.train.out) / "metrics.json").read_text())
    return RunResult(task, method, metrics, seconds, checkpoint)


@torch.no_grad()
def prediction_pictures(task: str, models: dict[str, IEDPModel], config: Config, out: Path) -> Path:
    """Input | ground truth | one column per method, for a few validation scenes."""
    val_set = build_dataset(config, "val")
    device = torch.device("cpu")
    rows = []
    for index in range(NUM_PICTURES):
        sample = val_set[index]
        predictions = {
            method: predict_sample(model, sample, config, device).numpy() for method, model in models.items()
        }
        if task == "seg":
            rows.append(seg_row(sample, predictions, val_set.class_names))
        else:
            rows.append(depth_row(sample, predictions))
    path = out / f"{task}_predictions.png"
    vstack(rows).save(path)
    return path


def seg_row(sample: dict, predictions: dict[str, np.ndarray], class_names: list[str]) -> Image.Image:
    """One scene's input, ground truth and predicted label maps, with a legend of every class drawn in them
    (largest total area first)."""
    colors = palette(len(class_names))
    maps = [sample["label"].numpy(), *predictions.values()]
    pictures = [colorize_labels(maps[0], colors)]
    pictures += [colorize_labels(labels, colors, ignore_index=None) for labels in maps[1:]]
    row = panel([_to_uint8(sample["image"]), *pictures], ["input", "ground truth", *predictions])
    present = [k for k, _ in classes_by_area(np.concatenate([labels.ravel() for labels in maps]))]
    return beside(row, legend([class_names[k] for k in present], colors[present]))


def depth_row(sample: dict, predictions: dict[str, np.ndarray]) -> Image.Image:
    """One scene's input, ground truth and predicted depth, all on the ground truth's range (0 m red to its
    farthest point blue, named in the title; farther predictions are drawn at the far end)."""
    gt = sample["depth"][0].numpy()
    vmax = float(gt.max())
    depths = [gt, *predictions.values()]
    return panel(
        [_to_uint8(sample["image"]), *(colorize_depth(depth, 0.0, vmax) for depth in depths)],
        ["input", f"ground truth 0-{vmax:.1f} m", *predictions],
    )


@torch.no_grad()
def attention_pictures(model: IEDPModel, config: Config, out: Path) -> Path:
    """For a few scenes: the class cross-attention maps (stride 16, averaged over heads and layers) of the classes
    present, then where the implicit queries look among CLIP's image patches (all queries averaged, and the two
    queries with the most peaked attention)."""
    val_set = build_dataset(config, "val")
    C = model.num_classes
    rows = []
    for index in range(2):
        sample = val_set[index]
        image = sample["image"][None]
        tokens = model.guidance_tokens("implicit", image, {})
        output = model.backbone(model.backbone.encode(image), model.context(tokens, 1))
        maps = output.class_attention[16][0]  # (C, H/16, W/16)
        present = torch.bincount(sample["label"][sample["label"] != 255].flatten(), minlength=C).argsort(
            descending=True
        )
        classes = [int(c) for c in present[:4]]
        size = image.shape[-2:]
        images = [_to_uint8(sample["image"])]
        titles = ["input", *(model.class_names[c] for c in classes)]
        for c in classes:
            upsampled = torch.nn.functional.interpolate(maps[c][None, None], size=size, mode="bilinear")[0, 0]
            images.append(heatmap(upsampled.numpy()))
        if model.implicit_queries is not None:
            queries = model.implicit_attention(image)[0]  # (N, g, g)
            peaked = queries.flatten(1).amax(dim=1).argsort(descending=True)[:2].tolist()
            for grid, title in [(queries.mean(0), "queries (mean)")] + [
                (queries[q], f"query {q}") for q in peaked
            ]:
                upsampled = torch.nn.functional.interpolate(grid[None, None], size=size, mode="bilinear")[
                    0, 0
                ]
                images.append(heatmap(upsampled.numpy()))
                titles.append(title)
        rows.append(panel(images, titles))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "attention_maps.png"
    vstack(rows).save(path)
    return path


def _table(task: str, results: list[RunResult], baseline: dict) -> str:
    if task == "seg":
        keys, better = ("mIoU", "mAcc", "aAcc"), "higher is better; in percent"
    else:
        keys, better = ("rmse", "abs_rel", "d1", "silog"), "rmse/abs_rel/silog lower, d1 higher is better"
    lines = [f"| method | {' | '.join(keys)} | train time |", f"|---|{'---|' * len(keys)}---|"]
    for r in results:
        lines.append(
            f"| {r.method} | {' | '.join(f'{r.metrics[k]:.3f}' for k in keys)} | {r.train_seconds:.0f} s |"
        )
    lines.append(f"| {baseline['baseline']} | {' | '.join(f'{baseline[k]:.3f}' for k in keys)} | – |")
    return "\n".join(lines) + f"\n\n({better})\n"


def demo_workers() -> int:
    """Worker processes of the demo: one per CPU core this process may use, at most one per run."""
    return max(1, min(usable_cores(), len(TASKS) * len(METHODS)))


def _expected_cost(run: tuple[str, str], steps: int) -> float:
    """Relative CPU time of a demo run of ``steps`` steps: seconds per step on one core, evaluation included, from
    the recipe's runs of 2026-11-29 (AVX-512 EPYC, the tiny world, cached latents, two runs side by side)."""
    per_step = {("depth", "iedp"): 0.33, ("depth", "vpd"): 0.18, ("seg", "iedp"): 0.25, ("seg", "vpd"): 0.14}
    return per_step.get(run, 1.0) * steps


def _run_all(
    out: Path, weights: str | None, steps: int | None, workers: int
) -> dict[tuple[str, str], RunResult]:
    """Every (task, method) run, in ``workers`` spawned processes of one thread each (in this process if 1)."""
    # Longest first (iedp runs the UNet and head on both branches; depth's head is costlier), so the workers
    # finish close together.
    budget = {task: demo_config(task, "iedp", out, weights, steps).train.max_steps for task in TASKS}
    runs = sorted(
        ((task, method) for task in TASKS for method in METHODS),
        key=lambda run: _expected_cost(run, budget[run[0]]),
        reverse=True,
    )
    if workers == 1:
        return {run: run_one(*run, out, weights, steps) for run in runs}
    with one_thread_per_worker():
        return _run_in_pool(runs, out, weights, steps, workers)


def _run_in_pool(
    runs: list[tuple[str, str]], out: Path, weights: str | None, steps: int | None, workers: int
) -> dict[tuple[str, str], RunResult]:
    """``runs`` in ``workers`` spawned processes; a SIGTERM to this process stops them all."""
    context = multiprocessing.get_context("spawn")
    stopped = context.Event()
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_single_thread_worker,
        initargs=(logging.getLogger().getEffectiveLevel(), stopped),
    )

    def stop_workers(signum: int, _frame: object = None) -> None:
        # A SIGTERM sent to this process alone (a scheduler, `kill PID`) reaches the workers too, so each saves a
        # checkpoint and stops; Ctrl-C already reaches the whole process group.
        stopped.set()
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    previous_handler = signal.signal(signal.SIGTERM, stop_workers)
    futures = {run: pool.submit(run_one, *run, out, weights, steps) for run in runs}
    try:
        return {run: future.result() for run, future in futures.items()}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # after a failed or stopped run, start no other
        # a run that was building its model when the signal came has no handler yet: tell it again until done
        while stopped.is_set() and not all(future.done() for future in futures.values()):
            stop_workers(signal.SIGTERM)
            wait(futures.values(), timeout=1.0)
        pool.shutdown(wait=True)
        signal.signal(signal.SIGTERM, previous_handler)


def run_demo(out: str | Path = "demo_out", steps: int | None = None, weights: str | None = None) -> Path:
    """Train, evaluate and report; returns the report's path. ``weights`` overrides the recipes' ``tiny-pretrained``
    (e.g. ``tiny`` for random tiny weights)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Build (or find in the cache) the weights first, so pre-training is not counted as a method's training time.
    config = demo_config("seg", "iedp", out, weights, steps)
    resolve_weights(config.model.weights, config.model.sd, config.model.clip)
    prepare_latents(config)  # all four runs train on these scenes' images
    prepare_minutes = (time.perf_counter() - start) / 60
    workers = demo_workers()
    results_by_run = _run_all(out, weights, steps, workers)
    sections = []
    for task in TASKS:
        results = [results_by_run[task, method] for method in METHODS]
        config = demo_config(task, "iedp", out, weights, steps)
        baseline = trivial_baseline(config)
        models = {r.method: load_model(r.checkpoint)[0] for r in results}
        pictures = prediction_pictures(task, models, config, out)
        section = [
            f"## {'Segmentation' if task == 'seg' else 'Depth'}\n",
            _table(task, results, baseline),
            f"![{task} predictions]({pictures.name})\n",
        ]
        if task == "seg" and models["iedp"].config.attention_maps:
            section.append(
                "Cross-attention maps of the iedp model: each class's map in the UNet, then where the implicit "
                "branch's learnable queries look among CLIP's image patches:\n\n"
                f"![attention]({attention_pictures(models['iedp'], config, out).name})\n"
            )
        sections.append("\n".join(section))
        (out / f"{task}_results.json").write_text(
            json_text(
                {
                    "runs": [
                        {"method": r.method, "metrics": r.metrics, "train_seconds": r.train_seconds}
                        for r in results
                    ],
                    "baseline": baseline,
                },
                default=str,
            )
        )
    minutes = (time.perf_counter() - start) / 60
    config = demo_config("seg", "iedp", out, weights, steps)
    budgets = [demo_config(task, "iedp", out, weights, steps).train for task in TASKS]
    header = (
        "# IEDP demo report\n\n"
        f"Tiny preset (`model.weights={config.model.weights}`) on synthetic indoor scenes ({config.data.resolution}×"
        f"{config.data.resolution}, {config.data.num_train} training / {config.data.num_val} validation scenes), "
        + ", ".join(
            f"{t.max_steps} steps of batch {t.batch_size} for {task}"
            for task, t in zip(TASKS, budgets, strict=True)
        )
        + ", the same budget for every method. Inference of `iedp` uses only the implicit (image) branch; `vpd` "
        "uses the class tokens (segmentation) or the ground-truth scene token (depth).\n\n"
        f"Took {minutes:.1f} minutes on {platform.processor() or platform.machine()} "
        f"({workers} worker processes of one thread each, {os.cpu_count()} CPU cores), "
        f"{time.strftime('%Y-%m-%d %H:%M')}, of which {prepare_minutes:.1f} preparing the weights and rendering and "
        "encoding the training scenes (the shipped pre-trained tiny world loads in seconds).\n\n"
    )
    report = out / "report.md"
    report.write_text(header + "\n".join(sections))
    logger.info("report: %s (%.1f minutes)", report, minutes)
    return report
