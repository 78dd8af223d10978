"""Speed and peak memory of the IEDP segmentation model: our attention vs a VPD-style baseline, same weights.

What is measured, per configuration (stage × variant × dtype × input size):

- ``vae``: the frozen VAE encoder alone (images -> latents).
- ``unet``: the UNet stage alone, with class-attention capture (latents + context -> feature pyramid + maps).
- ``inference``: the whole segmentation forward (VAE encode + CLIP image tower + UNet with capture + neck/head).
- ``train``: one ``iedp`` training step (implicit and explicit branches in one 2B UNet call, backward, AdamW
  step from :func:`iedp.engine.optim.build_optimizer`).

Variants:

- ``ours``: the model as :func:`iedp.models.build.assemble_model` builds it: ``scaled_dot_product_attention``
  everywhere, :class:`~iedp.models.attention.ClassAttentionProcessor` on the 16×16/32×32 cross-attention layers.
- ``baseline`` (VPD-style): the same model and weights with every UNet and VAE attention layer on diffusers'
  classic ``AttnProcessor`` (the full attention matrix everywhere, as VPD's code does) and, on the same capture
  layers, :class:`VPDCaptureProcessor`, which forms the full probabilities with ``attn.get_attention_scores``
  and stores their class-token columns. Both variants capture the same maps and give the same outputs.

Configurations (``--parts defaults``), everything a user's choice changes at once, on the same weights:

- ``ours-default``: what ``iedp predict``/``evaluate`` run by default on the device: our attention, autocast to
  :func:`iedp.engine.inference.resolve_dtype` ``(None, device)`` with the weights held in that dtype
  (:func:`iedp.engine.inference.for_inference`; fp32 on a CPU without bf16 instructions), and the VAE
  encoder's input in the backbone's default memory format (channels_last on a CPU,
  :meth:`~iedp.models.backbone.DiffusionBackbone.encoder_uses_channels_last`), the UNet's weights in
  channels_last where :func:`iedp.engine.inference.unet_channels_last` says (a CPU in bf16).
- ``vpd-config``: VPD's own configuration: fp32 without autocast, the ``baseline`` processors (classic attention
  everywhere, VPD-style capture), contiguous VAE input, no compilation.
- ``ours-default-contiguous``: ``ours-default`` with a contiguous VAE input: the effect of channels_last alone.
- ``ours-default-unet-channels-last`` / ``ours-default-unet-contiguous``: ``ours-default`` with the UNet's
  weights, and so its activations, in channels_last / contiguous, whatever the default
  (:func:`iedp.engine.inference.unet_channels_last`: channels_last on a CPU in bf16). Probes outside ``--parts
  defaults``: ``--worker --stage unet,inference --variant
  ours-default-unet-contiguous,ours-default-unet-channels-last`` times the two call by call.
- ``ours-default-fp32-weights``: ``ours-default``'s autocast over weights kept in fp32 (UNet contiguous), as a
  :class:`iedp.api.Pipeline` runs a model passed in; ``iedp.load`` holds them as ``ours-default`` does.

The architectures are real size (SD v1.5 UNet and VAE, CLIP ViT-L/14 towers) with random weights from a fixed
seed, so nothing is downloaded; ``--tiny`` uses the tiny preset instead (tests). The CLIP tokenizer is the tiny
preset's (a small locally learnt vocabulary, not CLIP's 49408 tokens): only the prompt's token ids differ, which
does not change the amount of work. Class tokens are random (150 × 768, ADE20K's class count).

How: the parent process runs each configuration in a fresh worker subprocess (``--worker``). A timing worker
builds the model from the seed once, warms up each variant, then times ``--repeats`` calls of each, alternating
ours and baseline call by call (same weights; load from other processes falls on both alike); the median is
reported, with ``torch.cuda.synchronize`` around each call on GPU. Peak memory is that of a variant's first call
in a fresh process, above the level right after set-up: the first variant of a timing worker, and a separate
one-call worker for the baseline, so that one variant's peak cannot mask the other's. On CPU it is the process's
resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), on GPU
``torch.cuda.max_memory_allocated`` after a reset. Each call's process CPU time and the 1-minute load average
are recorded too: on a shared CPU, ``--threads 1`` makes CPU time a measure that other processes hardly move
(with several threads, OpenMP barriers stall whenever one thread is descheduled), and the CPU goals are then
judged on it.
``bf16`` follows the training recipe: frozen parts cast to bf16, everything under ``torch.autocast``; the
configurations hold the weights in their own autocast dtype (as ``iedp predict`` holds them: bf16 for ours-default
where the device runs bf16 natively, fp32 for vpd-config), cast when the configuration is switched.
The parent writes JSON (``--json``) and appends one dated row per configuration to ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

# Run as a file (``python bench/speed.py``), only bench/ is on the import path; ``bench.*`` needs the repository
# root, appended so that packages put in front of it keep their precedence (as in gpu_check.sh).
if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench.speed_models import (
    CONFIGURATIONS,
    VARIANTS,
    AttentionVariants,
    build_parts,
    build_seg_model,
    make_batch,
    parameter_counts,
    prepare,
)
from bench.tables import ROOT, merge_memory, report, summarize
from bench.timing import STAGES, machine, measure_variants

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- worker -----------------------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace) -> list[dict]:
    """Build the model once, then measure each of ``args.stage`` for the variants of ``args.variant``."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    parts = build_parts(args.tiny, device, args.seed)
    model = build_seg_model(parts, args.seed, args.gradient_checkpointing, 16 if args.tiny else 256)
    variants = AttentionVariants(model)
    prepare(model, args.dtype, args.channels_last)
    build_s = time.perf_counter() - start
    batch = make_batch(args.batch_size, args.size, model.num_classes, device, args.seed)
    names = args.variant.split(",")
    records = []
    for stage in args.stage.split(","):
        logger.info(
            "measuring %s / %s / %s at %d px, batch %d", stage, names, args.dtype, args.size, args.batch_size
        )
        measured, outputs = measure_variants(
            model, variants, names, stage, batch, args.dtype, args.channels_last, args.warmup, args.repeats
        )
        for name, record in measured.items():
            if args.save_output and stage == "inference" and name in outputs:
                path = output_path(Path(args.save_output), name, record["dtype"], args.channels_last)
                torch.save(outputs[name].float().cpu(), path)
            fields = {**job_fields(args, stage), "variant": name, **record, "build_s": build_s}
            records.append({**fields, "parameters": parameter_counts(model), "machine": machine(device)})
    return records


