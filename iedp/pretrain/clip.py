"""Stage (b): the tiny CLIP, trained contrastively on (rendered image, caption) pairs, and its zero-shot figures.

Images reach CLIP exactly as IEDP's implicit branch gives them (:meth:`ImplicitGuidance.preprocess`: the
whole view resized to CLIP's input size), and prompts are tokenized as the explicit branch does (padded to 77
positions), so the figures measure the towers IEDP will use.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from iedp.data.prompts import scene_prompt
from iedp.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_SCENES
from iedp.models.guidance import ImplicitGuidance
from iedp.pretrain.config import PretrainConfig
from iedp.pretrain.data import ROOM_SURFACES, SceneSet, canonical_caption, sample_caption
from iedp.pretrain.loop import fit


@torch.no_grad()
def clip_pixels(clip: CLIPModel, scenes: SceneSet, batch: int = 256) -> torch.Tensor:
    """CLIP inputs of every scene, (N, 3, S, S), made by the implicit branch's own preprocessing.

    :class:`ImplicitGuidance` freezes the tower it wraps, so it wraps a fresh (untrained) tower of the same
    config here: only its preprocessing (size, normalisation, dtype) is used.
    """
    preprocess = (
        ImplicitGuidance(CLIPVisionModelWithProjection(clip.config.vision_config)).to(clip.device).preprocess
    )
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
        flips = torch.rand(batch, generator=generator).lt(0.5).view(-1, 1, 1, 1).to(pixels.device)
        images = torch.where(flips, pixels[index].flip(-1), pixels[index])
        captions = [sample_caption(scenes, i, rng) for i in index.tolist()]
        # Causal attention: padding after the end token changes nothing, so pad to the batch's longest only.
        tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt").to(clip.device)
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


class ClipScorer:
    """Unit-norm projected embeddings of images and prompts from a CLIP's two towers (frozen), on the CPU
    whatever the towers' device (they are small, and the figures compare them with labels)."""

    def __init__(
        self,
        vision: CLIPVisionModelWithProjection,
        text: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
    ) -> None:
        self.vision = vision.requires_grad_(False).eval()
        self.text = text.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.preprocess = (
            ImplicitGuidance(CLIPVisionModelWithProjection(vision.config)).to(vision.device).preprocess
        )

    @torch.no_grad()
    def images(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """(N, D) of float images (N, 3, H, W) in [-1, 1]."""
        images = images.to(self.vision.device)
        embeds = [
            self.vision(pixel_values=self.preprocess(images[start : start + batch])).image_embeds
            for start in range(0, len(images), batch)
        ]
        return F.normalize(torch.cat(embeds), dim=-1).cpu()

    @torch.no_grad()
    def prompts(self, prompts: list[str], batch: int = 256) -> torch.Tensor:
        """(N, D) of prompts, tokenized as the explicit branch does (padded to the tokenizer's max length)."""
        embeds = []
        for start in range(0, len(prompts), batch):
            tokens = self.tokenizer(
                prompts[start : start + batch],
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            ).to(self.text.device)
            embeds.append(
                self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).text_embeds
            )
        return F.normalize(torch.cat(embeds), dim=-1).cpu()

    def zero_shot_scenes(self, images: torch.Tensor) -> torch.Tensor:
        """Scene-type index (N,) of each image: the nearest of the prompts "a photo of a {scene}"."""
        prompts = self.prompts([scene_prompt(scene) for scene in SYNTHETIC_SCENES])  # (K, D)
        return (self.images(images) @ prompts.T).argmax(dim=1)


def recall_at(similarity: torch.Tensor, k: int) -> float:
    """Share of rows whose own column (the diagonal) is among their ``k`` most similar, of a (G, G) matrix."""
    ranks = similarity.topk(k, dim=1).indices
    return (ranks == torch.arange(len(similarity)).unsqueeze(1)).any(dim=1).float().mean().item()


def object_retrieval(similarity: torch.Tensor, contains: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Per-object retrieval: for each object (row of ``similarity`` (C, N), its prompt against N images), the
    share of its ``k`` most similar images that contain it (``contains`` (C, N) bool); mean over the objects
    some image contains. Returns it and chance (the mean share of images containing each object)."""
    present = contains.any(dim=1)
    top = similarity.topk(k, dim=1).indices  # (C, k)
    hits = contains.gather(1, top).float().mean(dim=1)
    return hits[present].mean().item(), contains[present].float().mean(dim=1).mean().item()


@torch.no_grad()
def evaluate_clip(
    scorer: ClipScorer, scenes: SceneSet, gallery: int, template: str = "a photo of a {}."
) -> dict[str, float]:
    """Zero-shot scene accuracy, image<->caption retrieval and per-object retrieval on ``scenes`` (held out).

    Caption retrieval: the scenes are cut into consecutive galleries of ``gallery`` images and their canonical
    captions (every visible class with its colour or count; a trailing partial gallery is dropped); recall@k is
    averaged over the galleries, in both directions. Object retrieval: ``template`` of each furniture class
    against all the scenes, precision of the 5 nearest (see :func:`object_retrieval`). Chance is 1/6 for the
    accuracy, k/``gallery`` for recall@k and the objects' prevalence for object retrieval.
    """
    images = scenes.float_images(slice(None))
    truth = torch.tensor([SYNTHETIC_SCENES.index(scene) for scene in scenes.scenes])
    accuracy = (scorer.zero_shot_scenes(images) == truth).float().mean().item()
    image_embeds = scorer.images(images)
    text_embeds = scorer.prompts([canonical_caption(scenes, i) for i in range(len(scenes))])
    figures = {"i2t_r1": 0.0, "i2t_r5": 0.0, "t2i_r1": 0.0, "t2i_r5": 0.0}
    num_galleries = len(scenes) // gallery
    for start in range(0, num_galleries * gallery, gallery):
        similarity = image_embeds[start : start + gallery] @ text_embeds[start : start + gallery].T
        for k in (1, 5):
            figures[f"i2t_r{k}"] += recall_at(similarity, k) / num_galleries
            figures[f"t2i_r{k}"] += recall_at(similarity.T, k) / num_galleries
    objects = [name for name in SYNTHETIC_CLASSES if name not in ROOM_SURFACES]
    contains = torch.tensor([[name in classes for classes in scenes.classes] for name in objects])
    object_similarity = scorer.prompts([template.format(name) for name in objects]) @ image_embeds.T
    object_p5, object_chance = object_retrieval(object_similarity, contains, k=min(5, len(scenes)))
    return {
        "zero_shot_accuracy": accuracy,
        **figures,
        "object_p5": object_p5,
        "object_p5_chance": object_chance,
        "gallery": gallery,
        "num_scenes": len(scenes),
    }
