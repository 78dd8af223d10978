"""Loading Stable Diffusion (UNet + VAE) and CLIP (vision and text towers, tokenizer) from what the user has.

A diffusers folder or a single ``.safetensors``/``.ckpt`` file for Stable Diffusion, a transformers folder for
CLIP, or a Hub id where the user has network access (DESIGN §5).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import load_single_file_checkpoint
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from iedp.errors import InputError

logger = logging.getLogger(__name__)

_Tower = TypeVar("_Tower", CLIPVisionModelWithProjection, CLIPTextModelWithProjection)

_SD_EXPECTED = "expected a diffusers Stable Diffusion folder (unet/, vae/) or a .safetensors/.ckpt file"
_CLIP_EXPECTED = (
    "expected a transformers CLIP folder (config.json, vocab.json + merges.txt or tokenizer.json), "
    "e.g. openai/clip-vit-large-patch14"
)
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_TOKENIZER_FILE_SETS = (("vocab.json", "merges.txt"), ("tokenizer.json",))

# The original (LDM) v1-inference.yaml, reduced to the fields diffusers' single-file converter reads. Passing it
# keeps from_single_file offline: without it diffusers fetches the v1.5 diffusers config from the Hub.
_SD_V1_ORIGINAL_CONFIG = {
    "model": {
        "params": {
            "scale_factor": 0.18215,
            "unet_config": {
                "params": {
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2, 1],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4, 4],
                    "num_heads": 8,
                    "transformer_depth": 1,
                    "context_dim": 768,
                }
            },
            "first_stage_config": {
                "params": {
                    "ddconfig": {
                        "z_channels": 4,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 128,
                        "ch_mult": [1, 2, 4, 4],
                        "num_res_blocks": 2,
                    }
                }
            },
        }
    }
}
# A cross-attention key projection of the first UNet level: present only in an LDM-layout UNet, and its input
# width is the text context width (768 for v1.x, 1024 for v2.x).
_SD_V1_PROBE_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_SD_V1_CONTEXT_DIM = 768
_LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")


def _looks_local(path: str) -> bool:
    """True when ``path`` can only be a local path, so a typo is reported here rather than as a Hub lookup."""
    if os.path.isabs(path) or path.startswith((".", "~")) or path.endswith(_SINGLE_FILE_SUFFIXES):
        return True
    # A Hub id is "name" or "owner/name"; deeper paths, or ones whose first part exists here, are local.
    parts = Path(path).parts
    return len(parts) > 2 or "\\" in path or os.path.exists(parts[0])


def load_stable_diffusion(
    path: str, dtype: torch.dtype = torch.float32
) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """Load the Stable Diffusion UNet and VAE (eval mode, ``dtype``).

    Args:
        path: a diffusers folder with ``unet/`` and ``vae/``, a single SD v1.x ``.safetensors``/``.ckpt`` file
            (converted by diffusers), or a Hub id (passed to diffusers unchanged; needs network access).
        dtype: the parameters' dtype.

    Raises:
        InputError: a local path that does not exist, a folder without ``unet/`` or ``vae/``, or a file that is
            not a Stable Diffusion v1.x checkpoint.
    """
    if not path:
        raise InputError(f"model.sd: empty path; {_SD_EXPECTED}")
    local = Path(path).expanduser()
    if local.is_file():
        return _load_sd_single_file(local, dtype)
    if local.is_dir():
        for sub in ("unet", "vae"):
            if not (local / sub).is_dir():
                raise InputError(f"model.sd: {path} has no {sub}/ folder; {_SD_EXPECTED}")
        source = str(local)
    elif _looks_local(path):
        raise InputError(f"model.sd: {path} does not exist; {_SD_EXPECTED}")
    else:
        source = path
    logger.info("loading Stable Diffusion UNet and VAE from %s", source)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
    return unet, vae


def _load_sd_single_file(path: Path, dtype: torch.dtype) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """Convert a single original-layout (LDM) SD v1.x checkpoint; the file is read once for both models."""
    if path.suffix not in _SINGLE_FILE_SUFFIXES:
        raise InputError(f"model.sd: {path} is a file without a .safetensors/.ckpt suffix; {_SD_EXPECTED}")
    try:
        checkpoint = load_single_file_checkpoint(str(path))
    except (OSError, ValueError, RuntimeError) as error:
        raise InputError(
            f"model.sd: {path} is not a readable {path.suffix} checkpoint; {_SD_EXPECTED}"
        ) from error
    probe = checkpoint.get(_SD_V1_PROBE_KEY)
    has_vae = any(key.startswith(_LDM_VAE_PREFIXES) for key in checkpoint)
    if not isinstance(probe, torch.Tensor) or not has_vae:
        raise InputError(
            f"model.sd: {path} is not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet or "
            f"first_stage_model.* VAE weights); {_SD_EXPECTED}"
        )
    if probe.shape[-1] != _SD_V1_CONTEXT_DIM:
        raise InputError(
            f"model.sd: {path} has a text context of width {probe.shape[-1]}, not {_SD_V1_CONTEXT_DIM}: only "
            f"Stable Diffusion v1.x single files are converted here; pass a diffusers folder for other versions"
        )
    logger.info("converting single-file Stable Diffusion checkpoint %s", path)
    unet = UNet2DConditionModel.from_single_file(
        checkpoint, original_config=_SD_V1_ORIGINAL_CONFIG, torch_dtype=dtype
    )
    vae = AutoencoderKL.from_single_file(
        checkpoint, original_config=_SD_V1_ORIGINAL_CONFIG, torch_dtype=dtype
    )
    return unet, vae


def load_clip(
    path: str, dtype: torch.dtype = torch.float32, text: bool = True
) -> tuple[CLIPVisionModelWithProjection, CLIPTextModelWithProjection | None, CLIPTokenizer | None]:
    """Load CLIP's vision tower and, if ``text``, its text tower and tokenizer (eval mode, ``dtype``).

    Args:
        path: a transformers folder holding a full ``CLIPModel`` (config.json, weights, tokenizer files), such
            as openai/clip-vit-large-patch14, or a Hub id (passed to transformers unchanged).
        dtype: the parameters' dtype.
        text: also load the text tower and tokenizer; inference without labels needs only the vision tower.

    Returns:
        ``(vision, text_model, tokenizer)``; the last two are None when ``text`` is False. Both towers project
        into the same joint space: ``image_embeds`` and ``text_embeds`` are B x projection_dim.

    Raises:
        InputError: a local path that does not exist or is not a folder, or a folder without config.json or
            (when ``text``) tokenizer files.
    """
    if not path:
        raise InputError(f"model.clip: empty path; {_CLIP_EXPECTED}")
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise InputError(f"model.clip: {path} has no config.json; {_CLIP_EXPECTED}")
        has_tokenizer = any(all((local / name).is_file() for name in names) for names in _TOKENIZER_FILE_SETS)
        if text and not has_tokenizer:
            raise InputError(f"model.clip: {path} has no tokenizer files; {_CLIP_EXPECTED}")
        source = str(local)
    elif local.exists():
        raise InputError(f"model.clip: {path} is a file; {_CLIP_EXPECTED}")
    elif _looks_local(path):
        raise InputError(f"model.clip: {path} does not exist; {_CLIP_EXPECTED}")
    else:
        source = path
    logger.info("loading CLIP %s from %s", "vision and text towers" if text else "vision tower", source)
    vision = _load_clip_tower(CLIPVisionModelWithProjection, source, dtype)
    if not text:
        return vision, None, None
    text_model = _load_clip_tower(CLIPTextModelWithProjection, source, dtype)
    return vision, text_model, CLIPTokenizer.from_pretrained(source)


class _DropLoadReport(logging.Filter):
    """Drops transformers' per-load key table, which lists every weight of the other tower as unexpected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _load_clip_tower(cls: type[_Tower], source: str, dtype: torch.dtype) -> _Tower:
    """One CLIP tower with its projection from a full CLIPModel checkpoint; missing weights are an InputError.

    The library's report is replaced by this check because unexpected keys (the other tower) are normal here,
    while a missing key (e.g. no projection) would otherwise leave a randomly initialised layer behind a warning.
    """
    report_logger = logging.getLogger("transformers.modeling_utils")
    drop_report = _DropLoadReport()
    report_logger.addFilter(drop_report)
    try:
        model, info = cls.from_pretrained(source, dtype=dtype, output_loading_info=True)
    finally:
        report_logger.removeFilter(drop_report)
    missing = sorted(info["missing_keys"])
    if missing:
        raise InputError(
            f"model.clip: {source} lacks {len(missing)} weights of {cls.__name__} (e.g. {missing[0]}); "
            f"{_CLIP_EXPECTED}"
        )
    logger.debug("%s: skipped %d weights of the other tower", cls.__name__, len(info["unexpected_keys"]))
    return model.eval()
