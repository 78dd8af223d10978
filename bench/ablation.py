"""Method ablation on synthetic scenes: vpd, implicit, explicit (oracle) and iedp on the same step budget.

For each weights preset, task, method and seed, trains the demo recipe (``iedp/configs/demo_{seg,depth}.yaml``)
for ``--steps`` steps and evaluates on the synthetic validation split with the real protocols. The seed changes the
initialisation of the new layers, dropout and the data order; the scenes are the same for every run. Writes every
run's metrics to JSON and appends a table of mean ± std to BENCHMARKS.md.

    python bench/ablation.py --steps 150 --seeds 0 1 2 --weights tiny-pretrained tiny
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from iedp.config import load_config
from iedp.engine.train import train

METHODS = ("vpd", "implicit", "explicit", "iedp")
KEYS = {"seg": ("mIoU", "aAcc"), "depth": ("rmse", "d1")}


def run(task: str, method: str, weights: str, seed: int, steps: int, out: Path, extra: list[str]) -> dict:
    config = load_config(
        f"demo_{task}",
        [
            f"model.method={method}",
            f"model.weights={weights}",
            f"train.seed={seed}",
            f"train.max_steps={steps}",
            f"train.checkpoint_every={steps}",
            f"train.eval_every={steps}",
            "train.checkpoints_total_limit=1",
            f"train.out={out / f'{weights}_{task}_{method}_{seed}'}",
            *extra,
        ],
    )
    tic = time.perf_counter()
    train(config)
    metrics = json.loads((Path(config.train.out) / "metrics.json").read_text())
    return {
        "task": task,
        "method": method,
        "weights": weights,
        "seed": seed,
        "seconds": time.perf_counter() - tic,
        **{k: metrics[k] for k in KEYS[task]},
    }


def summarize(runs: list[dict]) -> dict[tuple[str, str, str], dict[str, tuple[float, float]]]:
    """(weights, task, method) -> metric -> (mean, std over seeds)."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["weights"], r["task"], r["method"]), []).append(r)
    return {
        key: {
            k: (statistics.mean(r[k] for r in rs), statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0.0)
            for k in KEYS[key[1]]
        }
        for key, rs in groups.items()
    }


def table(summary: dict, args: argparse.Namespace) -> str:
    weights = list(dict.fromkeys(w for w, _, _ in summary))
    header = (
        "| method | "
        + " | ".join(f"{w}: seg mIoU | {w}: seg aAcc | {w}: depth RMSE | {w}: depth δ1" for w in weights)
        + " |"
    )
    lines = [header, "|---|" + "---|" * (4 * len(weights))]
    for method in METHODS:
        cells = []
        for w in weights:
            for task in ("seg", "depth"):
                stats = summary.get((w, task, method))
                cells += [f"{stats[k][0]:.3f} ± {stats[k][1]:.3f}" if stats else "–" for k in KEYS[task]]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    return (
        f"\n### Method ablation, {time.strftime('%Y-%m-%d')} ({machine})\n\n"
        f"`python bench/ablation.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))} "
        f"--weights {' '.join(args.weights)} --tasks {' '.join(args.tasks)}"
        f"{''.join(f' --set {s}' for s in args.set)}`: demo recipe (synthetic 128×128, batch 8), {args.steps} steps per run, "
        f"mean ± std over {len(args.seeds)} seeds; mIoU/aAcc in percent, RMSE in metres. `explicit` is an oracle "
        "(it reads the labels at test time).\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", nargs="+", default=["tiny-pretrained", "tiny"])
    parser.add_argument("--tasks", nargs="+", default=["seg", "depth"], choices=["seg", "depth"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides"
    )
    parser.add_argument("--json", default="bench/out/ablation.json")
    parser.add_argument("--no-append", action="store_true", help="do not append the table to BENCHMARKS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for weights in args.weights:
            for task in args.tasks:
                for method in args.methods:
                    for seed in args.seeds:
                        runs.append(run(task, method, weights, seed, args.steps, Path(tmp), args.set))
                        print(json.dumps(runs[-1]), flush=True)
    summary = summarize(runs)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    text = table(summary, args)
    print(text)
    if not args.no_append:
        with open("BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
