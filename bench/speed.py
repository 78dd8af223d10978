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
  :func:`iedp.engine.inference.resolve_dtype` ``(None, device)`` with the weights as loaded (fp32), and the VAE
  encoder's input in the backbone's default memory format (channels_last on a CPU,
  :meth:`~iedp.models.backbone.DiffusionBackbone.encoder_uses_channels_last`).
- ``vpd-config``: VPD's own configuration: fp32 without autocast, the ``baseline`` processors (classic attention
  everywhere, VPD-style capture), contiguous VAE input, no compilation.
- ``ours-default-contiguous``: ``ours-default`` with a contiguous VAE input: the effect of channels_last alone.

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
configurations keep the weights in fp32 (as ``iedp predict`` loads them) and autocast per configuration.
The parent writes JSON (``--json``) and appends one dated row per configuration to ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from diffusers.models.attention_processor import Attention, AttnProcessor
from transformers import (
    CLIPConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from iedp.classes import load_class_names
from iedp.config import ModelConfig, TrainConfig
from iedp.engine.inference import DTYPES as INFERENCE_DTYPES
from iedp.engine.inference import autocast as inference_autocast
from iedp.engine.inference import resolve_dtype
from iedp.engine.optim import build_optimizer
from iedp.models.attention import AttentionStore
from iedp.models.build import assemble_model
from iedp.models.guidance import ExplicitGuidance
from iedp.models.iedp import IEDPModel

# The LDM v1-inference.yaml fields that iedp carries for offline single-file loading; diffusers' own converters
# turn it into the SD v1.5 UNet and VAE configs (320/640/1280/1280, 2 layers per block, 8 heads, context 768).
from iedp.weights import _SD_V1_ORIGINAL_CONFIG, load_clip, load_stable_diffusion, make_tiny, resolve_weights

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("vae", "unet", "inference", "train")
VARIANTS = ("ours", "baseline")  # attention alone; dtype and memory format as the worker's flags say
CONFIGURATIONS = {
    # name: (attention processors, autocast dtype or None for iedp's default on the device,
    #        VAE input channels_last or None for the backbone's default on the device)
    "ours-default": ("ours", None, None),
    "vpd-config": ("baseline", "fp32", False),
    "ours-default-contiguous": ("ours", None, False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SECTION = "Speed: our attention vs VPD-style attention (bench/speed.py)"
HEADER = (
    "| date | machine | device | dtype | stage | variant | input | batch | grad ckpt | channels_last "
    "| median s (n) | CPU s | img/s | extra peak MiB | speedup (baseline/ours time) | ours/baseline extra peak "
    "| load avg |"
)
PROMPT = "a photo of a wall, floor, ceiling, bed and lamp"  # an explicit-branch label prompt


# -- the model ------------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """The pretrained parts an IEDP model is assembled from."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    text_encoder: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer


def clip_vit_l14_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    """CLIP ViT-L/14's sizes (openai/clip-vit-large-patch14); the special-token ids follow ``tokenizer``."""
    return CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
            # The pooled text feature is read at the end-of-text token, found by this id.
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        projection_dim=768,
    )


def tiny_tokenizer() -> CLIPTokenizer:
    """The tiny preset's CLIP tokenizer, built in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(make_tiny(tmp) / "clip")


def real_size_parts(device: torch.device, seed: int) -> Parts:
    """SD v1.5's UNet and VAE and CLIP ViT-L/14's towers at full size, randomly initialised on ``device``."""
    tokenizer = tiny_tokenizer()
    clip_config = clip_vit_l14_config(tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(_SD_V1_ORIGINAL_CONFIG, {}))
        vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(_SD_V1_ORIGINAL_CONFIG, {}))
        image_encoder = CLIPVisionModelWithProjection(clip_config.vision_config)
        text_encoder = CLIPTextModelWithProjection(clip_config.text_config)
    return Parts(unet.eval(), vae.eval(), image_encoder.eval(), text_encoder.eval(), tokenizer)


def tiny_parts(device: torch.device) -> Parts:
    """The tiny preset, through iedp's loaders."""
    sd_path, clip_path = resolve_weights("tiny")
    unet, vae = load_stable_diffusion(sd_path)
    image_encoder, text_encoder, tokenizer = load_clip(clip_path)
    return Parts(
        unet.to(device), vae.to(device), image_encoder.to(device), text_encoder.to(device), tokenizer
    )


def build_seg_model(parts: Parts, seed: int, gradient_checkpointing: bool, width: int) -> IEDPModel:
    """The ``iedp`` ADE20K segmentation model (150 classes, random class tokens) with FPN neck/head ``width``."""
    names = load_class_names("ade20k")
    class_tokens = torch.randn(
        len(names), parts.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(seed)
    )
    config = ModelConfig(
        task="seg",
        method="iedp",
        classes="ade20k",
        neck_channels=width,
        head_channels=width,
        gradient_checkpointing=gradient_checkpointing,
    )
    torch.manual_seed(seed)  # adapter, neck and head weights
    explicit = ExplicitGuidance(parts.text_encoder, parts.tokenizer)
    model = assemble_model(config, parts.unet, parts.vae, parts.image_encoder, explicit, class_tokens, names)
    return model.to(parts.unet.device)


# -- the VPD-style baseline -----------------------------------------------------------------------------------
class VPDCaptureProcessor:
    """VPD's capture: the full (B·heads, N, T) probabilities from ``attn.get_attention_scores``, their class-token
    columns averaged over heads into ``store``, the output from the same probabilities (no fused kernel)."""

    def __init__(self, store: AttentionStore) -> None:
        self.store = store

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("VPDCaptureProcessor is for unmasked cross-attention layers (attn2) only")
        residual = hidden_states
        B, N, _ = hidden_states.shape  # N = h·w queries
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B·heads, N, head_dim)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B·heads, T, head_dim)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key)  # (B·heads, N, T)
        C = self.store.num_class_tokens
        self.store.add(probs.view(B, attn.heads, N, -1)[..., :C].mean(dim=1))  # (B, N, C)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))  # (B, N, heads·head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AttentionVariants:
    """Switches one model between our attention processors and the VPD-style baseline: the same weights."""

    def __init__(self, model: IEDPModel) -> None:
        backbone = model.backbone
        self.backbone, self.unet, self.vae = backbone, backbone.unet, backbone.vae
        capture = set(backbone.capture_layers()) if backbone.map_strides else set()
        ours_unet = self.unet.attn_processors
        baseline_unet = {
            name: VPDCaptureProcessor(backbone.store) if name in capture else AttnProcessor()
            for name in ours_unet
        }
        baseline_vae = {name: AttnProcessor() for name in self.vae.attn_processors}
        self.processors = {
            "ours": (ours_unet, self.vae.attn_processors),
            "baseline": (baseline_unet, baseline_vae),
        }

    def use(self, variant: str) -> None:
        """Install ``variant``'s processors: an attention variant, or a configuration's (with its VAE input
        memory format; the attention variants leave the input as the caller made it)."""
        attention, _, channels_last = CONFIGURATIONS.get(variant, (variant, None, False))
        unet_processors, vae_processors = self.processors[attention]
        # set_attn_processor pops from the dict it is given, so it gets copies.
        self.unet.set_attn_processor(dict(unet_processors))
        self.vae.set_attn_processor(dict(vae_processors))
        self.backbone.encoder_channels_last = channels_last


