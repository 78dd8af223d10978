"""Stage (c): the tiny UNet as a latent text-to-image diffusion model conditioned on the tiny CLIP text tower.

Trained as Stable Diffusion v1.5 was: VAE latents (times the VAE's ``scaling_factor``) are noised by SD's
scaled-linear DDPM schedule and the UNet predicts the noise (epsilon), with some captions dropped for
classifier-free guidance. The context is SD's: the text tower's last hidden states, every token of the caption
padded to the tokenizer's 77 positions, (B, 77, D), with no attention mask (as SD's pipeline calls CLIP), so
IEDP's explicit branch, which feeds the same token sequence, meets the UNet in the form it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from iedp.data.prompts import scene_prompt
from iedp.pretrain.config import PretrainConfig
from iedp.pretrain.data import SceneSet, canonical_caption, sample_caption
from iedp.pretrain.loop import fit


def noise_scheduler() -> DDPMScheduler:
    """SD v1.5's training noise schedule (1000 steps, scaled-linear betas 0.00085..0.012, epsilon)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


class Conditioner:
    """Captions -> the UNet's context (B, L, D): the frozen text tower's last hidden states, L = the tokenizer's
    ``model_max_length`` (77), as Stable Diffusion encodes its prompts."""

    def __init__(self, text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer) -> None:
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, captions: Sequence[str], batch: int = 256) -> torch.Tensor:
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return torch.cat(
            [
                self.text_encoder.text_model(input_ids=tokens[start : start + batch]).last_hidden_state
                for start in range(0, len(tokens), batch)
            ]
        )


