"""Procedurally rendered indoor scenes with exact labels and metric depth (DESIGN §6), apart from the real datasets.

- :mod:`~iedp.data.synthetic.raycast`: vectorised ray casting of boxes, spheres and cylinders; textures;
- :mod:`~iedp.data.synthetic.furniture`: each class's shape, built from those primitives;
- :mod:`~iedp.data.synthetic.scenes`: a furnished room per scene type, rendered from a seed (``render_scene``);
- :mod:`~iedp.data.synthetic.dataset`: the rendered scenes as a dataset (``SyntheticScenes``);
- :mod:`~iedp.data.synthetic.store`: a split's scenes saved once and read back (``RenderedScenes``).
"""

from iedp.data.synthetic.dataset import SyntheticScenes
from iedp.data.synthetic.scenes import (
    RENDERER_VERSION,
    SYNTHETIC_CLASSES,
    SYNTHETIC_SCENES,
    SceneSample,
    render_scene,
)

__all__ = [
    "RENDERER_VERSION",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_SCENES",
    "SceneSample",
    "SyntheticScenes",
    "render_scene",
]