def output_path(folder: Path, variant: str, dtype: str, channels_last: bool) -> Path:
    """Where a worker saves an inference output: one file per variant, dtype and memory format."""
    return folder / f"{variant}_{dtype}{'_channels_last' if channels_last else ''}.pt"


def job_fields(args: argparse.Namespace, stage: str) -> dict:
    return {
        "stage": stage,
        "dtype": args.dtype,
        "device": args.device,
        "size": args.size,
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "channels_last": args.channels_last,
        "tiny": args.tiny,
        "threads": torch.get_num_threads(),
    }


# -- parent -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One worker process: ``stage`` for the (comma-separated, interleaved) attention ``variants``.

    A ``memory_only`` job makes one call in a fresh process, for the peak memory of a variant that was not the
    first of its timing job.
    """

    stage: str
    variants: str
    dtype: str
    size: int
    channels_last: bool = False
    save_output: bool = False
    memory_only: bool = False


def plan(args: argparse.Namespace) -> list[Job]:
    """The configurations of one run: our defaults vs VPD's configuration (whole inference and VAE encoder), ours
    vs baseline for each stage, then the single-variant extras."""
    parts, extras = set(args.parts.split(",")), set(filter(None, args.extras.split(",")))
    stages = [s for s in ("unet", "inference", "vae") if "inference" in parts] + ["train"] * (
        "train" in parts
    )
    jobs = []
    if "defaults" in parts:
        # Each configuration holds the weights in its dtype and autocasts itself. Off a CPU the default VAE input
        # is contiguous, so ours-default-contiguous would repeat ours-default.
        names = list(CONFIGURATIONS)[: 3 if args.device == "cpu" else 2]
        for stage in ("inference", "vae"):
            jobs.append(Job(stage, ",".join(names), "fp32", args.size, save_output=stage == "inference"))
        jobs.append(Job("inference", "vpd-config", "fp32", args.size, memory_only=True))
    for stage in stages:
        size = args.train_size or args.size if stage == "train" else args.size
        jobs.append(Job(stage, ",".join(VARIANTS), args.dtype, size, save_output=stage == "inference"))
        if stage != "vae":  # the VAE's only attention layer barely differs; its baseline memory is skipped
            jobs.append(Job(stage, "baseline", args.dtype, size, memory_only=True))
    if "bf16" in extras and args.dtype == "fp32" and "inference" in parts:
        jobs.append(Job("inference", "ours", "bf16", args.size, save_output=True))
    if "channels_last" in extras and "inference" in parts:
        jobs += [Job(stage, "ours", args.dtype, args.size, channels_last=True) for stage in ("unet", "vae")]
    return jobs


def worker_command(args: argparse.Namespace, job: Job, out: Path, outputs: Path) -> list[str]:
    warmup, repeats = (1, 0) if job.memory_only else (args.warmup, args.repeats)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--stage", job.stage,
        "--variant", job.variants,
        "--dtype", job.dtype,
        "--size", str(job.size),
        "--device", args.device,
        "--batch-size", str(args.batch_size),
        "--repeats", str(repeats),
        "--warmup", str(warmup),
        "--seed", str(args.seed),
        "--out", str(out),
    ]  # fmt: skip
    command += ["--threads", str(args.threads)] if args.threads else []
    flags = {
        "--tiny": args.tiny,
        "--gradient-checkpointing": args.gradient_checkpointing,
        "--channels-last": job.channels_last,
    }
    command += [flag for flag, on in flags.items() if on]
    return command + (["--save-output", str(outputs)] if job.save_output else [])


def run_job(args: argparse.Namespace, job: Job, tmp: Path, index: int) -> list[dict]:
    """Run one worker; a failed worker (e.g. killed for memory) gives one record with its exit status."""
    out = tmp / f"job{index}.json"
    logger.info("job %d: %s", index, job)
    process = subprocess.run(worker_command(args, job, out, tmp))
    if process.returncode != 0:
        reason = "killed by a signal (out of memory?)" if process.returncode < 0 else "see its log above"
        logger.error("job %d failed with exit status %d: %s", index, process.returncode, reason)
        return [
            {**asdict(job), "variant": job.variants, "error": f"exit status {process.returncode}, {reason}"}
        ]
    records = json.loads(out.read_text())
    return [{**r, "memory_only": job.memory_only} for r in records]


def max_abs_diff(a: Path, b: Path) -> float | None:
    if not (a.is_file() and b.is_file()):
        return None
    return (torch.load(a) - torch.load(b)).abs().max().item()


def output_differences(folder: Path) -> dict:
    """Max |difference| of the saved inference logits: baseline vs ours (fp32), bf16 vs fp32 (ours), our
    defaults vs VPD's configuration, and channels_last vs contiguous VAE input within our defaults."""
    reference = folder / "ours_fp32.pt"
    vpd = folder / "vpd-config_fp32.pt"
    default = next(iter(sorted(folder.glob("ours-default_*.pt"))), folder / "ours-default_fp32.pt")
    contiguous = folder / default.name.replace("ours-default_", "ours-default-contiguous_")
    return {
        "baseline_vs_ours_fp32": max_abs_diff(reference, folder / "baseline_fp32.pt"),
        "bf16_vs_fp32_ours": max_abs_diff(reference, folder / "ours_bf16.pt"),
        "fp32_logits_max_abs": torch.load(reference).abs().max().item() if reference.is_file() else None,
        "ours_default_vs_vpd_config": max_abs_diff(vpd, default),
        "vae_channels_last_vs_contiguous_ours_default": max_abs_diff(contiguous, default),
        "vpd_config_logits_max_abs": torch.load(vpd).abs().max().item() if vpd.is_file() else None,
    }


