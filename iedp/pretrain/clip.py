"""Stage (b): the tiny CLIP, trained contrastively on (rendered image, caption) pairs, and its zero-shot figures.

Images reach CLIP exactly as IEDP's implicit branch gives them (:meth:`ImplicitGuidance.preprocess`: the
whole view resized to CLIP's input size), and the figures are computed through IEDP's own guidance modules,
so they measure the embeddings IEDP will use.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

from iedp.data.prompts import scene_prompt
from iedp.data.synthetic import SYNTHETIC_SCENES
from iedp.models.guidance import ExplicitGuidance, ImplicitGuidance
from iedp.pretrain.config import PretrainConfig
from iedp.pretrain.data import SceneSet, canonical_caption, sample_caption
from iedp.pretrain.loop import fit


@torch.no_grad()
def clip_pixels(clip: CLIPModel, scenes: SceneSet, batch: int = 256) -> torch.Tensor:
    """CLIP inputs of every scene, (N, 3, S, S), made by the implicit branch's own preprocessing.

    :class:`ImplicitGuidance` freezes the tower it wraps, so it wraps a fresh (untrained) tower of the same
    config here: only its preprocessing (size, normalisation, dtype) is used.
    """
    preprocess = ImplicitGuidance(CLIPVisionModelWithProjection(clip.config.vision_config)).preprocess
    return torch.cat(
        [
            preprocess(scenes.float_images(slice(start, start + batch)))
            for start in range(0, len(scenes), batch)
        ]
    )


def train_clip(
    clip: CLIPModel, tokenizer: CLIPTokenizer, scenes: SceneSet, config: PretrainConfig
) -> list[float]:
    """Train both towers of ``clip`` in place with CLIP's symmetric InfoNCE; returns the loss of each step.

    Each step draws ``clip_batch`` distinct scenes, flips each image at random and gives it a fresh random
    caption (:func:`sample_caption`), so the text tower sees every caption form IEDP uses.
    """
    pixels = clip_pixels(clip, scenes)  # (N, 3, S, S)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    batch = min(config.clip_batch, len(scenes))

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randperm(len(scenes), generator=generator)[:batch]
        flips = torch.rand(batch, generator=generator).lt(0.5).view(-1, 1, 1, 1)
        images = torch.where(flips, pixels[index].flip(-1), pixels[index])
        captions = [sample_caption(scenes, i, rng)[0] for i in index.tolist()]
        # Causal attention: padding after the end token changes nothing, so pad to the batch's longest only.
        tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        return clip(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=images,
            return_loss=True,
        ).loss

    clip.requires_grad_(True)
    losses = fit(
        clip,
        loss_fn,
        config.clip_steps,
        config.clip_lr,
        config.weight_decay,
        config.warmup_fraction,
        config.log_every,
        "clip",
    )
    clip.requires_grad_(False)
    return losses


@torch.no_grad()
def image_embeddings(implicit: ImplicitGuidance, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unit-norm projected image embeddings (N, D) of float images (N, 3, H, W) in [-1, 1]."""
    embeds = torch.cat(
        [implicit(images[start : start + batch])[:, 0] for start in range(0, len(images), batch)]
    )
    return F.normalize(embeds, dim=-1)


@torch.no_grad()
def text_embeddings(explicit: ExplicitGuidance, prompts: list[str], batch: int = 256) -> torch.Tensor:
    """Unit-norm projected text embeddings (N, D), as the explicit branch computes them."""
    embeds = torch.cat(
        [explicit.embed(prompts[start : start + batch]) for start in range(0, len(prompts), batch)]
    )
    return F.normalize(embeds, dim=-1)


def zero_shot_scenes(
    implicit: ImplicitGuidance, explicit: ExplicitGuidance, images: torch.Tensor
) -> torch.Tensor:
    """Scene-type index (N,) of each image: the nearest of the prompts "a photo of a {scene}"."""
    prompts = text_embeddings(explicit, [scene_prompt(scene) for scene in SYNTHETIC_SCENES])  # (K, D)
    return (image_embeddings(implicit, images) @ prompts.T).argmax(dim=1)


def recall_at(similarity: torch.Tensor, k: int) -> float:
    """Share of rows whose own column (the diagonal) is among their ``k`` most similar, of a (G, G) matrix."""
    ranks = similarity.topk(k, dim=1).indices
    return (ranks == torch.arange(len(similarity)).unsqueeze(1)).any(dim=1).float().mean().item()


@torch.no_grad()
def evaluate_clip(
    implicit: ImplicitGuidance, explicit: ExplicitGuidance, scenes: SceneSet, gallery: int
) -> dict[str, float]:
    """Zero-shot scene accuracy and image<->caption retrieval on ``scenes`` (held out).

    Retrieval: the scenes are cut into consecutive galleries of ``gallery`` images and their canonical captions
    (every visible object, largest first; a trailing partial gallery is dropped); recall@k is averaged over
    the galleries, in both directions. Chance is 1/6 for the accuracy and k/``gallery`` for recall@k.
    """
    images = scenes.float_images(slice(None))
    truth = torch.tensor([SYNTHETIC_SCENES.index(scene) for scene in scenes.scenes])
    accuracy = (zero_shot_scenes(implicit, explicit, images) == truth).float().mean().item()
    image_embeds = image_embeddings(implicit, images)
    text_embeds = text_embeddings(explicit, [canonical_caption(scenes, i) for i in range(len(scenes))])
    figures = {"i2t_r1": 0.0, "i2t_r5": 0.0, "t2i_r1": 0.0, "t2i_r5": 0.0}
    num_galleries = len(scenes) // gallery
    for start in range(0, num_galleries * gallery, gallery):
        similarity = image_embeds[start : start + gallery] @ text_embeds[start : start + gallery].T
        for k in (1, 5):
            figures[f"i2t_r{k}"] += recall_at(similarity, k) / num_galleries
            figures[f"t2i_r{k}"] += recall_at(similarity.T, k) / num_galleries
    return {"zero_shot_accuracy": accuracy, **figures, "gallery": gallery, "num_scenes": len(scenes)}
