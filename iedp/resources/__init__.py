"""Data files shipped with the package: ADE20K class names and NYUv2 scene types."""

from importlib.resources import files


def read_names(name: str) -> list[str]:
    """Non-empty lines of a shipped list, e.g. ``read_names("ade20k_classes.txt")``."""
    text = files(__package__).joinpath(name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
