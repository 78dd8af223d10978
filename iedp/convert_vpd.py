"""Import VPD's released checkpoints (wl-zhao/VPD: ADE20K segmentation, NYUv2 depth) as iedp checkpoints.

VPD's files are PyTorch pickles of its own modules' state dicts. They are read with ``weights_only=True`` (tensors
and plain containers only; a file that needs code to load is refused), and every key is accounted for:

- the LDM-layout UNet (``[encoder.]unet.unet.diffusion_model.*``) and VAE encoder (``[encoder.]encoder_vq.*``) go
  through diffusers' own single-file converters;
- the text adapter, class / scene embeddings, FPN neck, Semantic-FPN head (segmentation) and depth decoder are
  renamed by the tables below, built from our model's own parameter names so nothing is matched by accident;
- the diffusion schedule buffers VPD's segmentor keeps (``sd_model.betas`` ...) are dropped: a one-step backbone
  never reads them.

Anything left over is an unknown key, anything of ours without a source is a missing key; both are errors that list
the names. The parts VPD's file lacks are frozen and come from ``weights`` (Stable Diffusion v1.5 and CLIP, the same
folder as ``model.weights``): the VAE decoder, the UNet's noise-prediction output (deleted in VPD's depth model) and
the CLIP vision tower every iedp checkpoint carries (method ``vpd`` never runs it).
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import (
    LDM_UNET_KEY,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from torch import nn

from iedp.classes import load_class_names
from iedp.config import Config, config_from_dict, load_config
from iedp.errors import InputError
from iedp.model_files import save_model
from iedp.models.build import assemble_model
from iedp.models.iedp import IEDPModel
from iedp.weights import load_clip, load_stable_diffusion, resolve_weights

logger = logging.getLogger(__name__)

TASKS = ("seg", "depth")
_LDM_VAE_KEY = "first_stage_model."
# Our parameters that VPD's file may lack; they keep the frozen pretrained (or freshly built) values.
_FROM_BASE = (
    "implicit.",  # CLIP vision tower
    "implicit_queries.",  # trainable queries of the implicit branch: not part of method vpd
    "backbone.vae.decoder.",
    "backbone.vae.post_quant_conv.",
    "backbone.unet.conv_norm_out.",  # the noise prediction, never read by the backbone (VPD depth deletes it)
    "backbone.unet.conv_out.",
)
# ldm.models.diffusion.ddpm's registered schedule buffers, kept by VPD's segmentor in ``sd_model``.
_DDPM_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "lvlb_weights",
        "scale_factor",
        "logvar",
    }
)
_SHOWN = 8  # names listed per error message


@dataclass(frozen=True)
class VPDLayout:
    """Where one of VPD's task models keeps its parts, and our recipe for the task."""

    recipe: str  # the shipped iedp recipe the converted checkpoint's config starts from
    classes: str  # class (seg) or scene (depth) list, in VPD's embedding order
    unet: str  # prefix of the LDM UNet
    vae: str  # prefix of the LDM VAE (encoder and quant convs; VPD deletes the decoder)
    ignored: frozenset[str]  # keys with no counterpart (schedule buffers)
    renames: tuple[tuple[str, str], ...]  # (our name pattern, VPD name template), first full match wins


# VPDSeg (segmentation/models/vpd_seg.py) with mmseg's FPN neck and FPNHead: ConvModule keeps ``conv`` and ``bn``.
SEG = VPDLayout(
    recipe="ade20k_vpd",
    classes="ade20k",
    unet="unet.unet.diffusion_model.",
    vae="encoder_vq.",
    ignored=frozenset(f"sd_model.{name}" for name in _DDPM_BUFFERS),
    renames=(
        (r"class_tokens", "class_embeddings"),
        (r"adapter\.gamma", "gamma"),
        (r"adapter\.mlp\.(\d+)\.(\w+)", r"text_adapter.fc.\1.\2"),
        (r"neck\.lateral_convs\.(\d+)\.(\w+)", r"neck.lateral_convs.\1.conv.\2"),
        (r"neck\.output_convs\.(\d+)\.(\w+)", r"neck.fpn_convs.\1.conv.\2"),
        (r"head\.scale_heads\.(\d+)\.(\d+)\.0\.(\w+)", r"decode_head.scale_heads.\1.\2.conv.\3"),
        (r"head\.scale_heads\.(\d+)\.(\d+)\.1\.(\w+)", r"decode_head.scale_heads.\1.\2.bn.\3"),
        (r"head\.classifier\.(\w+)", r"decode_head.conv_seg.\1"),
    ),
)
# VPDDepth (depth/models_depth/model.py): the fusion convs sit in its encoder, the deconvolutions in its decoder.
# ``head.decoder.<conv>`` / ``<conv + 1>``, its conv3x3 and BN after the deconvolutions, are added per model.
DEPTH = VPDLayout(
    recipe="nyu_vpd",
    classes="nyu_scenes",  # shipped in VPD's nyu_class_list.json order
    unet="encoder.unet.unet.diffusion_model.",
    vae="encoder.encoder_vq.",
    ignored=frozenset(),
    renames=(
        (r"class_tokens", "encoder.class_embeddings"),
        (r"adapter\.gamma", "encoder.gamma"),
        (r"adapter\.mlp\.(\d+)\.(\w+)", r"encoder.text_adapter.fc.\1.\2"),
        (r"head\.reduce0\.(\d+)\.(\w+)", r"encoder.layer1.\1.\2"),
        (r"head\.reduce1\.(\w+)", r"encoder.layer2.0.\1"),
        (r"head\.fuse\.(\d+)\.(\w+)", r"encoder.out_layer.\1.\2"),
        (r"head\.predict\.(\d+)\.(\w+)", r"last_layer_depth.\1.\2"),
    ),
)
LAYOUTS = {"seg": SEG, "depth": DEPTH}