# -- measuring ------------------------------------------------------------------------------------------------
def make_batch(batch_size: int, size: int, num_classes: int, device: torch.device, seed: int) -> dict:
    """A segmentation batch: images in [-1, 1], random labels, one label prompt per image."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1
    labels = torch.randint(0, num_classes, (batch_size, size, size), generator=generator)
    return {"image": images.to(device), "label": labels.to(device), "prompt": [PROMPT] * batch_size}


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
    return CONFIGURATIONS[variant][1] or dtype_name(resolve_dtype(None, device))


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


def _proc_status_bytes(field_name: str) -> int:
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
            self.base = _proc_status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_bytes("VmHWM")

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
    set-up; the process must be fresh for it to mean anything, so the other variants get none here.
    """
    if warmup < 1:
        raise ValueError(f"warmup: {warmup} must be at least 1 (peak memory is taken over the first call)")
    device = batch["image"].device
    dtypes = {name: variant_dtype(name, dtype, device) for name in names}
    calls = {d: stage_call(model, stage, batch, d, channels_last) for d in dict.fromkeys(dtypes.values())}
    fns = {name: calls[dtypes[name]] for name in names}
    memory = PeakMemory(device)
    memory.start()
    records: dict[str, dict] = {
        name: {"times_s": [], "cpu_times_s": [], "memory": None, "dtype": dtypes[name]} for name in names
    }
    for name in names:
        variants.use(name)
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


