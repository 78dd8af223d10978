"""Whole segmentation inference (real-size model, iedp's default precision on the device, 512×512) eager and
with ``torch.compile``, side by side in one process: the VAE encoder alone (``model.compile_vae``), then the UNet
pass too (``model.compile_unet``: the UNet with its feature hooks and class-attention capture as one graph),
then the UNet under CUDA graphs (``mode="reduce-overhead"``), each at batch 1 (bound by kernel launches) and
batch 16 (bound by the GPU).

Compilation accumulates: each variant keeps the previous one's compiled parts. A variant that fails is recorded
with its error and the next still runs. Each first call (compilation included) is timed apart from the median of
``--repeats`` calls after one more warm-up. Writes OUT_DIR/compile.json and prints a markdown table.

    python -m bench.compile_probe OUT_DIR                      # on a GPU
    python -m bench.compile_probe OUT_DIR --tiny --backend eager   # a CPU dry run of the same code (seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from bench.speed_models import build_parts, build_seg_model, make_batch, prepare
from bench.tables import machine_label
from bench.timing import dtype_name, machine, stage_call, synchronize, time_calls
from iedp.engine.inference import resolve_dtype
from iedp.models.iedp import IEDPModel


def _compile_vae(model: IEDPModel, backend: str) -> None:
    model.backbone.compile_encoder(backend=backend)


def _compile_unet(model: IEDPModel, backend: str, mode: str | None = None) -> None:
    model.backbone.compile_unet(backend=backend, **({"mode": mode} if mode else {}))


# variant -> what it compiles on top of the previous variants (None: nothing, the eager model)
VARIANTS: dict[str, Callable[[IEDPModel, str], None] | None] = {
    "eager": None,
    "compiled VAE": _compile_vae,
    "compiled VAE + UNet": _compile_unet,
    "compiled VAE + UNet, CUDA graphs": lambda model, backend: _compile_unet(
        model, backend, "reduce-overhead"
    ),
}


def measure(model: IEDPModel, batch: dict, dtype: str, repeats: int) -> dict:
    """The first call (compilation included) and the median of ``repeats`` calls after one more warm-up."""
    device = batch["image"].device
    call = stage_call(model, "inference", batch, dtype, channels_last=False)
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    first = time.perf_counter() - start
    times, _ = time_calls(call, device, warmup=1, repeats=repeats)
    median = statistics.median(times)
    return {"first_call_s": first, "median_s": median, "images_per_s": len(batch["prompt"]) / median}


def write(summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compile.json").write_text(json.dumps(summary, indent=2))


def run(args: argparse.Namespace) -> dict:
    """Every variant in turn; compile.json is rewritten after each record, so a run cut short keeps its results."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype_name(resolve_dtype(None, device))  # iedp's default there: bf16 on a GPU or a bf16 CPU
    size = 64 if args.tiny else 512
    model = build_seg_model(build_parts(args.tiny, device, 0), 0, False, 16 if args.tiny else 256)
    prepare(model, dtype, channels_last=False)
    batches = {b: make_batch(b, size, model.num_classes, device, 0) for b in args.batches}
    summary = {"date": date.today().isoformat(), "machine": machine(device), "dtype": dtype, "size": size}
    summary |= {"backend": args.backend, "records": []}
    for variant, compile_part in VARIANTS.items():
        if variant.endswith("CUDA graphs") and device.type != "cuda":
            continue
        try:
            if compile_part:
                compile_part(model, args.backend)
            for b, batch in batches.items():
                record = {"variant": variant, "batch_size": b} | measure(model, batch, dtype, args.repeats)
                summary["records"].append(record)
                write(summary, args.out_dir)
                print(json.dumps(record), flush=True)
        except Exception as error:  # noqa: BLE001 - a failing variant is a result; the next one still runs
            summary["records"].append({"variant": variant, "error": f"{type(error).__name__}: {error}"[:500]})
            write(summary, args.out_dir)
            print(f"{variant}: failed ({type(error).__name__}: {str(error)[:200]})", flush=True)
    return summary


def markdown(summary: dict) -> str:
    eager = {
        r["batch_size"]: r["median_s"]
        for r in summary["records"]
        if r["variant"] == "eager" and "median_s" in r
    }
    lines = [
        f"{machine_label(summary['machine'])}, {summary['dtype']}, {summary['size']}², backend "
        f"{summary['backend']}, {summary['date']}",
        "",
        "| variant | batch | first call s | median s | img/s | vs eager |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["records"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | | | | | failed: {r['error'][:120]} |")
            continue
        ratio = eager.get(r["batch_size"], float("nan")) / r["median_s"]
        lines.append(
            f"| {r['variant']} | {r['batch_size']} | {r['first_call_s']:.1f} | {r['median_s']:.4f} | "
            f"{r['images_per_s']:.3g} | {ratio:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile backend (eager: a quick dry run)"
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny preset at 64×64 (a CPU dry run)")
    args = parser.parse_args(argv)
    summary = run(args)
    table = markdown(summary)
    (args.out_dir / "compile.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
