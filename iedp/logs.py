"""Library chatter kept out of the log of the CLI and of its worker processes (``-v`` shows it)."""

from __future__ import annotations

import logging


def quiet_libraries() -> None:
    """Accelerate's five lines per checkpoint, the "Loading weights" bar transformers draws on every CLIP load, and
    bitsandbytes' warning, on every diffusers import where it is installed, that a 4-bit kernel package is missing
    (iedp uses only its 8-bit AdamW)."""
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    if hasattr(transformers_logging, "set_tqdm_hook"):  # only transformers' own bars; downloads keep theirs
        transformers_logging.set_tqdm_hook(lambda factory, a, kw: factory(*a, **{**kw, "disable": True}))
