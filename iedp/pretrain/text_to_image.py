"""Stage (c): the tiny UNet as a latent text-to-image diffusion model conditioned on the tiny CLIP text tower.

Trained as Stable Diffusion was: VAE latents (times the VAE's ``scaling_factor``) are noised by SD's
scaled-linear DDPM schedule and the UNet predicts the noise (epsilon), with some captions dropped for
classifier-free guidance. The context has IEDP's token form: the caption's projected ``text_embeds`` as one
token (B, 1, D), plus (``object_tokens``) the class token of every class the caption names, the same
"a photo of a {}." embeddings IEDP's class-token bank holds, so cross-attention learns to tie each class token
to the pixels of its class, the property VPD's attention maps rely on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr

from iedp.data.prompts import scene_prompt
from iedp.data.synthetic import SYNTHETIC_CLASSES
from iedp.models.guidance import ExplicitGuidance
from iedp.pretrain.config import PretrainConfig
from iedp.pretrain.data import SceneSet, canonical_caption, sample_caption
from iedp.pretrain.loop import fit

_CLASS_INDEX = {name: index for index, name in enumerate(SYNTHETIC_CLASSES)}


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
    """Captions -> the UNet's context (B, T, D) and its key mask (B, T) (1 = attend, 0 = padding).

    Args:
        explicit: IEDP's explicit branch (frozen CLIP text tower), which embeds the captions.
        template: class-token prompt, e.g. "a photo of a {}."; one token per synthetic class is made once.
        object_tokens: append the class tokens of the named classes; without, T = 1 and names are ignored.
    """

    def __init__(self, explicit: ExplicitGuidance, template: str, object_tokens: bool) -> None:
        self.explicit = explicit
        self.object_tokens = object_tokens
        self.class_tokens = explicit.embed([template.format(name) for name in SYNTHETIC_CLASSES])  # (C, D)

    @torch.no_grad()
    def __call__(
        self, captions: Sequence[str], named: Sequence[Sequence[str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        caption_tokens = self.explicit.embed(list(captions))  # (B, D)
        named = named if self.object_tokens else [[] for _ in captions]
        length = 1 + max(len(names) for names in named)
        context = caption_tokens.new_zeros(len(captions), length, caption_tokens.shape[-1])  # (B, T, D)
        mask = caption_tokens.new_zeros(len(captions), length)  # (B, T)
        context[:, 0], mask[:, 0] = caption_tokens, 1
        for row, names in enumerate(named):
            if names:
                context[row, 1 : 1 + len(names)] = self.class_tokens[[_CLASS_INDEX[n] for n in names]]
                mask[row, 1 : 1 + len(names)] = 1
        return context, mask


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
            means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        ) * scaling_factor
        captions = [
            ("", []) if rng.random() < config.caption_dropout else sample_caption(scenes, i, rng)
            for i in index.tolist()
        ]
        context, mask = conditioner([text for text, _ in captions], [names for _, names in captions])
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, context, encoder_attention_mask=mask).sample
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


@torch.no_grad()
def denoising_losses(
    unet: UNet2DConditionModel,
    latent_means: torch.Tensor,
    scaling_factor: float,
    scenes: SceneSet,
    conditioner: Conditioner,
    draws: int,
    seed: int,
) -> dict[str, float]:
    """Held-out noise-prediction MSE under four contexts, on the same noise and timesteps.

    ``caption``: the scene's own canonical caption (and class tokens); ``scene_only``: "a photo of a {scene}";
    ``empty``: ""; ``wrong_scene``: the caption of the next held-out scene of another type. A UNet that uses
    the text does worst with ``wrong_scene``.
    """
    scheduler = noise_scheduler()
    generator = torch.Generator().manual_seed(seed)
    count = len(scenes)
    other = [
        next((j % count for j in range(i + 1, i + count) if scenes.scenes[j % count] != scenes.scenes[i]), i)
        for i in range(count)
    ]
    no_names: list[list[str]] = [[] for _ in range(count)]
    contexts = {
        "caption": conditioner(
            [canonical_caption(scenes, i) for i in range(count)], [scenes.objects(i) for i in range(count)]
        ),
        "scene_only": conditioner([scene_prompt(s) for s in scenes.scenes], no_names),
        "empty": conditioner([""] * count, no_names),
        "wrong_scene": conditioner(
            [canonical_caption(scenes, j) for j in other], [scenes.objects(j) for j in other]
        ),
    }
    clean = latent_means * scaling_factor
    totals = dict.fromkeys(contexts, 0.0)
    for _ in range(draws):
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (count,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        for key, (context, mask) in contexts.items():
            prediction = unet(noisy, timesteps, context, encoder_attention_mask=mask).sample
            totals[key] += F.mse_loss(prediction, noise).item() / draws
    return totals


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
    )
    # Conditional and unconditional contexts in one batch (same T): rows [:B] with the prompt, [B:] with "".
    context, mask = conditioner([*prompts, *[""] * len(prompts)], [[] for _ in range(2 * len(prompts))])
    for timestep in scheduler.timesteps:
        noise = unet(torch.cat([latents, latents]), timestep, context, encoder_attention_mask=mask).sample
        conditional, unconditional = noise.chunk(2)
        noise = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(noise, timestep, latents).prev_sample
    return vae.decode(latents / scaling_factor).sample.clamp(-1, 1)
