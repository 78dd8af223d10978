"""A miniature pretrained world: the tiny VAE, CLIP and text-to-image UNet pre-trained on synthetic scenes.

``pretrain_tiny(out_dir, config)`` trains them into a folder that ``model.weights`` accepts like any SD + CLIP
folder; ``pretrained_tiny_dir(config)`` builds that folder once into the cache (``resolve_weights``'s
``"tiny-pretrained"``). The report in the folder shows what each part learned.
"""

from __future__ import annotations

from typing import Any

from iedp.pretrain.config import DEFAULT_CONFIG, QUICK_CONFIG, PretrainConfig

_PIPELINE = ("cache_key", "pretrain_tiny", "pretrained_tiny_dir", "refresh_denoising")

__all__ = ["DEFAULT_CONFIG", "QUICK_CONFIG", "PretrainConfig", *_PIPELINE]


def __getattr__(name: str) -> Any:
    """The pipeline's names, imported on first use: it imports diffusers (seconds), which the CLI's parser, reading
    the settings alone, must not wait for."""
    if name in _PIPELINE:
        from iedp.pretrain import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