def run_parent(args: argparse.Namespace) -> dict:
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, job in enumerate(plan(args)):
            records += run_job(args, job, Path(tmp), index)
        diffs = output_differences(Path(tmp))
    summary = summarize(date.today().isoformat(), vars(args), merge_memory(records), diffs)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    logger.info("wrote %s", args.json)
    report(summary, append=not args.no_append)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--size", type=int, default=512, help="input height and width")
    parser.add_argument(
        "--train-size", type=int, default=None, help="input size of the training step (default --size)"
    )
    parser.add_argument(
        "--parts",
        default="defaults,inference,train",
        help="comma list of defaults (our defaults vs VPD's configuration), inference, train",
    )
    parser.add_argument(
        "--extras",
        default=None,
        help="comma list of single-variant checks: bf16 (inference vs fp32), channels_last (VAE, UNet); "
        "default both on CPU fp32, none otherwise",
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "speed.json"))
    parser.add_argument("--no-append", action="store_true", help="do not append rows to BENCHMARKS.md")
    parser.add_argument(
        "--rows-from",
        default=None,
        help="measure nothing: append the rows of a JSON written by an earlier run (e.g. on a GPU machine)",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny preset instead of real-size models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per worker (default torch's choice); 1 makes CPU time a load-independent measure",
    )
    worker = parser.add_argument_group("worker (one configuration; used by the parent process)")
    worker.add_argument("--worker", action="store_true")
    worker.add_argument("--stage", default="inference", help=f"comma list of {', '.join(STAGES)}")
    worker.add_argument(
        "--variant",
        default="ours",
        help=f"{', '.join((*VARIANTS, *CONFIGURATIONS))} or a comma list (timed alternately)",
    )
    worker.add_argument("--channels-last", action="store_true")
    worker.add_argument("--save-output", default=None, help="folder for the inference outputs (torch.save)")
    worker.add_argument("--out", default=None, help="write the worker's JSON records here (default stdout)")
    args = parser.parse_args(argv)
    for part in args.parts.split(","):
        if part not in ("defaults", "inference", "train"):
            parser.error(f"--parts: {part!r} is not one of defaults, inference, train")
    for stage in args.stage.split(","):
        if stage not in STAGES:
            parser.error(f"--stage: {stage!r} is not one of {', '.join(STAGES)}")
    for variant in args.variant.split(","):
        if variant not in (*VARIANTS, *CONFIGURATIONS):
            parser.error(f"--variant: {variant!r} is not one of {', '.join((*VARIANTS, *CONFIGURATIONS))}")
        if variant in CONFIGURATIONS and (args.dtype != "fp32" or args.channels_last):
            parser.error(
                f"--variant {variant}: a configuration sets its own precision and memory format; "
                "it needs the default --dtype fp32 weights and no --channels-last"
            )
    if args.extras is None:
        args.extras = "bf16,channels_last" if args.device == "cpu" and args.dtype == "fp32" else ""
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.rows_from:
        saved = json.loads(Path(args.rows_from).read_text())  # derived fields are recomputed
        report(
            summarize(saved["date"], saved["args"], saved["records"], saved["output_max_abs_diff"]),
            append=True,
        )
        return
    if not args.worker:
        run_parent(args)
        return
    records = run_worker(args)
    text = json.dumps(records, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
