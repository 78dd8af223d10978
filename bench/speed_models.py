"""The models bench/speed.py measures: real-size or tiny pretrained parts, the ``iedp`` ADE20K segmentation model
assembled from them, and the VPD-style attention baseline that the same weights switch to.

The architectures are real size (SD v1.5 UNet and VAE, CLIP ViT-L/14 towers) with random weights from a fixed
seed, so nothing is downloaded; the tiny preset goes through iedp's own loaders instead (tests).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from diffusers.models.attention_processor import Attention, AttnProcessor
from transformers import (
    CLIPConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from iedp.classes import load_class_names
from iedp.config import ModelConfig
from iedp.engine.inference import resolve_dtype
from iedp.engine.inference import unet_channels_last as default_unet_channels_last
from iedp.models.attention import AttentionStore
from iedp.models.build import assemble_model
from iedp.models.guidance import ExplicitGuidance
from iedp.models.iedp import IEDPModel

# The LDM v1-inference.yaml fields that iedp carries for offline single-file loading; diffusers' own converters
# turn it into the SD v1.5 UNet and VAE configs (320/640/1280/1280, 2 layers per block, 8 heads, context 768).
from iedp.weights import _SD_V1_ORIGINAL_CONFIG, load_clip, load_stable_diffusion, make_tiny, resolve_weights

VARIANTS = ("ours", "baseline")  # attention alone; dtype and memory format as the worker's flags say


class Configuration(NamedTuple):
    """Everything a user's choice changes at once. The weights are held in the autocast dtype, as
    ``iedp predict`` holds them (``for_inference``), unless ``weights_dtype`` says otherwise."""

    attention: str  # a VARIANTS entry: our processors or the classic ones
    dtype: str | None  # autocast dtype; None: iedp's default on the device
    vae_channels_last: bool | None  # the VAE encoder's input; None: the backbone's default on the device
    vae_slicing: bool
    # The UNet's weights (and so its activations) in channels_last; None: iedp's default for the device and dtype
    unet_channels_last: bool | None = None
    weights_dtype: str | None = None  # the dtype the weights are held in; None: the autocast dtype


CONFIGURATIONS = {
    "ours-default": Configuration("ours", None, None, True),
    "vpd-config": Configuration("baseline", "fp32", False, False, unet_channels_last=False),
    "ours-default-contiguous": Configuration("ours", None, False, True),
    "ours-default-unet-channels-last": Configuration("ours", None, None, True, unet_channels_last=True),
    "ours-default-unet-contiguous": Configuration("ours", None, None, True, unet_channels_last=False),
    # ours-default's autocast over fp32 weights: a Pipeline over a model passed in (and iedp.load before 2026-11-29)
    "ours-default-fp32-weights": Configuration(
        "ours", None, None, True, unet_channels_last=False, weights_dtype="fp32"
    ),
}
PROMPT = "a photo of a wall, floor, ceiling, bed and lamp"  # an explicit-branch label prompt


@dataclass
class Parts:
    """The pretrained parts an IEDP model is assembled from."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    text_encoder: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer


def clip_vit_l14_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    """CLIP ViT-L/14's sizes (openai/clip-vit-large-patch14); the special-token ids follow ``tokenizer``."""
    return CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
            # The pooled text feature is read at the end-of-text token, found by this id.
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        projection_dim=768,
    )


def tiny_tokenizer() -> CLIPTokenizer:
    """The tiny preset's CLIP tokenizer, built in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(make_tiny(tmp) / "clip")


def real_size_parts(device: torch.device, seed: int) -> Parts:
    """SD v1.5's UNet and VAE and CLIP ViT-L/14's towers at full size, randomly initialised on ``device``."""
    tokenizer = tiny_tokenizer()
    clip_config = clip_vit_l14_config(tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(_SD_V1_ORIGINAL_CONFIG, {}))
        vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(_SD_V1_ORIGINAL_CONFIG, {}))
        image_encoder = CLIPVisionModelWithProjection(clip_config.vision_config)
        text_encoder = CLIPTextModelWithProjection(clip_config.text_config)
    return Parts(unet.eval(), vae.eval(), image_encoder.eval(), text_encoder.eval(), tokenizer)


def tiny_parts(device: torch.device) -> Parts:
    """The tiny preset, through iedp's loaders."""
    sd_path, clip_path = resolve_weights("tiny")
    unet, vae = load_stable_diffusion(sd_path)
    image_encoder, text_encoder, tokenizer = load_clip(clip_path)
    return Parts(
        unet.to(device), vae.to(device), image_encoder.to(device), text_encoder.to(device), tokenizer
    )


