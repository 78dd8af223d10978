"""The shipped recipes (ADE20K, NYUv2, the demo), loadable by name: ``iedp train ade20k_iedp``."""

from importlib.resources import files
from pathlib import Path


def packaged_config(name: str) -> Path | None:
    """The shipped recipe called ``name`` (with or without ``.yaml``), or None."""
    stem = name.removesuffix(".yaml")
    if "/" in stem or not stem:
        return None
    path = Path(str(files(__package__).joinpath(f"{stem}.yaml")))
    return path if path.is_file() else None


def packaged_names() -> list[str]:
    """The names of the shipped recipes, e.g. ``ade20k_iedp``."""
    return sorted(
        path.name.removesuffix(".yaml")
        for path in files(__package__).iterdir()
        if path.name.endswith(".yaml")
    )