def prepare(model: IEDPModel, dtype: str, channels_last: bool) -> None:
    """bf16 as in training (frozen parts cast, autocast at call time); channels_last for the VAE and UNet."""
    if dtype == "bf16":
        for part in model.frozen_modules():
            part.to(torch.bfloat16)
    if channels_last:
        model.backbone.unet.to(memory_format=torch.channels_last)
        model.backbone.vae.to(memory_format=torch.channels_last)


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


def machine_label(info: dict) -> str:
    if info["gpu"]:
        return info["gpu"]
    threads = info["torch_threads"]
    return f"{info['cpu']}, {info['cores']} cores, {threads} thread{'s' if threads > 1 else ''}"


def build_parts(tiny: bool, device: torch.device, seed: int) -> Parts:
    return tiny_parts(device) if tiny else real_size_parts(device, seed)


def parameter_counts(model: IEDPModel) -> dict[str, int]:
    parts = {
        "unet": model.unet,
        "vae": model.backbone.vae,
        "clip_vision": model.implicit,
        "clip_text": model.explicit,
        "trainable": model,
    }
    return {
        name: sum(p.numel() for p in part.parameters() if name != "trainable" or p.requires_grad)
        for name, part in parts.items()
    }


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
        # Weights stay fp32 (as loaded); each configuration autocasts itself. Off a CPU the default VAE input is
        # contiguous, so ours-default-contiguous would repeat ours-default.
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


def merge_memory(records: list[dict]) -> list[dict]:
    """Move the peak memory of each memory-only record into the timed record of the same configuration."""
    merged = [r for r in records if not r.get("memory_only") or "error" in r]
    for extra in records:
        if not extra.get("memory_only") or "error" in extra:
            continue
        target = find(merged, variant=extra["variant"], **{k: extra[k] for k in COMPARED_KEYS})
        if target is not None:
            target["memory"] = {**extra["memory"], "from": "a separate fresh worker (one call)"}
    return merged


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


def find(records: list[dict], **match: object) -> dict | None:
    for record in records:
        if "error" not in record and all(record.get(k) == v for k, v in match.items()):
            return record
    return None


COMPARED_KEYS = ("stage", "dtype", "size", "batch_size", "gradient_checkpointing", "channels_last")
# Configurations differ in dtype and memory format on purpose: they are paired on the rest.
CONFIGURATION_KEYS = ("stage", "size", "batch_size", "gradient_checkpointing")
PAIRS = (
    # (variant, the reference it is compared with, the keys both records must share)
    ("ours", "baseline", COMPARED_KEYS),
    ("ours-default", "vpd-config", CONFIGURATION_KEYS),
    ("ours-default-contiguous", "vpd-config", CONFIGURATION_KEYS),
)


def comparisons(records: list[dict]) -> list[dict]:
    """reference/variant time and variant/reference extra-peak ratios for each pair of :data:`PAIRS` measured
    in the same configuration (ours vs baseline; our defaults, with and without channels_last, vs VPD's)."""
    result = []
    for variant, reference, keys in PAIRS:
        result += [
            compare(ours, baseline, reference)
            for ours in records
            if "error" not in ours and ours["variant"] == variant
            if (baseline := find(records, variant=reference, **{k: ours[k] for k in keys})) is not None
        ]
    return result


def compare(ours: dict, baseline: dict, reference: str) -> dict:
    """The ratios of one pair: ``baseline`` (the ``reference`` variant) vs ``ours``."""
    memories = (ours["memory"], baseline["memory"])
    return {
        **{k: ours[k] for k in COMPARED_KEYS},
        "variant": ours["variant"],
        "reference": reference,
        "device": ours["device"],
        "threads": ours.get("threads"),
        "speedup": baseline["median_s"] / ours["median_s"],
        # The variants alternate call by call, so pairs share the load of the moment.
        "speedup_paired_median": statistics.median(
            b / o for o, b in zip(ours["times_s"], baseline["times_s"], strict=True)
        ),
        "cpu_time_speedup": (
            baseline["median_cpu_s"] / ours["median_cpu_s"] if "median_cpu_s" in ours else None
        ),
        "memory_ratio": (
            memories[0]["extra_bytes"] / max(1, memories[1]["extra_bytes"]) if all(memories) else None
        ),
    }


