"""GPU check of the real-size IEDP segmentation model in bf16: throughput, peak memory, projected ADE20K run time.

Measured on one GPU, in one process, with the model of :mod:`bench.speed_models` (SD v1.5 UNet/VAE + CLIP
ViT-L/14 with random weights, ADE20K's 150 classes, ``iedp`` method, our attention):

- first, issue 15's comparison: whole inference at 512×512, batch 16, ``ours-default`` (what ``iedp predict`` runs
  by default: our attention, bf16 autocast, the weights held in bf16) vs ``vpd-config`` (VPD's
  configuration: fp32, classic attention everywhere, VPD-style capture, no compile), alternating call by call
  (:func:`bench.timing.measure_variants`); the peak memory of each is that of one more call after a reset;
- inference (the implicit branch, as at test time) at 512×512, batch 1 and 16, in images/s; at batch 16 also
  the VPD-style attention baseline, for the speed ratio on GPU;
- one training step (both branches in one 2B UNet call, backward, AdamW) at batch 16, 8 and 2 (8 and 2
  also with gradient checkpointing); at batch 2 also the baseline; last, at batch 16 with the UNet pass compiled
  (``model.compile_unet``, the compile in the warm-up calls);
- peak memory of each (``torch.cuda.max_memory_allocated`` after a reset; the weights are included);
- the projected wall time of the ADE20K recipe (80k iterations at total batch 16, the paper's 8 GPUs × batch 2)
  for each measured per-GPU batch b (16 / b GPUs): 80000 × the batch-b step time, assuming linear DDP scaling
  (each GPU runs its step at the single-GPU speed; gradient all-reduce, data loading and evaluation are not
  counted), as wall-clock hours and as GPU-hours (× 16 / b).

Each measurement is the median of ``--repeats`` calls after ``--warmup`` calls, with ``torch.cuda.synchronize``
around each; cuDNN autotuning is on (fixed shapes). A CUDA out-of-memory error is recorded for its
configuration, not raised. Measurements stop when ``--budget-s`` is spent (the rest are recorded as skipped).
``bf16`` is the training recipe's: frozen parts cast to bf16, the rest under ``torch.autocast`` (after the
defaults comparison, which needs the fp32 weights).
JSON goes to ``OUT_DIR/gpu_check.json`` (rewritten after each measurement) and a markdown table is printed.
``--tiny`` runs the same code on the tiny preset at 64×64 (a dry run that fits a CPU, in fp32 there).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

from bench.speed_models import AttentionVariants, build_parts, build_seg_model, make_batch, prepare
from bench.tables import BENCHMARKS, append_rows, machine_label
from bench.timing import PeakMemory, machine, measure_variants, stage_call, synchronize, time_calls
from iedp.models.iedp import IEDPModel

logger = logging.getLogger(__name__)

RECIPE_ITERATIONS = 80_000  # ADE20K: 80k iterations
RECIPE_TOTAL_BATCH = 16  # the paper's 8 GPUs × batch 2; fewer GPUs with larger batches give the same total
DEFAULTS = ("ours-default", "vpd-config")  # issue 15: our defaults vs VPD's configuration
DEFAULTS_BATCH = 16
SECTION = "GPU check: bf16 throughput and ADE20K projection (bench/gpu_check.sh)"
HEADER = "| date | machine | stage | variant | batch | grad ckpt | median s (n) | img/s | peak GiB | note |"


@dataclass(frozen=True)
class Check:
    """One measurement: a stage of the segmentation model at a batch size."""

    stage: str  # inference | train
    batch_size: int
    gradient_checkpointing: bool = False
    variant: str = "ours"


COMPILED = (
    "ours-compiled"  # ours with the UNet pass under torch.compile (model.compile_unet); it stays compiled
)

# in order of what the projection needs most: one GPU with the recipe's whole batch first; the compiled UNet last,
# since it stays compiled and its first calls compile the forward and backward passes (minutes)
CHECKS = (
    Check("inference", 1),
    Check("inference", 16),
    Check("train", 16),
    Check("train", 8),
    Check("train", 2),
    Check("train", 8, gradient_checkpointing=True),
    Check("train", 2, gradient_checkpointing=True),
    Check("inference", 16, variant="baseline"),
    Check("train", 2, variant="baseline"),
    Check("train", 16, variant=COMPILED),
)


def run_check(
    model: IEDPModel,
    variants: AttentionVariants,
    check: Check,
    size: int,
    device: torch.device,
    args: argparse.Namespace,
) -> dict:
    """Time one check; out-of-memory is recorded instead of raised."""
    record = {**asdict(check), "size": size}
    if check.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    else:
        model.unet.disable_gradient_checkpointing()
    if check.variant == COMPILED:
        model.backbone.compile_unet(backend="eager" if args.tiny else "inductor")  # eager: a CPU dry run
    variants.use("ours" if check.variant == COMPILED else check.variant)
    batch = make_batch(check.batch_size, size, model.num_classes, device, args.seed)
    memory = PeakMemory(device)
    try:
        memory.start()
        fn = stage_call(model, check.stage, batch, args.dtype, channels_last=False)
        times, _ = time_calls(fn, device, args.warmup, args.repeats)
        median = statistics.median(times)
        record |= {"times_s": times, "median_s": median, "images_per_s": check.batch_size / median}
        record["memory"] = memory.report()
    except torch.OutOfMemoryError as error:
        logger.warning("%s: out of memory", check)
        record["error"] = f"CUDA out of memory: {str(error).splitlines()[0]}"
    finally:
        model.zero_grad(set_to_none=True)
        variants.use("ours")
        del batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def run_defaults(
    model: IEDPModel, variants: AttentionVariants, size: int, device: torch.device, args: argparse.Namespace
) -> list[dict]:
    """Whole inference at batch 16 in each of :data:`DEFAULTS`, alternating call by call, on the fp32 weights;
    then each one's peak memory (weights included) over one call after a reset. Out-of-memory is recorded."""
    base = {"stage": "inference", "batch_size": DEFAULTS_BATCH, "gradient_checkpointing": False, "size": size}
    batch = make_batch(DEFAULTS_BATCH, size, model.num_classes, device, args.seed)
    try:
        measured, _ = measure_variants(
            model, variants, list(DEFAULTS), "inference", batch, "fp32", False, args.warmup, args.repeats
        )
        for name in DEFAULTS:
            variants.use(name)
            fn = stage_call(model, "inference", batch, measured[name]["dtype"], channels_last=False)
            memory = PeakMemory(device)
            memory.start()
            fn()
            synchronize(device)
            measured[name]["memory"] = memory.report()
        return [{**base, "variant": name, **measured[name]} for name in DEFAULTS]
    except torch.OutOfMemoryError as error:
        logger.warning("defaults comparison: out of memory")
        message = f"CUDA out of memory: {str(error).splitlines()[0]}"
        return [{**base, "variant": name, "error": message} for name in DEFAULTS]
    finally:
        variants.use("ours")
        del batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def defaults_comparison(records: list[dict]) -> dict | None:
    """vpd-config's time and peak memory over ours-default's (batch 16), when both were measured."""
    ours, vpd = (
        next((r for r in records if r["variant"] == name and "median_s" in r), None) for name in DEFAULTS
    )
    if ours is None or vpd is None:
        return None
    return {
        "speedup": vpd["median_s"] / ours["median_s"],
        "speedup_paired_median": statistics.median(
            v / o for o, v in zip(ours["times_s"], vpd["times_s"], strict=True)
        ),
        "memory_ratio": ours["memory"]["peak_bytes"] / vpd["memory"]["peak_bytes"],
        "dtypes": {"ours-default": ours["dtype"], "vpd-config": vpd["dtype"]},
    }


