"""Peak memory of one training step (forward, backward, optimizer step) with each memory-saving option.

Variants, each on the same model and batch:

- ``baseline``: training as ``iedp train`` runs it with ``train.mixed_precision=no`` (fp32, frozen parts
  included, PyTorch's AdamW), or with ``--mixed-precision bf16`` as the recipes run it (frozen parts in bf16, the
  rest under bf16 autocast, as ``iedp train`` casts them).
- ``checkpointing``: ``model.gradient_checkpointing=true`` (diffusers recomputes the UNet's resnets and
  transformer blocks in the backward pass).
- ``adamw8bit``: ``train.optimizer=adamw8bit`` (bitsandbytes' AdamW with 8-bit moments), where bitsandbytes is
  installed.
- ``frozen-bf16``: the frozen parts (VAE, both CLIP towers) cast to bf16 while the trained parts stay fp32, as
  ``iedp train`` casts them under ``train.mixed_precision=bf16``.
- ``all``: the three together.

for the ``iedp`` method (implicit and explicit branches in one 2B UNet call) and ``vpd`` (class tokens only).
The architectures are real size (SD v1.5 UNet and VAE, CLIP ViT-L/14 towers, random weights from a fixed seed,
built by :mod:`bench.speed`), or the tiny preset with ``--tiny`` (tests).

How: every (method, variant, repeat) runs in a fresh worker subprocess (``--worker``), which builds the model,
optimizer and batch, then runs one training step. On CPU the peak is the process's resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` once set-up is done); ``peak_bytes`` is that peak less the
resident set right after the imports (the model, its step and everything it allocates), ``step_bytes`` the
peak less the resident set after set-up (gradients, optimizer state, activations). On GPU the same two come from
``torch.cuda.max_memory_allocated`` (PyTorch's allocations only). The parent reports medians over ``--repeats`` and
writes JSON plus a markdown table (``--json``, ``--table``).

Run from the repository root: ``python -m bench.memory --size 64 --batch-size 2 --repeats 3``; on a GPU, the
recipe's setting: ``python -m bench.memory --device cuda --size 512 --batch-size 2 --mixed-precision bf16
--variants baseline,checkpointing,adamw8bit,all --repeats 1``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, object]] = {
    "baseline": {},
    "checkpointing": {"gradient_checkpointing": True},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "frozen-bf16": {"frozen_bf16": True},
    "all": {"gradient_checkpointing": True, "optimizer": "adamw8bit", "frozen_bf16": True},
}
METHODS = ("iedp", "vpd")
GIB = 2**30


# -- worker (runs in a fresh process) -----------------------------------------------------------------------------
def _build(method: str, variant: str, tiny: bool, device, seed: int, mixed_precision: str):
    """The ADE20K segmentation model of ``method`` (150 classes, random class tokens), its optimizer and the
    variant's settings applied."""
    import torch

    from bench.speed import build_parts
    from iedp.classes import load_class_names
    from iedp.config import ModelConfig, TrainConfig
    from iedp.engine.optim import build_optimizer
    from iedp.models.build import assemble_model
    from iedp.models.guidance import ExplicitGuidance

    settings = VARIANTS[variant]
    parts = build_parts(tiny, device, seed)
    names = load_class_names("ade20k")
    width = parts.unet.config.cross_attention_dim
    class_tokens = torch.randn(len(names), width, generator=torch.Generator().manual_seed(seed))
    config = ModelConfig(
        task="seg",
        method=method,
        classes="ade20k",
        neck_channels=16 if tiny else 256,
        head_channels=16 if tiny else 128,
        gradient_checkpointing=bool(settings.get("gradient_checkpointing", False)),
    )
    torch.manual_seed(seed)
    explicit = ExplicitGuidance(parts.text_encoder, parts.tokenizer)
    model = assemble_model(config, parts.unet, parts.vae, parts.image_encoder, explicit, class_tokens, names)
    model = model.to(device).train()
    if settings.get("frozen_bf16") or mixed_precision == "bf16":
        for part in model.frozen_modules():
            part.to(torch.bfloat16)
    train_config = TrainConfig(optimizer=str(settings.get("optimizer", "adamw")), lr=1e-5)
    optimizer, _ = build_optimizer(model, model.unet, train_config, task="seg")
    return model, optimizer