def build_seg_model(parts: Parts, seed: int, gradient_checkpointing: bool, width: int) -> IEDPModel:
    """The ``iedp`` ADE20K segmentation model (150 classes, random class tokens) with FPN neck/head ``width``."""
    names = load_class_names("ade20k")
    class_tokens = torch.randn(
        len(names), parts.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(seed)
    )
    config = ModelConfig(
        task="seg",
        method="iedp",
        classes="ade20k",
        neck_channels=width,
        head_channels=width,
        gradient_checkpointing=gradient_checkpointing,
    )
    torch.manual_seed(seed)  # adapter, neck and head weights
    explicit = ExplicitGuidance(parts.text_encoder, parts.tokenizer)
    model = assemble_model(config, parts.unet, parts.vae, parts.image_encoder, explicit, class_tokens, names)
    return model.to(parts.unet.device)


def build_parts(tiny: bool, device: torch.device, seed: int) -> Parts:
    return tiny_parts(device) if tiny else real_size_parts(device, seed)


def parameter_counts(model: IEDPModel) -> dict[str, int]:
    parts = {
        "unet": model.unet,
        "vae": model.backbone.vae,
        "clip_vision": model.implicit,
        "clip_text": model.explicit,
        "trainable": model,
    }
    return {
        name: sum(p.numel() for p in part.parameters() if name != "trainable" or p.requires_grad)
        for name, part in parts.items()
    }


def prepare(model: IEDPModel, dtype: str, channels_last: bool) -> None:
    """bf16 as in training (frozen parts cast, autocast at call time); channels_last for the VAE and UNet."""
    if dtype == "bf16":
        for part in model.frozen_modules():
            part.to(torch.bfloat16)
    if channels_last:
        model.backbone.unet.to(memory_format=torch.channels_last)
        model.backbone.vae.to(memory_format=torch.channels_last)


def make_batch(batch_size: int, size: int, num_classes: int, device: torch.device, seed: int) -> dict:
    """A segmentation batch: images in [-1, 1], random labels, one label prompt per image."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1
    labels = torch.randint(0, num_classes, (batch_size, size, size), generator=generator)
    return {"image": images.to(device), "label": labels.to(device), "prompt": [PROMPT] * batch_size}


# -- the VPD-style baseline -----------------------------------------------------------------------------------
class VPDCaptureProcessor:
    """VPD's capture: the full (B·heads, N, T) probabilities from ``attn.get_attention_scores``, their class-token
    columns averaged over heads into ``store``, the output from the same probabilities (no fused kernel)."""

    def __init__(self, store: AttentionStore) -> None:
        self.store = store

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("VPDCaptureProcessor is for unmasked cross-attention layers (attn2) only")
        residual = hidden_states
        B, N, _ = hidden_states.shape  # N = h·w queries
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B·heads, N, head_dim)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B·heads, T, head_dim)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key)  # (B·heads, N, T)
        C = self.store.num_class_tokens
        self.store.add(probs.view(B, attn.heads, N, -1)[..., :C].mean(dim=1))  # (B, N, C)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))  # (B, N, heads·head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AttentionVariants:
    """Switches one model between our attention processors and the VPD-style baseline: the same weights."""

    def __init__(self, model: IEDPModel) -> None:
        self.model = model
        backbone = model.backbone
        self.backbone, self.unet, self.vae = backbone, backbone.unet, backbone.vae
        capture = set(backbone.capture_layers()) if backbone.map_strides else set()
        ours_unet = self.unet.attn_processors
        baseline_unet = {
            name: VPDCaptureProcessor(backbone.store) if name in capture else AttnProcessor()
            for name in ours_unet
        }
        baseline_vae = {name: AttnProcessor() for name in self.vae.attn_processors}
        self.processors = {
            "ours": (ours_unet, self.vae.attn_processors),
            "baseline": (baseline_unet, baseline_vae),
        }

    def use(self, variant: str) -> None:
        """Install ``variant``'s processors: an attention variant, or a configuration's (with its VAE input
        memory format, its weights' dtype and its VAE slicing; the attention variants leave the dtype and the
        slicing as the caller made them).

        Switching configurations casts the weights back and forth, so after a bf16 configuration the fp32 weights
        hold bf16-rounded values: the same amount of work, not the same outputs."""
        if variant in CONFIGURATIONS:
            configuration = CONFIGURATIONS[variant]
            attention, channels_last = configuration.attention, configuration.vae_channels_last
            device = next(self.model.parameters()).device
            dtype = resolve_dtype(configuration.dtype, device)
            self.model.to(dtype=resolve_dtype(configuration.weights_dtype or dtype, device))
            self.backbone.vae_slicing = configuration.vae_slicing
            unet_channels_last = configuration.unet_channels_last
            if unet_channels_last is None:
                unet_channels_last = default_unet_channels_last(device, dtype)
            unet_format = torch.channels_last if unet_channels_last else torch.contiguous_format
            self.unet.to(memory_format=unet_format)
        else:
            attention, channels_last = variant, False
        unet_processors, vae_processors = self.processors[attention]
        # set_attn_processor pops from the dict it is given, so it gets copies.
        self.unet.set_attn_processor(dict(unet_processors))
        self.vae.set_attn_processor(dict(vae_processors))
        self.backbone.encoder_channels_last = channels_last