def read_vpd_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside one of VPD's files, without unpickling code.

    Accepts mmseg's ``{"meta", "state_dict", "optimizer"}``, VPD depth's ``{"model", "optimizer"}`` and a bare state
    dict; a DistributedDataParallel ``module.`` prefix is dropped, and so is an mmseg ``backbone.`` prefix.

    Raises:
        InputError: no such file, not a PyTorch file, a file that needs more than tensors and plain containers to
            load, or no state dict inside.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected one of VPD's released checkpoints (.pth)")
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        is_pickle = f.read(1) == b"\x80"  # the legacy format starts with a pickle protocol marker
    if not (is_zip or is_pickle):
        raise InputError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip nor its legacy format)")
    try:
        # The zip format can be memory-mapped, so a multi-GB file is not read into memory up front.
        with warnings.catch_warnings():  # torch's three-line note on old pickles, before our one-line verdict
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused or "Weights only load failed" in str(error):
            what = f"Python object {refused.group(1)}" if refused else "more than tensors"
            raise InputError(
                f"{path}: refusing to load: the file needs {what} to unpickle, and only tensors and plain "
                f"containers are read (torch.load weights_only=True)"
            ) from None
        raise InputError(f"{path}: not a PyTorch checkpoint ({error})") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    state = loaded
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise InputError(
            f"{path}: no state dict found (expected a mapping of names to tensors, possibly under 'state_dict' "
            f"or 'model')"
        )
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return {key.removeprefix("backbone."): value for key, value in state.items()}