def goals(compared: list[dict]) -> dict:
    """The issues' goals at the measured sizes (reported, never asserted): the CPU fp32 attention goals (ours vs
    baseline) and issue 15's defaults goals (ours-default vs vpd-config, whole inference: ≥ 3× on CPU, ≥ 4× with
    ≤ ½ the peak memory on GPU).

    Speed ratios are of median wall times, except in single-threaded runs, where the ratio of median CPU times
    is used: it hardly moves when other processes share the machine, while wall time does.
    """
    by_stage = {
        c["stage"]: c
        for c in compared
        if c.get("variant", "ours") == "ours" and c["dtype"] == "fp32" and c["device"] == "cpu"
    }
    by_stage |= {
        f"{c['device']}-defaults-{c['stage']}": c for c in compared if c.get("variant") == "ours-default"
    }
    targets = {
        "unet_speedup>=1.5": ("unet", "speedup", 1.5),
        "unet_memory_ratio<=0.5": ("unet", "memory_ratio", 0.5),
        "inference_speedup>=1.3": ("inference", "speedup", 1.3),
        "train_speedup>=1.5": ("train", "speedup", 1.5),
        "cpu_defaults_inference_speedup>=3": ("cpu-defaults-inference", "speedup", 3.0),
        "cuda_defaults_inference_speedup>=4": ("cuda-defaults-inference", "speedup", 4.0),
        "cuda_defaults_inference_memory_ratio<=0.5": ("cuda-defaults-inference", "memory_ratio", 0.5),
    }
    report = {}
    for name, (stage, key, bound) in targets.items():
        compared_stage = by_stage.get(stage, {})
        if key == "speedup" and compared_stage.get("threads") == 1:
            key = "cpu_time_speedup"
        value = compared_stage.get(key)
        if value is not None:
            met = value >= bound if "speedup" in key else value <= bound
            report[name] = {"measure": key, "value": value, "met": met, "size": compared_stage["size"]}
    return report


