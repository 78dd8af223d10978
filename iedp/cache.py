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

from filelock import FileLock

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where built weights and class-token banks are cached: ``$IEDP_CACHE`` or ``~/.cache/iedp``."""
    return Path(os.environ.get("IEDP_CACHE") or "~/.cache/iedp").expanduser()


def build_cached(target: Path, build: Callable[[Path], object], what: str, resumable: bool = False) -> Path:
    """``target``, built by ``build(folder)`` on first use.

    The build goes to a temporary folder beside the target and is renamed into place, so a crash never leaves
    a half-built folder and concurrent builders (e.g. one per training process) all end with one complete folder.

    With ``resumable`` (for a ``build`` that resumes its own unfinished work in a folder, as
    :func:`iedp.pretrain.pretrain_tiny` does), that folder is always the same one, ``.<name>.partial`` beside the
    target, and kept when the build stops, so the next use goes on where it stopped; concurrent builders wait on a
    lock instead of building side by side.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if resumable:
        return _build_resumable(target, build, what)
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


def _build_resumable(target: Path, build: Callable[[Path], object], what: str) -> Path:
    staging = target.with_name(f".{target.name}.partial")
    with FileLock(target.with_name(f".{target.name}.lock")):
        if target.is_dir():  # another process built it while this one waited
            return target
        verb = "resuming the stopped build of" if staging.is_dir() else "building"
        logger.info(
            "%s %s into %s (cached for later runs; if stopped, the next use resumes it)", verb, what, target
        )
        staging.mkdir(exist_ok=True)
        build(staging)
        os.replace(staging, target)
    return target
