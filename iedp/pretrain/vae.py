"""Stage (a): the tiny VAE as an autoencoder, and the figures that show its latents keep the image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from iedp.pretrain.config import PretrainConfig
from iedp.pretrain.data import SceneSet
from iedp.pretrain.loop import fit


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` crop of each uint8 (B, 3, H, W) image, randomly flipped: (B, 3, S, S)."""
    _, _, height, width = images.shape
    tops = torch.randint(0, height - size + 1, (len(images),), generator=generator).tolist()
    lefts = torch.randint(0, width - size + 1, (len(images),), generator=generator).tolist()
    flips = torch.rand(len(images), generator=generator).lt(0.5).tolist()
    crops = [
        image[:, top : top + size, left : left + size]
        for image, top, left in zip(images, tops, lefts, strict=True)
    ]
    return torch.stack([crop.flip(-1) if flip else crop for crop, flip in zip(crops, flips, strict=True)])


def train_vae(vae: AutoencoderKL, scenes: SceneSet, config: PretrainConfig) -> list[float]:
    """Train ``vae`` in place: MSE of the reconstruction from a posterior sample, + ``vae_chroma_weight`` x the
    MSE of its chroma (each pixel minus its grey), + ``vae_kl_weight`` x KL.

    The chroma term speeds up learning colour: the scenes' colour varies far less than their brightness, so
    plain MSE learns it last (grey reconstructions for hundreds of steps). The KL term (per latent element,
    against N(0, I)) keeps the latents bounded and the posterior smooth, as SD's VAE; its weight is small, so
    the latents keep the image. Returns the loss of each step.
    """
    generator = torch.Generator().manual_seed(config.seed)

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(0, len(scenes), (config.vae_batch,), generator=generator)
        images = random_crops(scenes.images[index], config.vae_crop, generator).float() / 127.5 - 1
        posterior = vae.encode(images).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(images.device)
        reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
        kl = posterior.kl() / posterior.mean[0].numel()  # (B,) per latent element
        chroma = F.mse_loss(
            reconstruction - reconstruction.mean(dim=1, keepdim=True),
            images - images.mean(dim=1, keepdim=True),
        )
        return (
            F.mse_loss(reconstruction, images)
            + config.vae_chroma_weight * chroma
            + config.vae_kl_weight * kl.mean()
        )

    vae.requires_grad_(True)
    losses = fit(
        vae,
        loss_fn,
        config.vae_steps,
        config.vae_lr,
        config.weight_decay,
        config.warmup_fraction,
        config.log_every,
        "vae",
    )
    vae.requires_grad_(False)
    return losses


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, scenes: SceneSet, size: int, batch: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every scene, resized to ``size``: two (N, 4, size/8, size/8) tensors."""
    means, stds = [], []
    for start in range(0, len(scenes), batch):
        posterior = vae.encode(scenes.float_images(slice(start, start + batch), size)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [-1, 1] (peak-to-peak 2): (B,)."""
    mse = (images.clamp(-1, 1) - references).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, scenes: SceneSet, batch: int = 16) -> dict[str, float]:
    """Mean PSNR (dB) of the VAE (posterior mean -> decoder, as IEDP encodes) and of two baselines.

    ``mean_colour``: each image replaced by its mean colour (what a latent that kept nothing would give).
    ``thumbnail``: the image area-downsampled by the VAE's factor to 3 channels and upsampled bilinearly (a
    code of 3 numbers per latent position, against the VAE's 4). ``chroma_ratio``: the reconstructions'
    :func:`chroma_energy` over the inputs' (1 = as colourful, 0 = grey).
    """
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    totals = {"vae": 0.0, "mean_colour": 0.0, "thumbnail": 0.0}
    chroma = {"reconstruction": 0.0, "input": 0.0}
    for start in range(0, len(scenes), batch):
        images = scenes.float_images(slice(start, start + batch))
        reconstruction = vae.decode(vae.encode(images).latent_dist.mean).sample
        mean_colour = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        thumbnail = F.interpolate(
            F.avg_pool2d(images, factor), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        for key, estimate in (
            ("vae", reconstruction),
            ("mean_colour", mean_colour),
            ("thumbnail", thumbnail),
        ):
            totals[key] += psnr(estimate, images).sum().item()
        chroma["reconstruction"] += chroma_energy(reconstruction.clamp(-1, 1)).item()
        chroma["input"] += chroma_energy(images).item()
    figures = {f"psnr_{key}": total / len(scenes) for key, total in totals.items()}
    return {**figures, "chroma_ratio": chroma["reconstruction"] / max(chroma["input"], 1e-12)}


def chroma_energy(images: torch.Tensor) -> torch.Tensor:
    """Sum over (B, 3, H, W) images of each pixel's squared distance from its grey (channel mean): colourfulness."""
    return (images - images.mean(dim=1, keepdim=True)).pow(2).sum()


@torch.no_grad()
def latent_scaling_factor(latent_means: torch.Tensor) -> float:
    """SD's ``scaling_factor``: 1 / std of the training latents, so the diffusion model sees unit variance."""
    return 1.0 / latent_means.std().item()
