"""Method ablation on synthetic scenes: does language guidance pay on the miniature?

For each task, variant and seed, trains the demo recipe (``iedp/configs/demo_{seg,depth}.yaml``) for ``--steps``
steps and evaluates on the synthetic validation split with the real protocols. The seed changes the
initialisation of the new layers, dropout and the data order, and is the same for every variant, so runs of one
seed are paired. Reports mean ± std per variant and, per seed, the paired difference of each variant against
``vpd``: its mean, standard error and wins. Runs go to ``--jobs`` processes of one thread each.

    python bench/ablation.py --steps 300 --seeds 0 1 2 3 4 --jobs 2

Pick settings (steps, recipe overrides) on other seeds than the ones you report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from iedp.logs import quiet_libraries
from iedp.workers import one_thread_per_worker, start_worker

# The repository root: BENCHMARKS.md and bench/results/ are found from here, whatever the working directory.
ROOT = Path(__file__).resolve().parent.parent

DEFAULT_JSON = ROOT / "bench" / "results" / "ablation.json"

# variant -> config overrides: every method of iedp.methods.METHODS (the implicit branch in both of its forms);
# every variant of one seed sees the same scenes in the same order.
VARIANTS = {
    "vpd": ["model.method=vpd"],
    "implicit (queries)": ["model.method=implicit", "model.implicit=queries"],
    "implicit (pooled)": ["model.method=implicit", "model.implicit=pooled"],
    "explicit (oracle)": ["model.method=explicit"],
    "iedp": ["model.method=iedp"],
}
# metric -> True when higher is better
METRICS = {"seg": {"mIoU": True, "aAcc": True}, "depth": {"rmse": False, "d1": True}}


def run(
    task: str,
    variant: str,
    seed: int,
    steps: int,
    weights: str,
    out: Path,
    extra: list[str],
    eval_every: int = 0,
) -> dict:
    """Train and evaluate one (task, variant, seed); returns its final metrics and, with ``eval_every``, the
    learning curve (``curve``: the metrics at every evaluation)."""
    from iedp.config import load_config
    from iedp.engine.train import train

    logging.basicConfig(level=logging.WARNING)
    folder = out / f"{task}_{variant.split()[0]}_{'-'.join(variant.split()[1:])}_{seed}"
    config = load_config(
        f"demo_{task}",
        [
            *VARIANTS[variant],
            f"model.weights={weights}",
            f"train.seed={seed}",
            f"train.max_steps={steps}",
            f"train.checkpoint_every={steps}",
            f"train.eval_every={eval_every or steps}",
            "train.checkpoints_total_limit=1",
            f"train.out={folder}",
            *extra,
        ],
    )
    tic = time.perf_counter()
    train(config)
    metrics = json.loads((folder / "metrics.json").read_text())
    result = {"task": task, "variant": variant, "seed": seed, "seconds": time.perf_counter() - tic}
    if eval_every:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        result["curve"] = [
            {k: v for k, v in json.loads(line).items() if k == "step" or k in METRICS[task]} for line in lines
        ]
    return result | {k: metrics[k] for k in METRICS[task]}


def paired(runs: list[dict], task: str, variant: str, metric: str, baseline: str = "vpd") -> dict | None:
    """Per-seed difference ``variant − baseline``: mean, standard error, wins (in the metric's better
    direction) and the number of seeds."""
    by_seed = {(r["variant"], r["seed"]): r[metric] for r in runs if r["task"] == task}
    seeds = sorted(s for v, s in by_seed if v == variant and (baseline, s) in by_seed)
    if len(seeds) < 2:
        return None
    diffs = [by_seed[(variant, s)] - by_seed[(baseline, s)] for s in seeds]
    higher = METRICS[task][metric]
    return {
        "mean": statistics.mean(diffs),
        "se": statistics.stdev(diffs) / len(diffs) ** 0.5,
        "wins": sum((d > 0) if higher else (d < 0) for d in diffs),
        "n": len(diffs),
    }


def table(runs: list[dict], task: str) -> str:
    """Markdown table of one task: mean ± std per variant, then the paired difference against vpd."""
    metrics = list(METRICS[task])
    head = " | ".join(metrics)
    pair_head = " | ".join(f"Δ{m} vs vpd (mean ± se, wins)" for m in metrics)
    lines = [f"| {task} | {head} | {pair_head} |", "|---|" + "---|" * (2 * len(metrics))]
    for variant in VARIANTS:
        rows = [r for r in runs if r["task"] == task and r["variant"] == variant]
        if not rows:
            continue
        cells = []
        for m in metrics:
            values = [r[m] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        for m in metrics:
            p = paired(runs, task, variant, m) if variant != "vpd" else None
            sign = "**" if p and abs(p["mean"]) > 2 * p["se"] else ""
            cells.append(f"{sign}{p['mean']:+.3f} ± {p['se']:.3f}{sign} ({p['wins']}/{p['n']})" if p else "–")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(runs: list[dict], task: str) -> str:
    """Markdown table of the learning curves: the first metric's mean over seeds per variant and evaluated step."""
    metric = next(iter(METRICS[task]))
    means: dict[str, dict[int, list[float]]] = {}
    for r in runs:
        if r["task"] == task and "curve" in r:
            for point in r["curve"]:
                means.setdefault(r["variant"], {}).setdefault(point["step"], []).append(point[metric])
    if not means:
        return ""
    steps = sorted({step for curve in means.values() for step in curve})
    lines = [
        f"| {task} {metric} at step | " + " | ".join(map(str, steps)) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for variant, curve in means.items():
        cells = [f"{statistics.mean(curve[s]):.3f}" if s in curve else "–" for s in steps]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def command_line(args: argparse.Namespace) -> str:
    """The command that reruns ``args``' ablation (options left at their defaults are left out)."""
    variants = (
        "" if args.variants == list(VARIANTS) else " --variants " + " ".join(map(shlex.quote, args.variants))
    )
    json_file = "" if args.json == str(DEFAULT_JSON) else f" --json {shlex.quote(args.json)}"
    return (
        f"python bench/ablation.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))} "
        f"--weights {args.weights} --tasks {' '.join(args.tasks)}{variants} --jobs {args.jobs}"
        + (f" --eval-every {args.eval_every}" if args.eval_every else "")
        + "".join(f" --set {s}" for s in args.set)
        + json_file
    )


def report(runs: list[dict], args: argparse.Namespace) -> str:
    command = command_line(args)
    minutes = sum(r["seconds"] for r in runs) / 60
    tables = "\n\n".join(table(runs, task) for task in args.tasks)
    curves = "\n\n".join(filter(None, (curve_table(runs, task) for task in args.tasks)))
    return (
        f"\n### Method ablation, {time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} cores, "
        f"{args.jobs} runs at a time, one thread each)\n\n"
        f"`{command}`: demo recipe on `{args.weights}`, {args.steps} steps per run, {len(args.seeds)} seeds "
        f"({minutes:.0f} run-minutes). Mean ± std over seeds; Δ = variant − vpd on the same seed (same "
        "initialisation and data order), mean ± standard error, and on how many seeds the variant was better; "
        "bold where |mean| > 2 se. mIoU/aAcc in percent, RMSE in metres. `explicit` is an oracle (it reads the "
        "labels at test time); `iedp` infers with the implicit branch only.\n\n"
        + tables
        + (f"\n\nLearning curves (mean over seeds):\n\n{curves}" if curves else "")
        + "\n"
    )


def run_all(args: argparse.Namespace) -> list[dict]:
    """Every (seed, task, variant), seed by seed so that a run cut short still holds complete pairs; the JSON is
    rewritten after each run."""
    from iedp.config import load_config
    from iedp.engine.latents import prepare_latents

    jobs = [(t, v, s) for s in args.seeds for t in args.tasks for v in args.variants]
    for task in args.tasks:  # encoded once here, not by every run at once (the recipes cache their latents)
        prepare_latents(load_config(f"demo_{task}", [f"model.weights={args.weights}", *args.set]))
    runs = []
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        one_thread_per_worker(),
        ProcessPoolExecutor(
            args.jobs, mp_context=get_context("spawn"), initializer=start_worker, initargs=(logging.WARNING,)
        ) as pool,
    ):
        futures = [
            pool.submit(run, t, v, s, args.steps, args.weights, Path(tmp), args.set, args.eval_every)
            for t, v, s in jobs
        ]
        for future in futures:
            runs.append(future.result())
            print(json.dumps(runs[-1]), flush=True)
            Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--weights", default="tiny-pretrained")
    parser.add_argument("--tasks", nargs="+", default=["seg", "depth"], choices=["seg", "depth"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument(
        "--eval-every", type=int, default=0, help="also evaluate every N steps and report the learning curves"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra overrides")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--no-append", action="store_true", help="do not append the tables to BENCHMARKS.md")
    parser.add_argument(
        "--report-only", action="store_true", help="only write the tables of the runs already in --json"
    )
    args = parser.parse_args()
    quiet_libraries()  # as the CLI: no "Loading weights" bars while the latents are prepared here
    runs = json.loads(Path(args.json).read_text())["runs"] if args.report_only else run_all(args)
    text = report(runs, args)
    print(text)
    if not args.no_append:
        with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
