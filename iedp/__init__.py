"""IEDP: implicit and explicit language guidance for diffusion-based visual perception."""

__version__ = "0.1.0"
