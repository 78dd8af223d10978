"""Library chatter kept out of the log of the CLI and of its worker processes (``-v`` shows it)."""

from __future__ import annotations

import logging


def quiet_libraries() -> None:
    """Accelerate's five lines per checkpoint, the line httpx logs for each request Gradio makes to itself in
    ``iedp serve`` and the "Loading weights" bar transformers draws on every CLIP load (bitsandbytes' import warning
    is silenced by ``import iedp``)."""
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    if hasattr(transformers_logging, "set_tqdm_hook"):  # only transformers' own bars; downloads keep theirs
        transformers_logging.set_tqdm_hook(lambda factory, a, kw: factory(*a, **{**kw, "disable": True}))