def _listed(names: list[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _convert_ldm(
    source: dict[str, torch.Tensor],
    prefix: str,
    ldm_prefix: str,
    convert: Callable[[dict, dict], dict],
    config: dict,
    ours: str,
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Run one of diffusers' LDM converters on ``source``'s keys under ``prefix``.

    Returns ``(tensors under our names, our name -> VPD name, VPD names the converter did not use)``. The
    converters rename (and at most slice) tensors, so each output is traced back to its input by its memory.
    """
    ldm = {ldm_prefix + key[len(prefix) :]: value for key, value in source.items() if key.startswith(prefix)}
    if not ldm:
        return {}, {}, []
    vpd_name = {key: prefix + key[len(ldm_prefix) :] for key in ldm}
    try:
        converted = convert(ldm, config)
    except (KeyError, IndexError) as error:
        raise InputError(
            f"the LDM weights under {prefix} do not have Stable Diffusion's layout ({error})"
        ) from None
    origin = {value.data_ptr(): vpd_name[key] for key, value in ldm.items()}
    tensors, names = {}, {}
    for key, value in converted.items():
        if value is None:  # the converter's lookup of a key the file lacks
            continue
        tensors[ours + key] = value
        names[ours + key] = origin.get(value.data_ptr(), prefix + "?")
    used = set(names.values())
    return tensors, names, [name for name in vpd_name.values() if name not in used]


def _depth_decoder_renames(head: nn.Module) -> tuple[tuple[str, str], ...]:
    """Our ``head.decoder`` is VPD's deconv layers followed by its conv3x3 + BN (``decoder.conv_layers``)."""
    conv = next(i for i, layer in enumerate(head.decoder) if type(layer) is nn.Conv2d)
    return (
        (rf"head\.decoder\.{conv}\.(\w+)", r"decoder.conv_layers.0.\1"),
        (rf"head\.decoder\.{conv + 1}\.(\w+)", r"decoder.conv_layers.1.\1"),
        (r"head\.decoder\.(\d+)\.(\w+)", r"decoder.deconv_layers.\1.\2"),
    )


def _vpd_name(key: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, template in renames:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(template)
    return None


def _absolute(path: str | None) -> str | None:
    """A local path as an absolute one, so the checkpoint works from any directory; other values unchanged."""
    if path is None or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


def _widths(task: str, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Head widths read off VPD's tensors, so the model is built to match the file."""
    probes = (
        {
            "neck_channels": ("neck.lateral_convs.0.conv.weight", 0),
            "head_channels": ("decode_head.conv_seg.weight", 1),
        }
        if task == "seg"
        else {
            "depth_fuse_channels": ("encoder.out_layer.0.weight", 0),
            "depth_deconv_channels": ("decoder.deconv_layers.0.weight", 1),
            "depth_head_channels": ("decoder.conv_layers.0.weight", 0),
        }
    )
    return {name: state[key].shape[dim] for name, (key, dim) in probes.items() if key in state}


def convert_vpd(
    checkpoint: str | Path,
    task: str,
    out: str | Path,
    weights: str,
    sd: str | None = None,
    clip: str | None = None,
) -> Path:
    """Convert one of VPD's released checkpoints into an iedp checkpoint folder (method ``vpd``).

    Args:
        checkpoint: VPD's file (ADE20K: mmseg ``.pth``; NYUv2: ``{"model": ...}`` ``.pth``).
        task: ``seg`` or ``depth``.
        out: the checkpoint folder to write (replaced atomically if it exists).
        weights: Stable Diffusion v1.5 + CLIP ViT-L/14 for the frozen parts VPD's file lacks, as ``model.weights``.
        sd, clip: override the SD / CLIP part, as ``model.sd`` / ``model.clip``.

    Raises:
        InputError: an unreadable or unsafe file, keys of VPD's file with no counterpart here (unknown) or
            parameters here with no source there (missing), or tensors of another shape; each lists the names.
    """
    if task not in LAYOUTS:
        raise InputError(f"--task: {task!r} is not one of {', '.join(TASKS)}")
    layout = LAYOUTS[task]
    state = read_vpd_state(checkpoint)
    logger.info("read %d tensors from %s", len(state), checkpoint)
    names = load_class_names(layout.classes)
    _class_tokens(state, checkpoint, task, len(names))  # a wrong file is refused before SD and CLIP load

    sd_path, clip_path = resolve_weights(weights, sd, clip)
    unet, vae = load_stable_diffusion(sd_path)
    image_encoder, _, _ = load_clip(clip_path, text=False)
    config = _vpd_config(task, state, weights, sd, clip)
    class_tokens = _class_tokens(state, checkpoint, task, len(names), unet.config.cross_attention_dim)
    model = assemble_model(config.model, unet, vae, image_encoder, None, class_tokens.float(), names)
    built = model.state_dict()
    keys = _map_keys(state, task, model, built)
    _check_keys(keys, built, f"{checkpoint}: not VPD's {task} model for the Stable Diffusion in {sd_path}")

    provided = keys.provided
    if keys.folded is not None:
        running_mean = keys.expected["decoder.conv_layers.1.running_mean"]
        provided[running_mean] = provided[running_mean].float() - keys.folded.float()
    kept = [key for key in built if key not in provided]
    logger.info(
        "converted %d tensors; %d frozen ones from %s (%s)",
        len(provided),
        len(kept),
        weights,
        ", ".join(sorted({".".join(key.split(".")[:3]) for key in kept})) or "none",
    )
    model.load_state_dict(
        built | {key: value for key, value in provided.items() if key in built}, strict=True
    )
    path = save_model(model.eval(), config, out)
    logger.info("wrote %s: evaluate it with `iedp evaluate %s --set data.root=...`", path, path)
    return path


def _vpd_config(task: str, state: dict, weights: str, sd: str | None, clip: str | None) -> Config:
    """Our VPD recipe for the task, with VPD's choices pinned and the head widths read off the file."""
    layout = LAYOUTS[task]
    tree = load_config(layout.recipe).to_dict()
    tree["model"].update(
        task=task,
        method="vpd",
        weights=_absolute(weights),
        sd=_absolute(sd),
        clip=_absolute(clip),
        classes=layout.classes,
        class_embedding="pooled",
        latent_scale=1.0,
        attention_maps=True,
        head_norm="bn",
        **_widths(task, state),
    )
    return config_from_dict(tree)


def _class_tokens(
    state: dict, checkpoint: str | Path, task: str, count: int, width: int | None = None
) -> torch.Tensor:
    """VPD's (C, D) class / scene embeddings; a missing or misshapen tensor is an InputError (naming the other
    task when the file looks like its checkpoint). ``width`` None: D is not checked (before the UNet is read)."""
    layout = LAYOUTS[task]
    class_key = _vpd_name("class_tokens", layout.renames)
    class_tokens = state.get(class_key)
    if class_tokens is None:
        other = next(t for t in TASKS if t != task)
        hint = (
            f"; it looks like VPD's {other} checkpoint (--task {other})"
            if _vpd_name("class_tokens", LAYOUTS[other].renames) in state
            else ""
        )
        raise InputError(f"{checkpoint}: missing {class_key} (VPD's class / scene embeddings){hint}")
    if class_tokens.ndim != 2 or class_tokens.shape[0] != count or width not in (None, class_tokens.shape[1]):
        expected = f"({count}, {width or 'D'})"
        raise InputError(
            f"{checkpoint}: {class_key} has shape {tuple(class_tokens.shape)}, expected {expected}: "
            f"one embedding per {layout.classes} name, in VPD's order"
        )
    return class_tokens


@dataclass
class _KeyMap:
    """How VPD's tensors map onto ours: ``provided[our key]`` and its ``source`` name in VPD's file, VPD's
    ``unknown`` keys and the ``missing`` ones, ``expected[VPD name] = our key`` for the renamed parts, and VPD's
    depth-decoder conv bias to fold into the BN's running mean (``folded``)."""

    provided: dict[str, torch.Tensor]
    source: dict[str, str]
    unknown: list[str]
    missing: list[str]
    expected: dict[str, str]
    folded: torch.Tensor | None


def _map_keys(state: dict, task: str, model: IEDPModel, built: dict) -> _KeyMap:
    """Map every tensor of VPD's file: the backbone through diffusers' converters, the rest by the rename table."""
    layout = LAYOUTS[task]
    unet, vae = model.backbone.unet, model.backbone.vae
    # Diffusion backbone: diffusers' converters on the LDM keys.
    unet_tensors, unet_names, unet_unused = _convert_ldm(
        state, layout.unet, LDM_UNET_KEY, convert_ldm_unet_checkpoint, dict(unet.config), "backbone.unet."
    )
    vae_tensors, vae_names, vae_unused = _convert_ldm(
        state, layout.vae, _LDM_VAE_KEY, convert_ldm_vae_checkpoint, dict(vae.config), "backbone.vae."
    )
    provided = unet_tensors | vae_tensors
    source = unet_names | vae_names
    unknown = unet_unused + vae_unused + [source[key] for key in provided if key not in built]

    # Adapter, embeddings, neck and head: renamed by the table, from our names to VPD's.
    renames = layout.renames + (_depth_decoder_renames(model.head) if task == "depth" else ())
    expected = {}
    for key in built:
        vpd = _vpd_name(key, renames)
        if vpd is not None:
            expected[vpd] = key
    missing = []
    for vpd, key in expected.items():
        if vpd in state:
            provided[key], source[key] = state[vpd], vpd
        elif not key.endswith("num_batches_tracked"):  # a BN step counter: inference never reads it
            missing.append(vpd)
    backbone = (layout.unet, layout.vae)
    unknown += [
        key
        for key in state
        if not key.startswith(backbone) and key not in expected and key not in layout.ignored
    ]
    folded = None
    if task == "depth":
        # VPD's conv before the decoder's BN has a bias (ours does not): fold it into the BN's running mean,
        # exact in eval mode and irrelevant in training mode, where the batch mean absorbs it.
        conv_bias = "decoder.conv_layers.0.bias"
        if conv_bias in unknown:
            unknown.remove(conv_bias)
            folded = state[conv_bias]
        else:
            missing.append(conv_bias)
    missing += [
        key
        for key in built
        if key not in provided and key not in expected.values() and not key.startswith(_FROM_BASE)
    ]
    return _KeyMap(provided, source, unknown, missing, expected, folded)


def _check_keys(keys: _KeyMap, built: dict, what: str) -> None:
    """One InputError listing the unknown and missing keys and the tensors of another shape, if any."""
    problems = []
    if keys.unknown:
        problems.append(f"{len(keys.unknown)} unknown keys: {_listed(keys.unknown)}")
    if keys.missing:
        problems.append(f"{len(keys.missing)} missing keys: {_listed(keys.missing)}")
    shapes = [
        f"{keys.source[key]} {tuple(value.shape)} (expected {tuple(built[key].shape)})"
        for key, value in keys.provided.items()
        if key in built and value.shape != built[key].shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} tensors of another shape: {_listed(shapes)}")
    if problems:
        raise InputError(f"{what}: " + "; ".join(problems))
