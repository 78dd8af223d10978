"""The timing harness of bench/speed.py and bench/gpu_check.py: one call of a stage, wall and CPU time of
alternating calls, peak memory above a starting level, and the machine it ran on."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import diffusers
import torch
import transformers

from bench.speed_models import CONFIGURATIONS, AttentionVariants
from iedp.config import TrainConfig
from iedp.engine.inference import DTYPES as INFERENCE_DTYPES
from iedp.engine.inference import autocast as inference_autocast
from iedp.engine.inference import resolve_dtype
from iedp.engine.optim import build_optimizer
from iedp.models.iedp import IEDPModel

STAGES = ("vae", "unet", "inference", "train")


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """iedp's inference autocast for a dtype name (off for fp32)."""
    return inference_autocast(device, INFERENCE_DTYPES[dtype])


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in INFERENCE_DTYPES.items() if value == dtype)


def variant_dtype(variant: str, dtype: str, device: torch.device) -> str:
    """The autocast dtype ``variant`` runs in: the worker's ``dtype`` for an attention variant, the
    configuration's own for a configuration (``ours-default``: iedp's default on ``device``)."""
    if variant not in CONFIGURATIONS:
        return dtype
    return CONFIGURATIONS[variant].dtype or dtype_name(resolve_dtype(None, device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> tuple[list[float], object]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones, and the last call's result."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, result


def proc_status_bytes(field_name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name} field")


class PeakMemory:
    """Peak memory above the level at :meth:`start`: CUDA allocator statistics on GPU, the process's resident-set
    high-water mark on CPU (Linux: reset by writing 5 to ``/proc/self/clear_refs``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_high_water_mark"
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = proc_status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return proc_status_bytes("VmHWM")

    def report(self) -> dict:
        peak = self.peak()
        return {
            "kind": self.kind,
            "base_bytes": self.base,
            "peak_bytes": peak,
            "extra_bytes": peak - self.base,
        }


def stage_call(
    model: IEDPModel, stage: str, batch: dict, dtype: str, channels_last: bool
) -> Callable[[], object]:
    """Set up ``stage`` (optimizer, UNet inputs) and return the function that runs one call of it.

    The training step sets gradients to None after each step, so dropping the function frees everything it made.
    """
    device = batch["image"].device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = batch["image"].contiguous(memory_format=memory_format)
    if stage == "train":
        optimizer, _ = build_optimizer(model, model.unet, TrainConfig())
        model.train()

        def train_step() -> torch.Tensor:
            with autocast(device, dtype):
                losses = model(batch, mode="loss")
            losses["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return losses["loss"].detach()

        return train_step
    model.eval()
    if stage == "vae":
        call = model.backbone.encode
        args: tuple = (images,)
    elif stage == "unet":
        B = images.shape[0]
        h, w = (n // model.backbone.vae_stride for n in images.shape[-2:])
        latents = torch.randn(B, 4, h, w, generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad(), autocast(device, dtype):
            context = model.context(model.guidance_tokens("implicit", images, batch), B)  # (B, C + 1, D)
        call = model.backbone
        args = (latents.contiguous(memory_format=memory_format), context)
    elif stage == "inference":
        call = model
        args = ({**batch, "image": images}, "predict")
    else:
        raise ValueError(f"stage: {stage!r} is not one of {', '.join(STAGES)}")

    def infer() -> object:
        with torch.no_grad(), autocast(device, dtype):
            return call(*args)

    return infer


def measure_variants(
    model: IEDPModel,
    variants: AttentionVariants,
    names: list[str],
    stage: str,
    batch: dict,
    dtype: str,
    channels_last: bool,
    warmup: int,
    repeats: int,
) -> tuple[dict[str, dict], dict[str, object]]:
    """Time ``stage`` for each variant or configuration in ``names``, alternating them call by call so that load
    from other processes falls on all of them alike. Returns (record, last output) per variant; a record holds
    the autocast ``dtype`` and the VAE input format (``vae_channels_last``) its variant ran with.

    Besides wall time, each call's process CPU time (all threads) is recorded: with one thread (``--threads 1``)
    it hardly depends on what else runs on the machine.

    Peak memory is that of the first variant's first call (at least one warm-up call) above the level after
    set-up and after its switch (its weights in its own dtype); the process must be fresh for it to mean anything,
    so the other variants get none here.
    """
    if warmup < 1:
        raise ValueError(f"warmup: {warmup} must be at least 1 (peak memory is taken over the first call)")
    device = batch["image"].device
    dtypes = {name: variant_dtype(name, dtype, device) for name in names}
    calls = {d: stage_call(model, stage, batch, d, channels_last) for d in dict.fromkeys(dtypes.values())}
    fns = {name: calls[dtypes[name]] for name in names}
    memory = PeakMemory(device)
    records: dict[str, dict] = {
        name: {"times_s": [], "cpu_times_s": [], "memory": None, "dtype": dtypes[name]} for name in names
    }
    for name in names:
        variants.use(name)
        if name == names[0]:
            # After the switch: a configuration casting the fp32 weights to bf16 frees half of them, and a floor
            # taken before would hide its activations under the memory the cast gave back.
            memory.start()
        records[name]["vae_channels_last"] = (
            model.backbone.encoder_uses_channels_last(device) or channels_last
        )
        time_calls(fns[name], device, warmup, 0)
        if name == names[0]:
            records[name]["memory"] = memory.report()
    outputs: dict[str, object] = {}
    for _ in range(repeats):
        for name in names:
            variants.use(name)
            cpu_start = time.process_time()
            times, outputs[name] = time_calls(fns[name], device, 0, 1)
            records[name]["cpu_times_s"].append(time.process_time() - cpu_start)
            records[name]["times_s"] += times
    for record in records.values():
        if record["times_s"]:
            record["median_s"] = statistics.median(record["times_s"])
            record["images_per_s"] = batch["image"].shape[0] / record["median_s"]
            record["median_cpu_s"] = statistics.median(record["cpu_times_s"])
        record["load_average"] = os.getloadavg()[0]  # > cores: other processes competed for the CPU
    return records, outputs


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
