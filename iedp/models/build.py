"""Building an :class:`IEDPModel` from a model config and pretrained parts."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionModelWithProjection

from iedp.classes import load_class_names
from iedp.config import ModelConfig
from iedp.models.backbone import DiffusionBackbone
from iedp.models.guidance import ExplicitGuidance, ImplicitGuidance, class_token_bank
from iedp.models.iedp import IEDPModel
from iedp.models.tasks import TASKS
from iedp.weights import load_clip, load_stable_diffusion, resolve_weights


def assemble_model(
    config: ModelConfig,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    image_encoder: CLIPVisionModelWithProjection,
    explicit: ExplicitGuidance | None,
    class_tokens: torch.Tensor,
    class_names: list[str],
) -> IEDPModel:
    """Wire already-loaded parts together (shared by :func:`build_model` and checkpoint loading)."""
    capture = TASKS[config.task].class_tokens_lead and config.attention_maps
    backbone = DiffusionBackbone(
        unet, vae, config.latent_scale, num_class_tokens=len(class_names) if capture else 0
    )
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    backbone.vae_slicing = config.vae_slicing
    if config.compile_vae:
        backbone.compile_encoder()
    if config.compile_unet:
        backbone.compile_unet()
    implicit = ImplicitGuidance(image_encoder, "hidden" if config.implicit == "queries" else config.implicit)
    return IEDPModel(config, backbone, implicit, explicit, class_tokens, class_names)


def load_explicit(config: ModelConfig) -> ExplicitGuidance:
    """The frozen CLIP text branch, from the config's weights."""
    _, clip_path = resolve_weights(config.weights, config.sd, config.clip)
    _, text_encoder, tokenizer = load_clip(clip_path, text=True)
    return ExplicitGuidance(text_encoder, tokenizer, config.explicit_tokens)


def build_model(config: ModelConfig, with_text: bool = True) -> IEDPModel:
    """Load SD + CLIP from ``config.weights`` (or ``tiny``), compute the class-token bank and build the model.

    ``with_text=False`` drops the text tower once the bank is computed (inference of vpd / implicit / iedp).
    """
    sd_path, clip_path = resolve_weights(config.weights, config.sd, config.clip)
    unet, vae = load_stable_diffusion(sd_path)
    image_encoder, text_encoder, tokenizer = load_clip(clip_path, text=True)
    explicit = ExplicitGuidance(text_encoder, tokenizer, config.explicit_tokens)
    names = load_class_names(config.classes)
    bank = class_token_bank(
        explicit,
        names,
        config.class_template,
        config.class_embedding,
        config.cache_dir,
        config.class_max_length,
    )
    return assemble_model(config, unet, vae, image_encoder, explicit if with_text else None, bank, names)
