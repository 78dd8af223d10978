"""The VAE encoder on a whole batch and in slices (``model.vae_slicing``): peak memory, time and latents.

Each (images per encoder call, input side, batch) runs in a fresh worker process (``--worker``) on SD v1.5's real-size VAE with
random weights from a fixed seed: one untimed call, then ``--repeats`` timed ones; the peak is that of the first
call above the level after set-up (:class:`bench.timing.PeakMemory`: the resident-set high-water mark on a CPU,
the allocator's peak on a GPU). Every slice size (``--slices``, images per encoder call; 0: the whole batch) of a
size and batch encodes the same images, and the parent reports how far the sliced latents are from the
whole-batch ones. JSON goes to ``--json``; ``--append`` adds the rows to
BENCHMARKS.md.

    python -m bench.vae_slicing --sizes 512 --batches 4 --threads 1 --json bench/results/vae_slicing_cpu.json
    python -m bench.vae_slicing --device cuda --dtype bf16 --batches 16 --slices 0 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

from bench.tables import BENCHMARKS, append_rows, machine_label
from bench.timing import PeakMemory, machine, synchronize
from iedp.models.backbone import in_slices
from iedp.weights import _SD_V1_ORIGINAL_CONFIG

SECTION = "VAE slicing: the encoder one image at a time (bench/vae_slicing.py)"
HEADER = "| date | machine | dtype | input | batch | images per call | median s (n) | peak above weights GiB | sliced vs whole latents |"


def worker(args: argparse.Namespace) -> dict:
    """One variant in this process: peak memory, times and the latents (saved for the parent)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(device):
        vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(_SD_V1_ORIGINAL_CONFIG, {}))
    vae = vae.to(dtype).eval()
    generator = torch.Generator().manual_seed(args.seed + 1)
    images = (torch.rand(args.batch, 3, args.size, args.size, generator=generator) * 2 - 1).to(device, dtype)
    memory = PeakMemory(device)
    memory.start()
    times = []
    with torch.no_grad():
        for _ in range(1 + args.repeats):
            synchronize(device)
            start = time.perf_counter()
            latents = in_slices(lambda x: vae.encode(x).latent_dist.mean, images, args.slice)
            synchronize(device)
            times.append(time.perf_counter() - start)
            if len(times) == 1:
                peak = memory.report()
    torch.save(latents.float().cpu(), args.latents)
    return {"times_s": times[1:], "median_s": statistics.median(times[1:]), "memory": peak}


def run(args: argparse.Namespace) -> dict:
    """Every (size, batch) at every slice size, each in a fresh worker process."""
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            for batch in args.batches:
                latents = {}
                for slice_size in args.slices:
                    path = Path(folder) / f"{size}_{batch}_{slice_size}.pt"
                    command = [
                        sys.executable, "-m", "bench.vae_slicing", "--worker", "--device", args.device,
                        "--dtype", args.dtype, "--repeats", str(args.repeats), "--seed", str(args.seed),
                        "--size", str(size), "--batch", str(batch), "--latents", str(path),
                        "--slice", str(slice_size),
                    ]  # fmt: skip
                    command += ["--threads", str(args.threads)] if args.threads else []
                    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                    record = json.loads(output.strip().splitlines()[-1])
                    records.append({"size": size, "batch": batch, "slice": slice_size, **record})
                    print(json.dumps(records[-1]), flush=True)  # a run cut short keeps what it measured
                    latents[slice_size] = torch.load(path)
                    if slice_size and 0 in latents:
                        difference = (latents[slice_size] - latents[0]).abs().max().item()
                        records[-1]["latents_max_abs_diff"] = difference
    return {
        "date": date.today().isoformat(),
        "machine": machine(torch.device(args.device)),
        "dtype": args.dtype,
        "threads": args.threads,
        "records": records,
    }


def rows(summary: dict) -> list[str]:
    label = machine_label(summary["machine"])
    lines = []
    for r in summary["records"]:
        difference = f"max abs diff {r['latents_max_abs_diff']:.1e}" if "latents_max_abs_diff" in r else ""
        lines.append(
            f"| {summary['date']} | {label} | {summary['dtype']} | {r['size']}² | {r['batch']} | "
            f"{r['slice'] or 'all'} | {r['median_s']:.3f} ({len(r['times_s'])}) | "
            f"{r['memory']['extra_bytes'] / 2**30:.2f} | {difference} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--batches", type=int, nargs="+", default=[4])
    parser.add_argument(
        "--slices",
        type=int,
        nargs="+",
        default=[0, 1],
        help="images per encoder call (0: the whole batch first)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--append", action="store_true", help="append the rows to BENCHMARKS.md")
    worker_args = parser.add_argument_group("worker (one variant; used by the parent process)")
    worker_args.add_argument("--worker", action="store_true")
    worker_args.add_argument("--slice", type=int, default=0)
    worker_args.add_argument("--size", type=int, default=512)
    worker_args.add_argument("--batch", type=int, default=4)
    worker_args.add_argument("--latents", default=None)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    summary = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    table = rows(summary)
    print("\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1), *table]))
    if args.append:
        append_rows(BENCHMARKS, SECTION, HEADER, table)


if __name__ == "__main__":
    main()
