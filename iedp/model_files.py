"""Model files: a trained model, self-contained. ``model.safetensors`` plus ``config.json`` (the resolved run config,
the class names and the configs of the pretrained parts), so ``predict`` and ``evaluate`` need nothing else. Never
pickle. (A training checkpoint's optimizer and RNG state is :mod:`iedp.engine.train_state`.)

The frozen CLIP text tower is not stored: inference of vpd / implicit / iedp never runs it (the class tokens are
in the weights), and the ``explicit`` oracle loads it from the weights named in the config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from iedp.config import Config, apply_overrides, config_from_dict
from iedp.errors import InputError
from iedp.models.build import assemble_model, load_explicit
from iedp.models.iedp import IEDPModel
from iedp.version import __version__

FORMAT = "iedp-checkpoint/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def model_state(model: IEDPModel) -> dict:
    """The tensors a checkpoint keeps: everything but the text tower, contiguous, on the CPU."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("explicit.")
    }


def save_model(
    model: IEDPModel, config: Config, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the checkpoint folder atomically: a crash leaves either the old folder or the new one, never half.
    ``state`` replaces :func:`model_state` (the weights the model was loaded from, when it holds a rounded copy)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "iedp_version": __version__,
        "config": config.to_dict(),
        "class_names": model.class_names,
        "components": {
            "unet": dict(model.backbone.unet.config),
            "vae": dict(model.backbone.vae.config),
            "image_encoder": model.implicit.image_encoder.config.to_dict(),
        },
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(state or model_state(model), tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(
            json.dumps(meta, indent=2, sort_keys=True, default=list), encoding="utf-8"
        )
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_checkpoint_meta(path: str | Path) -> dict:
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        # a training checkpoint holds its model in model/, a run folder its trained model in final/
        inner = next(
            (path / name for name in ("model", "final") if (path / name / WEIGHTS_NAME).is_file()), None
        )
        hint = f"; did you mean {inner}?" if inner else ""
        raise InputError(f"checkpoint {path}: expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    try:
        meta = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"checkpoint {path / CONFIG_NAME}: not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"checkpoint {path / CONFIG_NAME}: not an iedp checkpoint (format is not {FORMAT})")
    return meta


def upgrade_config(tree: dict) -> dict:
    """A checkpoint config written before the learnable-query implicit branch, in today's keys: its
    ``implicit_tokens`` (one frozen image token) becomes ``implicit``, and its explicit branch was one projected
    text token."""
    model = tree.get("model")
    if isinstance(model, dict) and "implicit_tokens" in model:
        implicit = model["implicit_tokens"]
        model = {k: v for k, v in model.items() if k != "implicit_tokens"} | {"implicit": implicit}
        tree = tree | {"model": {"explicit_tokens": "projected"} | model}
    return tree


def check_finite(state: dict, path: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged run): such a model predicts one class everywhere and
    evaluates as if it were valid."""
    bad = [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise InputError(
            f"checkpoint {path}: {len(bad)} weight tensors hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the run that wrote it diverged"
        )


def load_weights(model: IEDPModel, state: dict, path: str | Path, assign: bool = False) -> None:
    """Load ``state`` into ``model``; weights of another task, class count or architecture are an InputError naming
    ``path``. The text tower (``explicit.*``) is never stored, so it may be missing.

    Args:
        assign: take the tensors as they are (a model built on the meta device), instead of copying into it.
    """
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as error:  # shapes differ
        first = str(error).strip().splitlines()[-1].strip()
        raise InputError(f"checkpoint {path}: does not match this model ({first})") from None
    missing = [key for key in missing if not key.startswith("explicit.")]
    if missing or unexpected:
        raise InputError(
            f"checkpoint {path}: does not match this model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})"
        )


def _check_meta(meta: dict, path: Path) -> None:
    """The parts of ``config.json`` that :func:`load_model` reads, each of the right type: one line naming it."""
    where = f"checkpoint {path / CONFIG_NAME}"
    if not isinstance(meta.get("config"), dict):
        raise InputError(f"{where}: 'config' is {type(meta.get('config')).__name__}, expected a mapping")
    parts = meta.get("components")
    if not isinstance(parts, dict) or not all(
        isinstance(parts.get(k), dict) for k in ("unet", "vae", "image_encoder")
    ):
        raise InputError(f"{where}: 'components' must map unet, vae and image_encoder to their configs")
    names = meta.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise InputError(f"{where}: 'class_names' must be a non-empty list of names")


def load_model(
    path: str | Path, with_text: bool = False, overrides: Sequence[str] = ()
) -> tuple[IEDPModel, Config]:
    """Rebuild the model from the checkpoint alone (the text tower from the config's weights if ``with_text``).

    ``overrides`` (``--set`` assignments, :func:`~iedp.config.apply_overrides`) apply before the model is built, so
    the model keys a checkpoint may change (where its frozen weights live, compilation) take effect.
    """
    path = Path(path)
    meta = read_checkpoint_meta(path)
    _check_meta(meta, path)
    config = apply_overrides(config_from_dict(upgrade_config(meta["config"])), list(overrides))
    parts = meta["components"]
    try:
        state = load_file(path / WEIGHTS_NAME)
    except (SafetensorError, OSError) as error:
        raise InputError(f"checkpoint {path / WEIGHTS_NAME}: unreadable safetensors file ({error})") from None
    check_finite(state, path / WEIGHTS_NAME)
    if "class_tokens" not in state:
        raise InputError(f"checkpoint {path / WEIGHTS_NAME}: no class_tokens tensor; not an iedp checkpoint")
    if len(meta["class_names"]) != state["class_tokens"].shape[0]:
        raise InputError(
            f"checkpoint {path / CONFIG_NAME}: {len(meta['class_names'])} class names for "
            f"{state['class_tokens'].shape[0]} class tokens in {WEIGHTS_NAME}"
        )
    try:
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(parts["unet"])
            vae = AutoencoderKL.from_config(parts["vae"])
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(parts["image_encoder"]))
        model = assemble_model(
            config.model, unet, vae, image_encoder, None, state["class_tokens"], list(meta["class_names"])
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(
            f"checkpoint {path / CONFIG_NAME}: its component configs do not build a model "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    load_weights(model, state, path, assign=True)
    if with_text or config.model.method == "explicit":
        model.explicit = load_explicit(config.model)
    return model.eval(), config
