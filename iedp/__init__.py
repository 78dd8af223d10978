"""IEDP: implicit and explicit language guidance for diffusion-based visual perception."""

import logging

from iedp.version import __version__

# bitsandbytes (for the optional 8-bit AdamW) warns on every diffusers import that a 4-bit kernel package, which iedp
# never uses, is missing: in the CLI and in a user's own Python alike
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__all__ = ["__version__", "load"]


def load(path_or_hub_id, device=None, dtype="auto", overrides=()):
    """A checkpoint folder or Hugging Face Hub id, ready to call on images: see :func:`iedp.api.load`."""
    from iedp.api import load as _load  # imported on use: ``import iedp`` stays light for the CLI

    return _load(path_or_hub_id, device=device, dtype=dtype, overrides=overrides)
