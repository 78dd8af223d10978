"""A miniature pretrained world: the tiny VAE, CLIP and text-to-image UNet pre-trained on synthetic scenes.

``pretrain_tiny(out_dir, config)`` trains them into a folder that ``model.weights`` accepts like any SD + CLIP
folder; ``pretrained_tiny_dir(config)`` builds that folder once into the cache (``resolve_weights``'s
``"tiny-pretrained"``). The report in the folder shows what each part learned.
"""

from iedp.pretrain.config import QUICK_CONFIG, PretrainConfig
from iedp.pretrain.pipeline import (
    DEFAULT_CONFIG,
    cache_key,
    pretrain_tiny,
    pretrained_tiny_dir,
    refresh_denoising,
)

__all__ = [
    "DEFAULT_CONFIG",
    "QUICK_CONFIG",
    "PretrainConfig",
    "cache_key",
    "pretrain_tiny",
    "pretrained_tiny_dir",
    "refresh_denoising",
]
