"""Language guidance from frozen CLIP: the implicit (image) branch, the explicit (label prompt) branch and the
class-token bank. Their outputs live in CLIP's joint space, which is why an image embedding can stand in for a
text embedding in the UNet's cross-attention.
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

from iedp.weights import cache_root

logger = logging.getLogger(__name__)


class ImplicitGuidance(nn.Module):
    """Frozen CLIP vision tower: image -> guidance tokens (B, T, D).

    ``tokens="pooled"`` gives the projected ``image_embeds`` (T=1); ``"patches"`` gives every token of the last
    layer through the post-layernorm and the visual projection (T = 1 + patches, 257 for ViT-L/14 at 224).
    """

    def __init__(self, image_encoder: CLIPVisionModelWithProjection, tokens: str = "pooled") -> None:
        super().__init__()
        if tokens not in ("pooled", "patches"):
            raise ValueError(f"model.implicit_tokens: {tokens!r} is not one of pooled, patches")
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        self.tokens = tokens
        self.image_size = image_encoder.config.image_size
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
        if self.tokens == "pooled":
            return output.image_embeds[:, None]  # (B, 1, D)
        hidden = self.image_encoder.vision_model.post_layernorm(output.last_hidden_state)
        return self.image_encoder.visual_projection(hidden)  # (B, T, D)


class ExplicitGuidance(nn.Module):
    """Frozen CLIP text tower: prompts -> one projected text token each, (B, 1, D). Training only."""

    def __init__(self, text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer) -> None:
        super().__init__()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer

    def train(self, mode: bool = True) -> ExplicitGuidance:
        return super().train(False)

    @torch.no_grad()
    def embed(self, prompts: list[str], kind: str = "projected") -> torch.Tensor:
        """(len(prompts), D): ``projected`` text_embeds, or the un-projected ``pooled`` output (VPD's choice).
        Prompts longer than the tokenizer's 77 tokens are truncated."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.text_encoder.device)
        if kind not in ("projected", "pooled"):
            raise ValueError(f"model.class_embedding: {kind!r} is not one of projected, pooled")
        pooled = self.text_encoder.text_model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        ).pooler_output
        return self.text_encoder.text_projection(pooled) if kind == "projected" else pooled

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.embed(prompts)[:, None]  # (B, 1, D)


def class_token_bank(
    explicit: ExplicitGuidance, names: list[str], template: str, kind: str, cache_dir: str | Path | None
) -> torch.Tensor:
    """(C, D) class tokens, one ``template.format(name)`` embedding per name, cached on disk.

    The cache key covers the names, template, kind and a fingerprint of the text tower's weights, so another
    encoder or class list never reuses a stale bank.
    """
    fingerprint = hashlib.sha256()
    fingerprint.update(json.dumps([names, template, kind]).encode())
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
    bank = torch.cat(
        [
            explicit.embed([template.format(n) for n in names[i : i + 64]], kind)
            for i in range(0, len(names), 64)
        ]
    )
    bank = bank.float().cpu().contiguous()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"class_tokens": bank}, tmp)
        os.replace(tmp, path)
    except OSError as error:  # a read-only cache only costs recomputation
        logger.warning("could not cache class tokens in %s: %s", root, error)
    return bank