def projection(records: list[dict]) -> dict | None:
    """ADE20K 80k iterations at the recipe's total batch, for each measured per-GPU batch ``b`` that divides it
    (``total / b`` GPUs), from our model's training steps; the layout of fewest GPU-hours first."""
    layouts = []
    for r in records:
        if r["stage"] != "train" or r["variant"] not in ("ours", COMPILED) or "median_s" not in r:
            continue
        if RECIPE_TOTAL_BATCH % r["batch_size"]:
            continue
        gpus = RECIPE_TOTAL_BATCH // r["batch_size"]
        wall_h = RECIPE_ITERATIONS * r["median_s"] / 3600
        layouts.append(
            {
                "batch_per_gpu": r["batch_size"],
                "variant": r["variant"],
                "gpus": gpus,
                "step_s": r["median_s"],
                "gradient_checkpointing": r["gradient_checkpointing"],
                "peak_gib": r["memory"]["peak_bytes"] / 2**30,
                "wall_clock_hours": wall_h,
                "gpu_hours": wall_h * gpus,
            }
        )
    if not layouts:
        return None
    layouts.sort(key=lambda layout: layout["gpu_hours"])
    return {
        **layouts[0],
        "layouts": layouts,
        "assumption": "linear DDP scaling: each GPU runs its per-GPU batch at the single-GPU step time; "
        "all-reduce, data loading and evaluation not counted",
    }


def goals(records: list[dict], projected: dict | None, defaults: dict | None = None) -> dict:
    batch16 = next(
        (
            r
            for r in records
            if r["stage"] == "inference"
            and r["variant"] == "ours"
            and r["batch_size"] == 16
            and "median_s" in r
        ),
        None,
    )
    report = {}
    if batch16:
        value = batch16["images_per_s"]
        report["inference_images_per_s_batch16>=200"] = {"value": value, "met": value >= 200}
    if projected:
        value = projected["gpu_hours"]
        report["ade20k_80k_gpu_hours<8"] = {"value": value, "met": value < 8}
    if defaults:
        value = defaults["speedup"]
        report["defaults_inference_speedup_batch16>=4"] = {"value": value, "met": value >= 4}
        value = defaults["memory_ratio"]
        report["defaults_inference_peak_memory_ratio_batch16<=0.5"] = {"value": value, "met": value <= 0.5}
    return report


