"""Synthetic-scene rendering speed: 1,000 scenes at 128×128 on one core, median of 3 runs.

Writes ``bench/out/render_speed.json`` and prints a markdown table row. Run from anywhere:
``python bench/render_speed.py [--scenes N] [--size S] [--runs R]``.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from iedp.data.synthetic import RENDERER_VERSION, render_scene

OUT = Path(__file__).resolve().parent / "out" / "render_speed.json"


def time_run(scenes: int, size: int, first_seed: int) -> float:
    """Seconds to render ``scenes`` scenes of ``size``×``size``."""
    start = time.perf_counter()
    for seed in range(first_seed, first_seed + scenes):
        render_scene(seed, size, size)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):  # pin to one core so numpy's BLAS cannot spread out either
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    seconds = [time_run(args.scenes, args.size, run * args.scenes) for run in range(args.runs)]
    rates = [args.scenes / s for s in seconds]
    machine = f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, 1 thread used)"
    today = datetime.date.today().isoformat()
    result = {
        "benchmark": "render_speed",
        "renderer_version": RENDERER_VERSION,
        "scenes": args.scenes,
        "size": args.size,
        "runs_seconds": seconds,
        "scenes_per_second_median": statistics.median(rates),
        "machine": machine,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": today,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{statistics.median(rates):.1f} scenes/s (median of {args.runs} runs of {args.scenes} at {args.size}x{args.size})"
    )
    print(f"wrote {OUT}")
    print("| benchmark | scenes/s | machine | date |")
    print("|---|---|---|---|")
    print(
        f"| render {args.scenes}x {args.size}x{args.size} | {statistics.median(rates):.1f} | {machine} | {today} |"
    )


if __name__ == "__main__":
    main()
