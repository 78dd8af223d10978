"""Which folders hold the Stable Diffusion and CLIP weights of a ``model.weights`` / ``model.sd`` / ``model.clip``.

The resolver sits above both the tiny preset and :mod:`iedp.pretrain` (which builds the pre-trained tiny preset
from the loaders and the tiny preset below it).
"""

from __future__ import annotations

from pathlib import Path

from iedp.errors import InputError
from iedp.weights.tiny import tiny_weights_dir


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
        # Imported on use: iedp.pretrain builds on this package's loaders and tiny preset, so importing it while
        # this package's __init__ runs would find iedp.pretrain half-initialised.
        from iedp.pretrain.pipeline import pretrained_tiny_dir

        base = pretrained_tiny_dir()
    else:
        base = Path(weights).expanduser()
        if not base.is_dir():
            raise InputError(
                f"model.weights: {weights} is not a folder; expected 'tiny', 'tiny-pretrained' or a folder with "
                f"unet/, vae/ and clip/ (or set model.sd and model.clip)"
            )
    return (sd if sd is not None else str(base)), (clip if clip is not None else str(base / "clip"))
