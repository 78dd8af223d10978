"""Where built things are cached (the tiny presets, class-token banks), and building into that cache safely.

This module imports nothing of iedp's, so any part (the weights package, the guidance code, pre-training) can use
it without import cycles.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where built weights and class-token banks are cached: ``$IEDP_CACHE`` or ``~/.cache/iedp``."""
    return Path(os.environ.get("IEDP_CACHE") or "~/.cache/iedp").expanduser()


def build_cached(target: Path, build: Callable[[Path], object], what: str) -> Path:
    """``target``, built by ``build(folder)`` on first use.

    The build goes to a temporary folder beside the target and is renamed into place, so a crash never leaves
    a half-built folder and concurrent builders (e.g. one per training process) all end with one complete folder.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        logger.info("building %s into %s (cached for later runs)", what, target)
        build(staging)
        os.replace(staging, target)
    except OSError:
        # Another process renamed its build into place first; keep theirs.
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