def run_worker(args: argparse.Namespace) -> dict:
    """One training step of one variant in this process: its peak memory and loss."""
    import gc

    import torch

    from bench.speed import make_batch
    from bench.timing import proc_status_bytes

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:  # on a shared machine, this worker is the one the kernel ends if memory runs out
        Path("/proc/self/oom_score_adj").write_text("1000")
    imports = proc_status_bytes("VmRSS")
    model, optimizer = _build(args.method, args.variant, args.tiny, device, args.seed, args.mixed_precision)
    batch = make_batch(args.batch_size, args.size, model.num_classes, device, args.seed)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = proc_status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    with torch.autocast(device.type, torch.bfloat16, enabled=args.mixed_precision == "bf16"):
        loss = model(batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        peak, floor = torch.cuda.max_memory_allocated(), 0
    else:
        peak, floor = proc_status_bytes("VmHWM"), imports
    return {
        "method": args.method,
        "variant": args.variant,
        "device": device.type,
        "size": args.size,
        "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "peak_bytes": peak - floor,
        "step_bytes": peak - base,
        "loss": float(loss.detach()),
    }


# -- parent: subprocesses, medians, table -------------------------------------------------------------------------
def summarize(records: list[dict]) -> list[dict]:
    """Median peak and step bytes (and loss) per (method, variant), in the order first seen, with each variant's
    peak as a fraction of its method's baseline (None without a baseline)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["variant"]), []).append(record)
    rows = [
        {
            "method": method,
            "variant": variant,
            "repeats": len(group),
            "peak_bytes": statistics.median(r["peak_bytes"] for r in group),
            "step_bytes": statistics.median(r["step_bytes"] for r in group),
            "loss": statistics.median(r["loss"] for r in group),
        }
        for (method, variant), group in groups.items()
    ]
    baselines = {row["method"]: row["peak_bytes"] for row in rows if row["variant"] == "baseline"}
    for row in rows:
        base = baselines.get(row["method"])
        row["peak_vs_baseline"] = round(row["peak_bytes"] / base, 3) if base else None
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The summary as a markdown table, sizes in GiB."""
    lines = [
        "| method | variant | peak (GiB) | of which the step (GiB) | peak vs baseline | loss | repeats |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "–" if row["peak_vs_baseline"] is None else f"{row['peak_vs_baseline']:.2f}×"
        lines.append(
            f"| {row['method']} | {row['variant']} | {row['peak_bytes'] / GIB:.2f} | "
            f"{row['step_bytes'] / GIB:.2f} | {ratio} | {row['loss']:.4f} | {row['repeats']} |"
        )
    return "\n".join(lines) + "\n"


def machine(device: str) -> dict:
    """The processor's model name (``lscpu``'s), core count and library versions."""
    import os

    import torch

    model_name = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    info = {"cpu": model_name, "cores": os.cpu_count(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def available_variants(wanted: list[str]) -> list[str]:
    """``wanted`` less the variants that need bitsandbytes where it is not installed (said on stderr)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        return wanted
    skipped = [v for v in wanted if VARIANTS[v].get("optimizer") == "adamw8bit"]
    if skipped:
        print(f"bitsandbytes not installed: skipping {', '.join(skipped)}", file=sys.stderr)
    return [v for v in wanted if v not in skipped]


def run_parent(args: argparse.Namespace) -> dict:
    records = []
    variants = available_variants(args.variants)
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for method in args.methods:
                for variant in variants:
                    out = Path(tmp) / f"{method}-{variant}-{repeat}.json"
                    command = [sys.executable, "-m", "bench.memory", "--worker", "--method", method]
                    command += ["--variant", variant, "--out", str(out), *_shared_options(args)]
                    subprocess.run(command, check=True, cwd=ROOT)
                    records.append(json.loads(out.read_text()))
                    print(json.dumps(records[-1]), file=sys.stderr)
    summary = {
        "date": date.today().isoformat(),
        "machine": machine(args.device),
        "settings": {
            k: getattr(args, k) for k in ("device", "size", "batch_size", "mixed_precision", "tiny", "seed")
        },
        "rows": summarize(records),
        "records": records,
    }
    return summary


def _shared_options(args: argparse.Namespace) -> list[str]:
    options = ["--device", args.device, "--size", str(args.size), "--batch-size", str(args.batch_size)]
    options += ["--seed", str(args.seed), "--mixed-precision", args.mixed_precision]
    return options + (["--tiny"] if args.tiny else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64, help="input side (a multiple of 64)")
    parser.add_argument(
        "--batch-size", type=int, default=2, help="images per step (iedp runs 2× in the UNet)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        default="no",
        help="bf16: the recipes' training (frozen parts in bf16, the rest under autocast); frozen-bf16 is then the "
        "baseline itself",
    )
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--tiny", action="store_true", help="the tiny preset instead of real-size parts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--table", type=Path, help="write the markdown table here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in (*args.methods, *args.variants):
        if name not in (*METHODS, *VARIANTS):
            parser.error(f"{name!r} is not one of {', '.join((*METHODS, *VARIANTS))}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        args.out.write_text(json.dumps(run_worker(args)))
        return
    summary = run_parent(args)
    table = markdown_table(summary["rows"])
    print(table)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.table:
        args.table.write_text(table)


if __name__ == "__main__":
    main()
