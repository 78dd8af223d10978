"""The pre-training report: ``report.json`` (every figure, timing, setting and loss curve), ``report.md`` (the
figures for people) and ``samples.png`` (rows = scene types: one real held-out scene, then generated images)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from iedp.pretrain.text_to_image import own_caption_margin
from iedp.visualize import panel, vstack


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """Float (B, 3, H, W) in [-1, 1] -> B uint8 H x W x 3 arrays."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).cpu().numpy())


def sample_grid(rows: Sequence[tuple[str, np.ndarray, Sequence[np.ndarray]]]) -> Image.Image:
    """One titled row per ``(scene, real image, generated images)``, stacked top to bottom on white."""
    strips = [
        panel([real, *generated], [f"real {scene}", *[f"gen {scene}"] * len(generated)])
        for scene, real, generated in rows
    ]
    return vstack(strips)


def reconstruction_grid(inputs: torch.Tensor, reconstructions: torch.Tensor) -> Image.Image:
    """Float (B, 3, H, W) inputs in a titled row above their reconstructions, on white."""
    count = len(inputs)
    strips = [
        panel(to_uint8(inputs), ["input"] * count),
        panel(to_uint8(reconstructions), ["VAE reconstruction"] * count),
    ]
    return vstack(strips)


def loss_summary(losses: Sequence[float]) -> tuple[float, float]:
    """Mean loss of the first and of the last tenth of the steps (at least one step each)."""
    span = max(1, len(losses) // 10)
    return float(np.mean(losses[:span])), float(np.mean(losses[-span:]))


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` as given and ``report.md`` from it."""
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")


def markdown(report: dict[str, Any]) -> str:
    """The figures of ``report`` (as built by :func:`iedp.pretrain.pipeline.pretrain_tiny`) as Markdown."""
    sections = (_summary, _training, _vae_section, _clip_section, _unet_section, _settings)
    return "\n".join(line for section in sections for line in section(report))


def _summary(report: dict[str, Any]) -> list[str]:
    """The title and what the figures are measured on."""
    config = report["config"]
    heldout = config["num_heldout"]
    return [
        "# Tiny pre-trained weights: report",
        "",
        f"Cache key `{report['key']}` (tiny preset v{report['versions']['tiny']}, renderer "
        f"v{report['versions']['renderer']}, pretrain v{report['versions']['pretrain']}). "
        f"{config['num_train']} training and {heldout} held-out synthetic scenes at "
        f"{config['resolution']}x{config['resolution']}; every figure below is on the held-out scenes.",
        "",
    ]


def _training(report: dict[str, Any]) -> list[str]:
    """Timings of each stage and the first / last losses of each training curve."""
    timings = report["timings_s"]
    losses = {stage: loss_summary(curve) for stage, curve in report["losses"].items()}
    device = report.get("device", "cpu")
    if device != "cpu":
        how = f"every stage on one {device}, one after another"
    elif report.get("workers", 1) > 1:
        how = (
            "on the CPU, one intra-op thread per process; the VAE and the classifier ran in a second process, "
            "alongside CLIP and the UNet, so the total is less than the sum"
        )
    else:
        how = "on the CPU, one process of one intra-op thread"
    resumed = report.get("resumed_after", [])
    resumed_line = (
        f" The run was resumed after an interruption: {', '.join(resumed)} trained before it, and their times "
        "are those of that run (the total is the resumed run's)."
        if resumed
        else ""
    )
    return [
        "## Timings (seconds)",
        "",
        f"Wall time of each stage ({how}); the scenes were rendered in {report.get('render_workers', 1)} "
        f"process(es).{resumed_line}",
        "",
        "| render | VAE | CLIP | UNet | scene classifier | evaluation and report | total |",
        "|---|---|---|---|---|---|---|",
        f"| {timings['render']:.0f} | {timings['vae']:.0f} | {timings['clip']:.0f} | {timings['unet']:.0f} "
        f"| {timings.get('classifier', 0):.0f} | {timings['evaluation']:.0f} | {timings['total']:.0f} |",
        "",
        "## Training losses (mean of the first / last tenth of the steps)",
        "",
        "| stage | steps | first | last |",
        "|---|---|---|---|",
        *[
            f"| {stage} | {len(report['losses'][stage])} | {first:.4f} | {last:.4f} |"
            for stage, (first, last) in losses.items()
        ],
        "",
    ]


def _vae_section(report: dict[str, Any]) -> list[str]:
    """(a) the VAE: reconstruction PSNR against baselines, colour kept."""
    vae = report["vae"]
    return [
        "## (a) VAE: reconstruction PSNR (dB)",
        "",
        "| reconstruction | PSNR |",
        "|---|---|",
        f"| pre-trained VAE (posterior mean -> decoder) | {vae['trained']['psnr_vae']:.2f} |",
        f"| random-init VAE | {vae['random_init']['psnr_vae']:.2f} |",
        f"| baseline: each image's mean colour | {vae['trained']['psnr_mean_colour']:.2f} |",
        f"| baseline: 1/8 thumbnail, bilinear upsampling | {vae['trained']['psnr_thumbnail']:.2f} |",
        "",
        f"Colour kept (chroma energy of the reconstructions / of the inputs): "
        f"{vae['trained']['chroma_ratio']:.2f}. Latent scaling factor (1 / std of the training latents, saved in "
        f"vae/config.json): {vae['scaling_factor']:.4f}. Random-init VAE: "
        f"{vae['random_init']['chroma_ratio']:.2f}. Grid: `reconstructions.png` (held-out inputs above, their "
        "reconstructions below).",
        "",
    ]


def _clip_section(report: dict[str, Any]) -> list[str]:
    """(b) CLIP: zero-shot scene type, caption and object retrieval."""
    config, clip = report["config"], report["clip"]
    return [
        "## (b) CLIP: zero-shot scene type and image <-> caption retrieval",
        "",
        f'Zero-shot: nearest of the {clip["num_scene_types"]} prompts "a photo of a {{scene}}" (chance '
        f"{1 / clip['num_scene_types']:.3f}). Retrieval: galleries of {clip['trained']['gallery']} held-out "
        f'images and their captions ("a photo of a kitchen with white walls, a brown floor, a grey refrigerator and '
        f'two cabinets"; chance recall@1 {1 / clip["trained"]["gallery"]:.3f}), averaged over '
        f"{clip['trained']['num_scenes'] // clip['trained']['gallery']} galleries. Object retrieval (P@5): for each "
        f'of the 16 furniture classes, the share of the 5 held-out images nearest to "{config["object_template"].format("{object}")}" '
        f"that contain it, averaged over the classes (chance: their prevalence, "
        f"{clip['trained']['object_p5_chance']:.3f}).",
        "",
        "| CLIP | zero-shot accuracy | image->text R@1 | text->image R@1 | image->text R@5 | text->image R@5 "
        "| object P@5 |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {name} | {figures['zero_shot_accuracy']:.3f} | {figures['i2t_r1']:.3f} | {figures['t2i_r1']:.3f} "
            f"| {figures['i2t_r5']:.3f} | {figures['t2i_r5']:.3f} | {figures['object_p5']:.3f} |"
            for name, figures in (("pre-trained", clip["trained"]), ("random init", clip["random_init"]))
        ],
        "",
    ]


def _unet_section(report: dict[str, Any]) -> list[str]:
    """(c) the UNet: denoising by context, and what its samples are classified as."""
    config, clip, unet = report["config"], report["clip"], report["unet"]
    return [
        "## (c) UNet: text-to-image diffusion",
        "",
        "Held-out noise-prediction MSE on the same noise and timesteps, by context (lower is better); the context "
        "is the text tower's last hidden states (77 tokens), as in Stable Diffusion. A UNet that uses the text "
        f"does worst with the caption of another scene type: here own caption "
        f"{100 * own_caption_margin(unet['denoising_mse']):.1f}% lower.",
        "",
        "| own caption | scene only | empty caption | caption of another scene type |",
        "|---|---|---|---|",
        f"| {unet['denoising_mse']['caption']:.4f} | {unet['denoising_mse']['scene_only']:.4f} "
        f"| {unet['denoising_mse']['empty']:.4f} | {unet['denoising_mse']['wrong_scene']:.4f} |",
        "",
        *_timestep_band_rows(unet["denoising_by_timestep"]),
        f'Generated images: {unet["samples_per_scene"]} per scene type from "a photo of a {{scene}}" '
        f"({config['sample_steps']} DDIM steps, guidance scale {config['guidance_scale']}), decoded by the VAE. "
        f"An independent scene classifier (a small CNN trained on the training renders, no CLIP; held-out "
        f"accuracy {report['classifier']['heldout_accuracy']:.3f} on renders, "
        f"{report['classifier']['heldout_vae_accuracy']:.3f} through the VAE) classifies "
        f"**{unet['sample_classifier_accuracy']:.3f}** of them as the prompted scene type. "
        f"The pre-trained CLIP classifies {unet['sample_zero_shot_accuracy']:.3f} of them as the prompted scene "
        f"type (chance {1 / clip['num_scene_types']:.3f}; real held-out scenes: "
        f"{clip['trained']['zero_shot_accuracy']:.3f} as rendered, "
        f"{unet['reconstruction_zero_shot_accuracy']:.3f} once encoded and decoded by the VAE, as the samples "
        "are). Grid: `samples.png`, one real held-out scene first in each row.",
        "",
    ]


def _timestep_band_rows(bands: list[dict[str, Any]]) -> list[str]:
    """The denoising comparison within ranges of timesteps, and how much each range weighs in the overall one."""
    rows = [
        f"| {b['timesteps'][0]}–{b['timesteps'][1]} | {b['samples']} | {b['caption']:.4f} | {b['wrong_scene']:.4f} "
        f"| {100 * own_caption_margin(b):.1f}% | {100 * b['share_of_error']:.0f}% |"
        for b in bands
    ]
    return [
        "The same comparison within ranges of timesteps (0 is the clean latent), with each range's share of the "
        "summed own-caption error: the ranges that weigh most decide the margin above.",
        "",
        "| timesteps | samples | own caption | caption of another scene type | own lower by | share of the summed "
        "own-caption error |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _settings(report: dict[str, Any]) -> list[str]:
    """The pre-training config, as JSON."""
    config = report["config"]
    return [
        "## Settings",
        "",
        "```json",
        json.dumps(config, indent=1),
        "```",
        "",
    ]
