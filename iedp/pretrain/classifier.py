"""A scene-type classifier independent of the CLIP being scored: a small CNN trained on the rendered scenes.

It judges the text-to-image samples (is a sample of "a photo of a kitchen" recognisably a kitchen?) without
sharing a weight or a training signal with the CLIP whose text tower conditions the UNet, so a sample cannot
score well merely by matching that CLIP's quirks. It is trained on the real training renders at a small size,
and its held-out accuracy on real renders and on their VAE reconstructions (the samples are decoded by the VAE)
is reported next to its verdict.
"""

from __future__ import annotations

import torch
from torch import nn

from iedp.data.synthetic import SYNTHETIC_SCENES
from iedp.pretrain.config import PretrainConfig
from iedp.pretrain.loop import fit


def scene_classifier(width: int = 32) -> nn.Sequential:
    """Four stride-2 conv-GroupNorm-SiLU stages, global average pooling, a linear layer to the scene types."""
    layers: list[nn.Module] = []
    channels = 3
    for out in (width, 2 * width, 4 * width, 4 * width):
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
        channels = out
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, len(SYNTHETIC_SCENES))
    )


def train_classifier(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: PretrainConfig
) -> list[float]:
    """Cross-entropy on float images (N, 3, H, W) in [-1, 1] with scene indices (N,), random flips; returns the
    loss of each step."""
    generator = torch.Generator().manual_seed(config.seed)
    loss_fn_ce = nn.CrossEntropyLoss()

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(0, len(images), (config.classifier_batch,), generator=generator)
        batch = images[index]
        flips = torch.rand(len(index), generator=generator).lt(0.5).view(-1, 1, 1, 1).to(images.device)
        return loss_fn_ce(
            classifier(torch.where(flips, batch.flip(-1), batch)), labels[index].to(images.device)
        )

    return fit(
        classifier,
        loss_fn,
        config.classifier_steps,
        config.classifier_lr,
        config.weight_decay,
        config.warmup_fraction,
        config.log_every,
        "classifier",
    )


@torch.no_grad()
def classify(classifier: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scene-type index (N,), on the CPU, of float images (N, 3, H, W) in [-1, 1] on the classifier's device."""
    classifier.eval()
    indices = [classifier(images[i : i + batch]).argmax(dim=1) for i in range(0, len(images), batch)]
    return torch.cat(indices).cpu()
