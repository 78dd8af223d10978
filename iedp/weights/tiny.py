"""The tiny preset: SD v1.5's and CLIP ViT-L/14's classes at small widths, saved in the standard formats.

It is loaded back through the same loaders as real weights, so tests and the CPU demo exercise the real loading
code without downloading anything (DESIGN §5).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from iedp.cache import build_cached, cache_root
from iedp.weights.tokenizer import write_tiny_tokenizer

# The cache key of the tiny preset: bump it whenever make_tiny's output changes (sizes, vocabulary, seed use),
# including when the shipped class or scene lists change, since the tokenizer is trained on them.
TINY_VERSION = "2"

# The tiny VAE's widths. Its outer level once had 8 channels in 8 norm groups: each group one channel, so every
# GroupNorm there removed each channel's mean, colour included. Wider levels with several channels per group let
# colour through, but it is still learnt late (see the pre-training report).
VAE_CHANNELS = (32, 32, 64, 64)
VAE_NORM_GROUPS = 8  # 4 channels per group at the outer level


def tiny_weights_dir() -> Path:
    """The tiny preset's folder, ``cache_root()/tiny-<TINY_VERSION>``, built on first use."""
    return build_cached(cache_root() / f"tiny-{TINY_VERSION}", make_tiny, "the tiny preset")


def make_tiny(out_dir: str | Path, seed: int = 0, layers_per_block: int = 1) -> Path:
    """Write the tiny preset: SD v1.5's and CLIP ViT-L/14's classes and layout at small widths.

    ``out_dir/unet``, ``out_dir/vae``: diffusers folders (safetensors). ``out_dir/clip``: a transformers
    ``CLIPModel`` folder with a CLIP tokenizer whose BPE vocabulary is trained here on the prompt words
    (ADE20K class names, NYUv2 scene names, "a photo of a ..."). Same ``seed``, same weights.

    Sizes: UNet block_out_channels (32, 32, 64, 64), 2 heads, cross_attention_dim 32 (SD: 320..1280, 768);
    VAE block_out_channels (VAE_CHANNELS), factor 8, 4 latent channels; CLIP vision hidden 64, 4 layers,
    64 x 64 images in 8 x 8 patches (65 tokens); CLIP text hidden 32 (the UNet's context width, as 768 in SD),
    3 layers, 77 positions; projection 32.

    Args:
        out_dir: created if missing.
        seed: seeds every weight initialisation (the global RNG state is restored afterwards).
        layers_per_block: resnet layers per UNet and VAE block (SD v1.5 has 2; 1 keeps the preset fast).
    """
    out = Path(out_dir)
    clip_dir = out / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tiny_tokenizer(clip_dir)
    projection_dim = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=layers_per_block,
            # diffusers' legacy name: this is the number of heads (SD v1.5: 8).
            attention_head_dim=2,
            cross_attention_dim=projection_dim,
            norm_num_groups=8,
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=VAE_CHANNELS,
            layers_per_block=layers_per_block,
            latent_channels=4,
            norm_num_groups=VAE_NORM_GROUPS,
            sample_size=64,
        )
        torch.manual_seed(seed)
        clip = CLIPModel(_tiny_clip_config(tokenizer, projection_dim))
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    clip.save_pretrained(clip_dir, safe_serialization=True)
    return out


def _tiny_clip_config(tokenizer: CLIPTokenizer, projection_dim: int) -> CLIPConfig:
    """CLIP ViT-L/14's layout (pre-norm ViT, causal text transformer, 77 positions) at small widths."""
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "max_position_embeddings": tokenizer.model_max_length,
        # The pooled text feature is read at the first end-of-text token, found by this id.
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        # Each tower's config carries the projection width too (as in openai/clip-vit-large-patch14), so a
        # tower loaded alone from the full CLIPModel folder builds a projection of the right size.
        "projection_dim": projection_dim,
    }
    vision_config = {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,
        "projection_dim": projection_dim,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
