"""Checks on where a command will write, made before any work starts: a run folder that is a file, a read-only or
virtual (/proc) folder, a JSON path that is a folder, an existing run that a new one would mix with. Each problem is
one :class:`~iedp.errors.InputError` naming the option and the path. And :func:`json_text`, the JSON the commands
write."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from iedp.errors import InputError


def _probe(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the only test that catches read-only mounts and /proc."""
    try:
        fd, name = tempfile.mkstemp(prefix=".iedp-write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as error:
        raise InputError(f"{what} {folder}: cannot write there ({error.strerror or error})") from None


def check_output_dir(path: str | Path, what: str) -> Path:
    """``path`` as a folder that exists (created if missing) and can be written; ``what`` names the option."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{what} {path}: cannot create the folder ({error.strerror or error})") from None
    _probe(path, what)
    return path


def check_output_file(path: str | Path, what: str) -> Path:
    """``path`` as a file that can be written (its folder created if missing), not a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{what} {path}: is a folder; expected a file name")
    check_output_dir(path.parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{what} {path}: the file is read-only")
    return path


def check_new_run(out: str | Path) -> Path:
    """``train.out`` for a new run (no ``--resume``): refused when it already holds a run's checkpoints or final
    model, which a second run would mix with (and ``--resume`` would then pick the wrong run's checkpoint)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"train.out {out}: is a file, not a folder")
    checkpoints = out / "checkpoints"
    held = []
    if checkpoints.is_dir() and any(p.name.startswith("checkpoint-") for p in checkpoints.iterdir()):
        held.append("checkpoints/")
    if (out / "final").exists():
        held.append("final/")
    if held:
        raise InputError(
            f"train.out {out}: already holds a run ({', '.join(held)}); add --resume to continue it, or set "
            "train.out to a new folder"
        )
    return check_output_dir(out, "train.out")


def json_text(value: Any, indent: int | None = 2, **options: Any) -> str:
    """``value`` as standard JSON, which has no NaN: a metric without data (a class with no pixels) becomes null,
    where :func:`json.dumps` would write the bare ``NaN`` that strict readers (JavaScript, ``jq``) reject."""
    return json.dumps(_nan_as_none(value), indent=indent, allow_nan=False, **options)


def _nan_as_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_as_none(item) for key, item in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, str):
        return [_nan_as_none(item) for item in value]
    return value