def train_unet(
    unet: UNet2DConditionModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    scaling_factor: float,
    scenes: SceneSet,
    conditioner: Conditioner,
    config: PretrainConfig,
) -> list[float]:
    """Train ``unet`` in place on the noise-prediction MSE; returns the loss of each step.

    With ``snr_gamma`` each sample's error is weighted by min(SNR, gamma) / SNR (min-SNR weighting, as
    diffusers' train_text_to_image ``--snr_gamma``): the nearly clean timesteps, where the text barely matters,
    stop dominating, which speeds up learning the text-to-image link.

    Args:
        latents: posterior mean and std of every training scene, (N, 4, h, w) each; each step samples from
            the posterior, as SD's training does.
        scaling_factor: multiplies the latents (the VAE config's ``scaling_factor``).
        conditioner: caption -> context; a ``caption_dropout`` share of captions is replaced by "".
    """
    means, stds = latents
    scheduler = noise_scheduler()
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(0, len(scenes), (config.unet_batch,), generator=generator)
        clean = (
            means[index] + stds[index] * torch.randn(means[index].shape, generator=generator).to(means.device)
        ) * scaling_factor
        captions = [
            "" if rng.random() < config.caption_dropout else sample_caption(scenes, i, rng)
            for i in index.tolist()
        ]
        context = conditioner(captions)
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        timesteps = timesteps.to(clean.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, context).sample
        errors = (prediction - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if config.snr_gamma is None:
            return errors.mean()
        snr = compute_snr(scheduler, timesteps)
        return (errors * snr.clamp(max=config.snr_gamma) / snr).mean()

    unet.requires_grad_(True)
    losses = fit(
        unet,
        loss_fn,
        config.unet_steps,
        config.unet_lr,
        config.weight_decay,
        config.warmup_fraction,
        config.log_every,
        "unet",
    )
    unet.requires_grad_(False)
    return losses


TIMESTEP_BANDS = 4
"""Equal ranges of the 1000 training timesteps that :func:`denoising_losses` also reports the MSE in."""


@torch.no_grad()
def denoising_losses(
    unet: UNet2DConditionModel,
    latent_means: torch.Tensor,
    scaling_factor: float,
    scenes: SceneSet,
    conditioner: Conditioner,
    draws: int,
    seed: int,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out noise-prediction MSE under four contexts, on the same noise and timesteps: over all timesteps, and
    within each of :data:`TIMESTEP_BANDS` equal timestep ranges.

    ``caption``: the scene's own canonical caption (and class tokens); ``scene_only``: "a photo of a {scene}";
    ``empty``: ""; ``wrong_scene``: the caption of the next held-out scene of another type. A UNet that uses
    the text does worst with ``wrong_scene``. Each band gives its ``timesteps`` (first, last), its ``samples``,
    each context's MSE, and ``share_of_error``: its part of the summed own-caption error (the nearly clean
    timesteps weigh most, so they decide the overall figure).
    """
    scheduler = noise_scheduler()
    generator = torch.Generator().manual_seed(seed)
    count = len(scenes)
    other = [
        next((j % count for j in range(i + 1, i + count) if scenes.scenes[j % count] != scenes.scenes[i]), i)
        for i in range(count)
    ]
    contexts = {
        "caption": conditioner([canonical_caption(scenes, i) for i in range(count)]),
        "scene_only": conditioner([scene_prompt(s) for s in scenes.scenes]),
        "empty": conditioner([""] * count),
        "wrong_scene": conditioner([canonical_caption(scenes, j) for j in other]),
    }
    clean = latent_means * scaling_factor
    drawn, errors = [], {key: [] for key in contexts}
    for _ in range(draws):
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (count,), generator=generator)
        drawn.append(timesteps)
        noisy = scheduler.add_noise(clean, noise, timesteps.to(clean.device))
        for key, context in contexts.items():
            prediction = unet(noisy, timesteps.to(clean.device), context).sample
            errors[key].append((prediction - noise).pow(2).mean(dim=(1, 2, 3)).cpu())
    timesteps = torch.cat(drawn)
    per_sample = {key: torch.cat(values).double() for key, values in errors.items()}
    return {key: e.mean().item() for key, e in per_sample.items()}, _timestep_bands(
        timesteps, per_sample, scheduler.config.num_train_timesteps
    )


def own_caption_margin(errors: dict[str, float]) -> float:
    """How much lower the MSE with the scene's own caption is than with another scene type's, as a share of the
    latter: ``errors`` is :func:`denoising_losses`' overall figures or one of its timestep bands."""
    return 1 - errors["caption"] / errors["wrong_scene"]


def _timestep_bands(
    timesteps: torch.Tensor, per_sample: dict[str, torch.Tensor], num_timesteps: int
) -> list[dict[str, Any]]:
    """The per-sample errors of :func:`denoising_losses` summarised within each timestep band."""
    edges = np.linspace(0, num_timesteps, TIMESTEP_BANDS + 1).round().astype(int)
    total = per_sample["caption"].sum().item()
    bands = []
    for first, end in zip(edges[:-1], edges[1:], strict=True):
        inside = (timesteps >= first) & (timesteps < end)
        band = {"timesteps": [int(first), int(end) - 1], "samples": int(inside.sum())}
        band |= {
            key: e[inside].mean().item() if inside.any() else float("nan") for key, e in per_sample.items()
        }
        band["share_of_error"] = per_sample["caption"][inside].sum().item() / total
        bands.append(band)
    return bands


@torch.no_grad()
def generate(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scaling_factor: float,
    conditioner: Conditioner,
    prompts: Sequence[str],
    size: int,
    steps: int,
    guidance_scale: float,
    seed: int,
) -> torch.Tensor:
    """Images (B, 3, size, size) in [-1, 1] for ``prompts``: DDIM, classifier-free guidance, VAE decoding."""
    scheduler = DDIMScheduler.from_config(noise_scheduler().config, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(
        len(prompts), unet.config.in_channels, size // factor, size // factor, generator=generator
    ).to(unet.device)
    # Conditional and unconditional contexts in one batch (same T): rows [:B] with the prompt, [B:] with "".
    context = conditioner([*prompts, *[""] * len(prompts)])
    for timestep in scheduler.timesteps:
        noise = unet(torch.cat([latents, latents]), timestep, context).sample
        conditional, unconditional = noise.chunk(2)
        noise = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(noise, timestep, latents).prev_sample
    return vae.decode(latents / scaling_factor).sample.clamp(-1, 1)