def table_row(record: dict, compared: list[dict], today: str) -> str:
    """One markdown row; the ratio columns are filled on the row of a pair's variant (``ours``,
    ``ours-default``, ``ours-default-contiguous``), against its reference (``baseline``, ``vpd-config``)."""
    size = f"{record['size']}²" + (" tiny" if record.get("tiny") else "")
    settings = [record["dtype"], record["stage"], record["variant"], size]
    if "error" in record:
        cells = [
            today,
            "",
            "",
            *settings,
            "",
            "",
            "yes" if record["channels_last"] else "no",
            record["error"],
        ]
        return "| " + " | ".join(cells + [""] * 6) + " |"
    speedup = memory_ratio = ""
    for c in compared:
        if record["variant"] == c.get("variant", "ours") and all(c[k] == record[k] for k in COMPARED_KEYS):
            speedup = f"{c['speedup']:.2f}×"
            if c.get("cpu_time_speedup"):
                speedup += f" (CPU time {c['cpu_time_speedup']:.2f}×)"
            if c.get("reference", "baseline") != "baseline":
                speedup += f" vs {c['reference']}"
            memory_ratio = "" if c["memory_ratio"] is None else f"{c['memory_ratio']:.2f}"
    memory = record["memory"]
    cells = [
        today,
        machine_label(record["machine"]),
        record["device"],
        *settings,
        str(record["batch_size"]),
        "yes" if record["gradient_checkpointing"] else "no",
        "yes" if record["channels_last"] else "VAE input" if record.get("vae_channels_last") else "no",
        f"{record['median_s']:.3f} ({len(record['times_s'])})",
        f"{record['median_cpu_s']:.1f}" if "median_cpu_s" in record else "",
        f"{record['images_per_s']:.2f}",
        "" if memory is None else f"{memory['extra_bytes'] / 2**20:.0f}",
        speedup,
        memory_ratio,
        f"{record['load_average']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


BENCHMARKS_INTRO = """# Benchmarks

Rows below are appended by the scripts in `bench/`: each run adds one dated row per measured configuration to
its section's table (machine, settings, median time of the timed repetitions after warm-up, peak memory), so
older rows stay for comparison. The text under each table is written by hand after a run.
"""


def append_rows(path: Path, section: str, header: str, rows: list[str], description: str = "") -> None:
    """Append ``rows`` to the table of ``## section`` in ``path`` (creating the file, section or table)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else BENCHMARKS_INTRO
    lines = text.rstrip("\n").split("\n")
    title = f"## {section}"
    separator = "|" + "---|" * (header.count("|") - 1)
    if title not in lines:
        lines += ["", title, ""] + ([description, ""] if description else []) + [header, separator]
        lines += rows
    else:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        table = [i for i in range(start, end) if lines[i].startswith("|")]
        if table:
            last = table[0]
            while last + 1 < end and lines[last + 1].startswith("|"):
                last += 1
            lines[last + 1 : last + 1] = rows
        else:
            lines[start + 1 : start + 1] = ["", header, separator, *rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


SPEED_DESCRIPTION = (
    "Real-size SD v1.5 UNet/VAE + CLIP ViT-L/14 with random weights (same seed for both variants), ADE20K "
    "segmentation model (150 classes, `iedp`). *ours*: SDPA everywhere + `ClassAttentionProcessor` capture; "
    "*baseline*: diffusers' classic `AttnProcessor` on every UNet/VAE attention layer + VPD-style capture from "
    "`get_attention_scores`. The two variants share one process and one set of weights and alternate call by "
    "call (so load from other processes hits both alike); *extra peak* is the peak of a variant's first call "
    "in a fresh process above the post-build level (CPU: RSS high-water mark; GPU: `max_memory_allocated`). "
    "*CPU s*: median process CPU time of a call (all threads); *load avg*: the 1-minute load average after the "
    "timing (above the core count, other processes shared the CPU). Produced by `python bench/speed.py`."
)


DEFAULTS_SECTION = "Our defaults vs VPD's configuration (bench/speed.py --parts defaults)"
DEFAULTS_DESCRIPTION = (
    "Issue 15: the same real-size model and weights as above (fp32 weights, as `iedp predict` loads them), "
    "three configurations alternating call by call in one process. *ours-default*: what `iedp predict`/"
    "`evaluate` run by default on the device (our attention, autocast to `resolve_dtype(None, device)`, the "
    "backbone's default VAE input format); *vpd-config*: VPD's configuration (fp32, diffusers' classic "
    "`AttnProcessor` everywhere, VPD-style capture, contiguous, no compile); *ours-default-contiguous*: "
    "ours-default with a contiguous VAE input. The speedup column is vpd-config's time over the row's. "
    "Produced by `python bench/speed.py --parts defaults`."
)


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


def summarize(today: str, args: dict, records: list[dict], diffs: dict) -> dict:
    """A run's JSON: its records plus the comparisons and goals derived from them."""
    compared = comparisons(records)
    return {
        "date": today,
        "args": args,
        "records": records,
        "comparisons": compared,
        "output_max_abs_diff": diffs,
        "goals": goals(compared),
    }


def report(summary: dict, append: bool) -> None:
    """Print the rows and comparisons of a run; append the rows to BENCHMARKS.md when ``append``."""
    rows = [table_row(r, summary["comparisons"], summary["date"]) for r in summary["records"]]
    print("\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1), *rows]))
    keys = ("comparisons", "output_max_abs_diff", "goals")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    if append:
        configurations = [r.get("variant") in CONFIGURATIONS for r in summary["records"]]
        for section, description, wanted in (
            (SECTION, SPEED_DESCRIPTION, False),
            (DEFAULTS_SECTION, DEFAULTS_DESCRIPTION, True),
        ):
            selected = [row for row, c in zip(rows, configurations, strict=True) if c == wanted]
            if selected:
                append_rows(ROOT / "BENCHMARKS.md", section, HEADER, selected, description)


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
        help="ours, baseline, ours-default, vpd-config, ours-default-contiguous or a comma list (timed "
        "alternately)",
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
