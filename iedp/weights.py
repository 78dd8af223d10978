"""Pretrained parts: Stable Diffusion (UNet + VAE), CLIP (vision and text towers, tokenizer), and the tiny preset.

Users point at weights they already have (DESIGN §5): a diffusers folder or a single ``.safetensors``/``.ckpt``
file for Stable Diffusion, a transformers folder for CLIP, or a Hub id where they have network access. The
tiny preset builds the same classes at small widths, saves them in the same formats and is loaded back through
the same functions, so tests and the CPU demo exercise the real loading code without downloading anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import load_single_file_checkpoint
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from iedp.errors import InputError
from iedp.resources import read_names

logger = logging.getLogger(__name__)

_Tower = TypeVar("_Tower", CLIPVisionModelWithProjection, CLIPTextModelWithProjection)

# The cache key of the tiny preset: bump it whenever make_tiny's output changes (sizes, vocabulary, seed use),
# including when the shipped class or scene lists change, since the tokenizer is trained on them.
TINY_VERSION = "2"

# The tiny VAE's widths. Its outer level once had 8 channels in 8 norm groups: each group one channel, so every
# GroupNorm there removed each channel's mean, colour included. Wider levels with several channels per group let
# colour through, but it is still learnt late (see the pre-training report).
VAE_CHANNELS = (32, 32, 64, 64)
VAE_NORM_GROUPS = 8  # 4 channels per group at the outer level

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

# CLIP's own text pipeline (transformers.CLIPTokenizer): NFC, whitespace collapse, lowercase, CLIP's split regex,
# then GPT-2 byte-level symbols; BPE marks the end of a word with </w>.
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_END_OF_WORD = "</w>"


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


def resolve_weights(weights: str, sd: str | None = None, clip: str | None = None) -> tuple[str, str]:
    """Paths of the Stable Diffusion and CLIP weights: ``(sd_path, clip_path)``.

    Args:
        weights: ``"tiny"`` (the tiny preset, built once into the cache), ``"tiny-pretrained"`` (the tiny
            preset pre-trained on synthetic scenes by :mod:`iedp.pretrain`, shipped with the package; rebuilt
            into the cache only if the shipped copy is stale) or a folder holding SD (``unet/``, ``vae/``) and a
            ``clip/`` subfolder.
        sd: overrides the SD part, e.g. a single ``.safetensors`` file.
        clip: overrides the CLIP part, e.g. a separate CLIP folder.
    """
    if sd is not None and clip is not None:
        return sd, clip
    if weights == "tiny":
        base = tiny_weights_dir()
    elif weights == "tiny-pretrained":
        from iedp.pretrain import pretrained_tiny_dir  # imports this module: import it only when needed

        base = pretrained_tiny_dir()
    else:
        base = Path(weights).expanduser()
        if not base.is_dir():
            raise InputError(
                f"model.weights: {weights} is not a folder; expected 'tiny', 'tiny-pretrained' or a folder with "
                f"unet/, vae/ and clip/ (or set model.sd and model.clip)"
            )
    return (sd if sd is not None else str(base)), (clip if clip is not None else str(base / "clip"))


def cache_root() -> Path:
    """Where built weights and class-token banks are cached: ``$IEDP_CACHE`` or ``~/.cache/iedp``."""
    return Path(os.environ.get("IEDP_CACHE") or "~/.cache/iedp").expanduser()


def build_cached(target: Path, build: Callable[[Path], object], what: str) -> Path:
    """``target``, built by ``build(folder)`` on first use.

    The build goes to a temporary folder beside the target and is renamed into place, so a crash never leaves
    a half-built folder and concurrent builders (e.g. one per training process) all end with one complete folder.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        logger.info("building %s into %s (cached for later runs)", what, target)
        build(staging)
        os.replace(staging, target)
    except OSError:
        # Another process renamed its build into place first; keep theirs.
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
    tokenizer = _write_tiny_tokenizer(clip_dir)
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


def _tiny_prompt_corpus() -> list[str]:
    """The prompts the tokenizer is trained on: every shipped class and scene name in iedp's prompt forms."""
    names = read_names("ade20k_classes.txt") + [
        name.replace("_", " ") for name in read_names("nyu_scenes.txt")
    ]
    # The words of the pre-training captions ("... with white walls, a red sofa and two chairs"), so each is one
    # token too.
    from iedp.data.synthetic import SYNTHETIC_CLASSES  # imports the data package: only when building
    from iedp.pretrain.data import COLOUR_WORDS, COUNT_WORDS, plural

    words = [*COLOUR_WORDS, *COUNT_WORDS, *(plural(name) for name in SYNTHETIC_CLASSES)]
    return [f"a photo of a {name}." for name in names] + [
        "a photo of a wall, floor, bed and lamp",
        f"a photo of a kitchen with {', '.join(words)} and walls",
    ]


def _clip_pre_tokenizer() -> Tokenizer:
    """CLIP's normalizer and pre-tokenizer (as in transformers.CLIPTokenizer), used to split the corpus."""
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


def learn_bpe_merges(word_counts: Counter[tuple[str, ...]]) -> list[tuple[str, str]]:
    """Byte-pair merges learned until every word is one symbol; ties go to the smallest pair, so it is deterministic.

    Args:
        word_counts: each word as a tuple of symbols, with its count.

    The tokenizers library's BpeTrainer breaks ties in hash order, which differs between processes; the corpus
    here is a few hundred words, so plain Python is fast enough.
    """
    words = dict(word_counts)
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in pairwise(symbols):
                pair_counts[pair] += count
        if not pair_counts:
            return merges
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        words = {_merge_pair(symbols, best): count for symbols, count in words.items()}


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def _write_tiny_tokenizer(clip_dir: Path) -> CLIPTokenizer:
    """Learn a byte-level BPE on the prompt corpus, write it as CLIP's vocab.json + merges.txt, load it back.

    The vocabulary has CLIP's layout: the 256 byte symbols, the same with ``</w>``, one token per merge in
    merge order, then ``<|startoftext|>`` and ``<|endoftext|>``. Every corpus word becomes one token, and any
    other text still encodes through the byte symbols, in more tokens.
    """
    pre_tokenizer = _clip_pre_tokenizer()
    word_counts: Counter[tuple[str, ...]] = Counter()
    for prompt in _tiny_prompt_corpus():
        normalized = pre_tokenizer.normalizer.normalize_str(prompt)
        for word, _ in pre_tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
            word_counts[(*word[:-1], word[-1] + _END_OF_WORD)] += 1
    merges = learn_bpe_merges(word_counts)

    # Sorted, the byte-level alphabet is in bytes_to_unicode's order: printable bytes first, then 256 + n.
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = byte_symbols + [symbol + _END_OF_WORD for symbol in byte_symbols]
    tokens += [left + right for left, right in merges] + [_BOS, _EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    (clip_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = [f"{left} {right}" for left, right in merges]
    # CLIP's reference tokenizer skips the first line of merges.txt, so keep the usual version header.
    (clip_dir / "merges.txt").write_text("\n".join(["#version: 0.2", *merge_lines]) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir, model_max_length=77)
    tokenizer.save_pretrained(clip_dir)
    return tokenizer
