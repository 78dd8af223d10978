"""Language guidance from frozen CLIP: the image features of the implicit branch, the label-prompt tokens of the
explicit branch and the class-token bank. The implicit branch's trainable half (learnable queries that turn the
image features into implicit text embeddings) is :class:`~iedp.models.implicit_queries.ImplicitQueries`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from iedp.cache import cache_root
from iedp.resources import read_names

logger = logging.getLogger(__name__)


IMAGE_TOKENS = ("hidden", "pooled", "patches")
TEXT_TOKENS = ("sequence", "projected")


class ImplicitGuidance(nn.Module):
    """Frozen CLIP vision tower: image -> visual tokens (B, T, D_out).

    ``tokens``:
        ``"hidden"``: every token of the last layer (T = 1 + patches, 257 for ViT-L/14 at 224; D_out = the
            tower's hidden width), the F_vis that the learnable queries read;
        ``"pooled"``: the projected ``image_embeds`` (T = 1, D_out = projection width), used as a text token;
        ``"patches"``: every last-layer token through the post-layernorm and the visual projection.
    """

    def __init__(self, image_encoder: CLIPVisionModelWithProjection, tokens: str = "pooled") -> None:
        super().__init__()
        if tokens not in IMAGE_TOKENS:
            raise ValueError(f"implicit image tokens: {tokens!r} is not one of {', '.join(IMAGE_TOKENS)}")
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        self.tokens = tokens
        self.image_size = image_encoder.config.image_size
        config = image_encoder.config
        self.out_dim = config.hidden_size if tokens == "hidden" else config.projection_dim
        self.register_buffer("mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ImplicitGuidance:
        return super().train(False)  # frozen: always in eval mode

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> CLIP input (B, 3, S, S). The whole view is resized (not centre-cropped)
        so the embedding describes everything the dense head sees."""
        pixels = (images.float() + 1) / 2
        pixels = F.interpolate(
            pixels, size=(self.image_size,) * 2, mode="bicubic", antialias=True, align_corners=False
        )
        pixels = (pixels.clamp(0, 1) - self.mean) / self.std
        return pixels.to(self.image_encoder.dtype)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.image_encoder(pixel_values=self.preprocess(images))
        if self.tokens == "hidden":
            return output.last_hidden_state  # (B, T, D_vis)
        if self.tokens == "pooled":
            return output.image_embeds[:, None]  # (B, 1, D)
        hidden = self.image_encoder.vision_model.post_layernorm(output.last_hidden_state)
        return self.image_encoder.visual_projection(hidden)  # (B, T, D)


class ExplicitGuidance(nn.Module):
    """Frozen CLIP text tower: prompts -> text tokens (B, T, D). Used in training and by the ``explicit`` oracle.

    ``tokens``:
        ``"sequence"``: the last hidden states of every position (T = the tokenizer's 77), the token sequence that
            SD v1.5's UNet was trained on;
        ``"projected"``: one projected ``text_embeds`` token (T = 1), in the image embeddings' space.
    """

    def __init__(
        self, text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer, tokens: str = "sequence"
    ) -> None:
        super().__init__()
        if tokens not in TEXT_TOKENS:
            raise ValueError(f"model.explicit_tokens: {tokens!r} is not one of {', '.join(TEXT_TOKENS)}")
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.tokens = tokens

    @property
    def context_length(self) -> int:
        """T of :meth:`forward`."""
        return self.tokenizer.model_max_length if self.tokens == "sequence" else 1

    def train(self, mode: bool = True) -> ExplicitGuidance:
        return super().train(False)

    def _input_ids(self, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
        """Token ids padded to ``max_length`` (default the tokenizer's 77); longer prompts are truncated."""
        return self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=max_length or self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)

    @torch.no_grad()
    def embed(
        self, prompts: list[str], kind: str = "projected", max_length: int | None = None
    ) -> torch.Tensor:
        """(len(prompts), D): ``projected`` text_embeds, or the un-projected ``pooled`` output (VPD's choice).

        The pooled output is read at the end-of-text token; the causal text transformer never lets it see the
        padding, so neither an attention mask nor ``max_length`` (VPD's scene tokens use 20) changes it except by
        truncating longer prompts."""
        if kind not in ("projected", "pooled"):
            raise ValueError(f"model.class_embedding: {kind!r} is not one of projected, pooled")
        pooled = self.text_encoder.text_model(input_ids=self._input_ids(prompts, max_length)).pooler_output
        return self.text_encoder.text_projection(pooled) if kind == "projected" else pooled

    @torch.no_grad()
    def sequence(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), 77, D): the last hidden states, without an attention mask, as Stable Diffusion's UNet
        receives them."""
        return self.text_encoder.text_model(input_ids=self._input_ids(prompts)).last_hidden_state

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """(B, T, D) explicit guidance tokens, T = :attr:`context_length`."""
        if self.tokens == "sequence":
            return self.sequence(prompts)
        return self.embed(prompts)[:, None]  # (B, 1, D)


def no_tokens(class_tokens: torch.Tensor, batch: dict, batch_size: int, device: torch.device) -> None:
    """VPD's segmentation branch: no guidance tokens, the class tokens alone make the context."""
    return None


