"""IEDP: implicit and explicit language guidance for diffusion-based visual perception."""

from iedp.version import __version__

__all__ = ["__version__", "load"]


def load(path_or_hub_id, device=None, dtype="auto", overrides=()):
    """A checkpoint folder or Hugging Face Hub id, ready to call on images: see :func:`iedp.api.load`."""
    from iedp.api import load as _load  # imported on use: ``import iedp`` stays light for the CLI

    return _load(path_or_hub_id, device=device, dtype=dtype, overrides=overrides)