def table_rows(summary: dict) -> list[str]:
    rows = []
    label = machine_label(summary["machine"])
    for r in summary["records"]:
        timing = ["", "", ""]
        if "median_s" in r:
            timing = [
                f"{r['median_s']:.3f} ({len(r['times_s'])})",
                f"{r['images_per_s']:.1f}",
                f"{r['memory']['peak_bytes'] / 2**30:.2f}",
            ]
        note = (
            r.get("error", "")
            + (" tiny preset" if summary["tiny"] else "")
            + f" {r.get('dtype', summary['dtype'])}"
        )
        if r["variant"] == DEFAULTS[0] and summary.get("defaults"):
            d = summary["defaults"]
            note += f"; vs vpd-config: {d['speedup']:.2f}× faster, {d['memory_ratio']:.2f}× the peak memory"
        cells = [summary["date"], label, r["stage"], r["variant"], str(r["batch_size"])]
        cells += ["yes" if r["gradient_checkpointing"] else "no", *timing, note.strip()]
        rows.append("| " + " | ".join(cells) + " |")
    for layout in (summary["projection"] or {}).get("layouts", []):
        note = (
            f"ADE20K 80k its × {layout['step_s']:.3f} s = {layout['wall_clock_hours']:.1f} h on "
            f"{layout['gpus']} GPU{'s' if layout['gpus'] > 1 else ''} = {layout['gpu_hours']:.1f} GPU-hours "
            f"({summary['projection']['assumption']})"
        )
        layout_cell = f"{layout['batch_per_gpu']}×{layout['gpus']}"
        ckpt = "yes" if layout["gradient_checkpointing"] else "no"
        rows.append(
            f"| {summary['date']} | {label} | projection | {layout.get('variant', 'ours')} | {layout_cell} | {ckpt} "
            f"| | | | {note} |"
        )
    return rows


def write(summary: dict, out_dir: Path) -> None:
    (out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2))


def run(args: argparse.Namespace) -> dict:
    """Build the model once, run every check within the budget, project the recipe; JSON after each check."""
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    size = 64 if args.tiny else 512
    parts = build_parts(args.tiny, device, args.seed)
    model = build_seg_model(parts, args.seed, False, 16 if args.tiny else 256)
    variants = AttentionVariants(model)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "date": date.today().isoformat(),
        "machine": machine(device),
        "tiny": args.tiny,
        "dtype": args.dtype,
        "size": size,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "build_s": time.perf_counter() - start,
        "records": [],
        "projection": None,
        "defaults": None,
    }
    logger.info("model built in %.1f s on %s", summary["build_s"], machine_label(summary["machine"]))
    if not args.skip_defaults:
        logger.info("measuring %s vs %s at batch %d", *DEFAULTS, DEFAULTS_BATCH)
        summary["records"] += run_defaults(model, variants, size, device, args)
        summary["defaults"] = defaults_comparison(summary["records"])
        write(summary, args.out_dir)
    model.float()  # ours-default held every weight in bf16, as `iedp predict` does; training keeps fp32 ones
    prepare(model, args.dtype, channels_last=False)  # the recipe's bf16 from here on
    for check in CHECKS:
        if time.perf_counter() - start > args.budget_s:
            summary["records"].append({**asdict(check), "size": size, "error": "skipped: time budget spent"})
            continue
        logger.info("measuring %s", check)
        summary["records"].append(run_check(model, variants, check, size, device, args))
        write(summary, args.out_dir)
    summary["projection"] = projection(summary["records"])
    summary["goals"] = goals(summary["records"], summary["projection"], summary["defaults"])
    summary["total_s"] = time.perf_counter() - start
    write(summary, args.out_dir)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, nargs="?", help="where gpu_check.json and gpu_check.md go")
    parser.add_argument("--tiny", action="store_true", help="tiny preset at 64×64 (a CPU dry run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=360.0, help="start no measurement after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip-defaults", action="store_true", help="skip the ours-default vs vpd-config comparison"
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="default bf16 on a GPU, fp32 on a CPU (CPU bf16 kernels are too slow for a dry run)",
    )
    parser.add_argument(
        "--rows-from",
        type=Path,
        default=None,
        help="measure nothing: append this gpu_check.json to BENCHMARKS.md",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.rows_from:
        summary = json.loads(args.rows_from.read_text())
        # derived from the records by this code's rules
        summary["projection"] = projection(summary["records"])
        append_rows(BENCHMARKS, SECTION, HEADER, table_rows(summary))
        return
    if args.out_dir is None:
        parser.error("OUT_DIR is required unless --rows-from is given")
    if args.dtype is None:
        args.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    summary = run(args)
    table = "\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1), *table_rows(summary)])
    (args.out_dir / "gpu_check.md").write_text(table + "\n")
    print(table)
    keys = ("defaults", "projection", "goals")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
