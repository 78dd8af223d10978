"""How inference cost grows with the input side and the batch size (issue 15's cost-growth table and plot).

Times ``iedp``'s inference call (VAE encoder, implicit CLIP branch with its queries, UNet, FPN head: what
``iedp predict`` runs per window) with our defaults (our attention processors, iedp's default dtype on the device,
the model held as ``iedp predict`` holds it: :func:`iedp.engine.inference.for_inference`),
for every (side, batch) of the grid, cheapest first, in one process: a warm-up call, then the median of
``--repeats`` calls. A configuration that runs out of memory, or any left when ``--budget-s`` is spent, is recorded
as such instead of a time. Writes JSON, a markdown table (median seconds per batch and milliseconds per image) and a
PNG plot (per-image time against side, one line per batch; needs matplotlib, the ``bench`` extra).

    python -m bench.growth --sides 256 512 --batches 1 2 4 --threads 2          # real size, CPU
    python -m bench.growth --device cuda --sides 256 512 768 1024 --batches 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from bench.speed_models import build_parts, build_seg_model, make_batch
from bench.tables import machine_label
from bench.timing import dtype_name, machine, stage_call, time_calls
from iedp.engine.inference import for_inference, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def measure(model, side: int, batch_size: int, device: torch.device, dtype: str, repeats: int) -> dict:
    """One grid point: median seconds per call of ``batch_size`` images at ``side`` × ``side``."""
    batch = make_batch(batch_size, side, model.num_classes, device, seed=0)
    call = stage_call(model, "inference", batch, dtype, channels_last=False)
    times, _ = time_calls(call, device, warmup=1, repeats=repeats)
    median = statistics.median(times)
    record = {"median_s": median, "ms_per_image": 1000 * median / batch_size, "times_s": times}
    if device.type == "cuda":
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return record


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = build_parts(args.tiny, device, seed=0)
    model = build_seg_model(parts, seed=0, gradient_checkpointing=False, width=16 if args.tiny else 256)
    precision = resolve_dtype(None, device)
    for_inference(model, device, precision)  # held as `iedp predict` holds it: weights and UNet layout
    dtype = dtype_name(precision)
    grid = sorted(
        ((s, b) for s in args.sides for b in args.batches), key=lambda point: point[0] ** 2 * point[1]
    )
    start, records = time.perf_counter(), []
    for side, batch_size in grid:
        point = {"side": side, "batch": batch_size}
        if time.perf_counter() - start > args.budget_s:
            records.append({**point, "error": "skipped: time budget spent"})
            continue
        try:
            records.append({**point, **measure(model, side, batch_size, device, dtype, args.repeats)})
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            records.append({**point, "error": "out of memory"})
        print(json.dumps(records[-1]), flush=True)
    return {
        "date": date.today().isoformat(),
        "machine": machine(device),
        "model": "tiny preset" if args.tiny else "real size (SD v1.5 + CLIP ViT-L/14 shapes, random weights)",
        "dtype": dtype,
        "args": vars(args),
        "records": records,
    }


def markdown_table(summary: dict) -> str:
    """Rows: input side; columns: batch size; cells: median seconds per call (milliseconds per image)."""
    records = summary["records"]
    sides = sorted({r["side"] for r in records})
    batches = sorted({r["batch"] for r in records})
    cell = {(r["side"], r["batch"]): r for r in records}
    lines = [
        f"{summary['model']}, {summary['dtype']}, {machine_label(summary['machine'])}, {summary['date']}: median "
        "seconds per inference call (milliseconds per image)\n",
        "| side \\ batch | " + " | ".join(str(b) for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for side in sides:
        row = []
        for batch_size in batches:
            r = cell.get((side, batch_size))
            if r is None:
                row.append("–")
            elif "error" in r:
                row.append(r["error"].split(":")[0])
            else:
                ms = r["ms_per_image"]
                row.append(
                    f"{r['median_s']:.3g} s ({ms:.0f})" if ms >= 100 else f"{r['median_s']:.3g} s ({ms:.3g})"
                )
        lines.append(f"| {side} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> bool:
    """Per-image time against input side, log-log, one line per batch size; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = [r for r in summary["records"] if "error" not in r]
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for batch_size in sorted({r["batch"] for r in measured}):
        points = sorted((r["side"], r["ms_per_image"]) for r in measured if r["batch"] == batch_size)
        axes.plot(*zip(*points, strict=True), marker="o", label=f"batch {batch_size}")
    axes.set(xscale="log", yscale="log", xlabel="input side (pixels)", ylabel="ms per image")
    axes.set_title(f"iedp inference, {summary['dtype']}, {machine_label(summary['machine'])}", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 512, 768, 1024], help="multiples of 64")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="start no measurement after this")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset instead of real-size parts")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for growth_<device>.{json,md,png}")
    args = parser.parse_args(argv)
    if any(side % 64 for side in args.sides):
        parser.error(f"--sides: {args.sides} must be multiples of 64 (the UNet's input multiple)")
    if min(args.batches) < 1 or args.repeats < 1:
        parser.error("--batches and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"growth_{torch.device(args.device).type}{'_tiny' if args.tiny else ''}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    table = markdown_table(summary)
    stem.with_suffix(".md").write_text(table)
    print(table)
    if not plot(summary, stem.with_suffix(".png")):
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")


if __name__ == "__main__":
    main()