def scene_tokens(
    class_tokens: torch.Tensor, batch: dict, batch_size: int, device: torch.device
) -> torch.Tensor:
    """VPD's depth branch: (B, 1, D), the scene token of each sample's ground-truth scene (``batch["scene_id"]``,
    rows of the (C, D) ``class_tokens``), or the mean scene token where the scene is unknown (-1, or no ids)."""
    scene_ids = batch.get("scene_id")
    if scene_ids is None:
        scene_ids = torch.full((batch_size,), -1, dtype=torch.long)
    scene_ids = torch.as_tensor(scene_ids, device=device)
    known = scene_ids >= 0
    tokens = class_tokens[scene_ids.clamp(min=0)]
    tokens = torch.where(known[:, None], tokens, class_tokens.mean(dim=0, keepdim=True))
    return tokens[:, None]


def class_templates(template: str) -> list[str]:
    """The prompt templates of one class token: ``template`` itself, or for ``"clip80"`` the 80 templates of
    CLIP's ImageNet zero-shot classifier, which VPD averages for its NYUv2 scene tokens."""
    if template == "clip80":
        return read_names("clip80_templates.txt")
    if "{}" not in template:
        raise ValueError(f"model.class_template: {template!r} has no {{}} for the class name (or use clip80)")
    return [template]


def class_token_bank(
    explicit: ExplicitGuidance,
    names: list[str],
    template: str,
    kind: str,
    cache_dir: str | Path | None,
    max_length: int | None = None,
) -> torch.Tensor:
    """(C, D) class tokens, cached on disk: per name (underscores read as spaces, "living_room" -> "living
    room"), the embedding of each template averaged over the templates (VPD's scene tokens), truncated to
    ``max_length`` tokens.

    The cache key covers the names, templates, kind, length and a fingerprint of the text tower's weights, so
    another encoder or class list never reuses a stale bank.
    """
    templates = class_templates(template)
    fingerprint = hashlib.sha256()
    fingerprint.update(json.dumps([names, templates, kind, max_length]).encode())
    for tensor in (
        explicit.text_encoder.text_projection.weight,
        explicit.text_encoder.text_model.final_layer_norm.weight,
    ):
        fingerprint.update(tensor.detach().float().cpu().numpy().tobytes())
    key = fingerprint.hexdigest()[:24]
    root = (Path(cache_dir) if cache_dir else cache_root()) / "class_tokens"
    path = root / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)["class_tokens"]
    prompts = [t.format(name.replace("_", " ")) for name in names for t in templates]
    embeddings = torch.cat(
        [explicit.embed(prompts[i : i + 256], kind, max_length).float() for i in range(0, len(prompts), 256)]
    )
    bank = embeddings.view(len(names), len(templates), -1).mean(dim=1).cpu().contiguous()  # (C, D)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"class_tokens": bank}, tmp)
        os.replace(tmp, path)
    except OSError as error:  # a read-only cache only costs recomputation
        logger.warning("could not cache class tokens in %s: %s", root, error)
    return bank
