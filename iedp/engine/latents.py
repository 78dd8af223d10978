"""Training latents encoded once by the frozen VAE and reused (``data.cache_latents``).

Without augmentation a training image is the same in every epoch and in every run on the same scenes, and the
frozen VAE encoder costs a third of a demo training step on a CPU (0.37 of 1.03 s, batch 8 at 128², one thread,
2026-11-28). So the latents of a whole training split are encoded once, saved under the cache keyed by the VAE's
weights and the images' identity, and handed to the model in each batch (``batch["latents"]``), where
:meth:`~iedp.models.iedp.IEDPModel.run_branches` uses them instead of encoding. The demo's four runs share one
encoding, and the scenes as rendered (rendering is a fifth of a segmentation step): each is prepared once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from iedp.cache import build_cached, cache_root
from iedp.config import Config
from iedp.data.synthetic import SyntheticScenes
from iedp.data.synthetic.scenes import RENDERER_VERSION
from iedp.data.synthetic.store import RenderedScenes
from iedp.engine.data import build_dataset
from iedp.models.backbone import DiffusionBackbone
from iedp.models.build import build_model
from iedp.workers import intra_op_threads

logger = logging.getLogger(__name__)

ENCODE_BATCH = 32


class WithLatents(Dataset):
    """``dataset``'s samples with ``latents`` (4, h, w) added: row ``i`` of ``latents`` is sample ``i``'s."""

    def __init__(self, dataset: SyntheticScenes, latents: torch.Tensor) -> None:
        if len(latents) != len(dataset):
            raise ValueError(f"{len(latents)} latents for {len(dataset)} samples")
        self.dataset, self.latents = dataset, latents

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        # class_names, set_epoch, ...: everything else is the wrapped dataset's
        if name in ("dataset", "latents"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "latents": self.latents[index]}


def vae_fingerprint(backbone: DiffusionBackbone) -> str:
    """A digest of the VAE's weights, their dtypes and the latent scale: latents from another VAE are never reused."""
    digest = hashlib.sha256()
    for name, tensor in backbone.vae.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(f"scale={backbone.latent_scale}".encode())
    return digest.hexdigest()[:16]


def images_identity(dataset: SyntheticScenes) -> dict:
    """What fixes the un-augmented images of a synthetic split (the task does not: seg and depth share images)."""
    if dataset.augment:
        raise ValueError("latents can be cached only for un-augmented images (data.augment=false)")
    return {
        "renderer": RENDERER_VERSION,
        "seed": dataset.seed,
        "split": dataset.split,
        "size": len(dataset),
        "resolution": list(dataset.resolution),
    }


def _keyed_folder(kind: str, identity: dict, root: Path | None) -> Path:
    """``root/kind/<digest of identity>``: one cache entry per identity."""
    key = json.dumps(identity, sort_keys=True)
    return (root or cache_root()) / kind / hashlib.sha256(key.encode()).hexdigest()[:16]


ENCODING = "one intra-op thread"
"""How :func:`encode_images` runs, part of the latents' cache key: the VAE's convolutions round differently with
different thread counts (up to 1e-5 here, enough to move a demo run by 0.7 mIoU), so latents are always encoded
with one thread, and every run on them is the same whichever process encoded them first."""


def latents_folder(backbone: DiffusionBackbone, dataset: SyntheticScenes, root: Path | None = None) -> Path:
    identity = {"vae": vae_fingerprint(backbone), **images_identity(dataset), "encoding": ENCODING}
    return _keyed_folder("latents", identity, root)


@torch.no_grad()
def encode_images(
    backbone: DiffusionBackbone, dataset: SyntheticScenes, batch: int = ENCODE_BATCH
) -> torch.Tensor:
    """(N, 4, h, w) latents of every sample's image, in order, on the CPU; encoded with one intra-op thread
    (:data:`ENCODING`)."""
    device = next(backbone.vae.parameters()).device
    chunks = []
    with intra_op_threads(1):
        for start in range(0, len(dataset), batch):
            images = torch.stack(
                [dataset[i]["image"] for i in range(start, min(start + batch, len(dataset)))]
            )
            chunks.append(backbone.encode(images.to(device)).cpu())
    return torch.cat(chunks)


def cached_latents(
    backbone: DiffusionBackbone, dataset: SyntheticScenes, root: Path | None = None
) -> torch.Tensor:
    """The latents of ``dataset``'s images: read from the cache, or encoded now and cached (atomically)."""
    folder = latents_folder(backbone, dataset, root)

    def build(staging: Path) -> None:
        logger.info("encoding %d training images once with the frozen VAE (data.cache_latents)", len(dataset))
        save_file({"latents": encode_images(backbone, dataset)}, staging / "latents.safetensors")
        (staging / "identity.json").write_text(json.dumps(images_identity(dataset), indent=2))

    build_cached(folder, build, "training latents")
    return load_file(folder / "latents.safetensors")["latents"]


def cached_scenes(dataset: SyntheticScenes, root: Path | None = None) -> RenderedScenes:
    """``dataset``'s scenes as rendered: read from the cache, or rendered now and cached (atomically)."""
    folder = _keyed_folder("scenes", images_identity(dataset), root)

    def build(staging: Path) -> None:
        logger.info("rendering %d training scenes once (data.cache_latents)", len(dataset))
        RenderedScenes.save(staging, len(dataset), dataset.render)

    build_cached(folder, build, "rendered training scenes")
    return RenderedScenes(folder)


def with_cached_latents(
    backbone: DiffusionBackbone, dataset: SyntheticScenes, root: Path | None = None
) -> WithLatents:
    """``dataset`` reading its scenes from the cache (:func:`cached_scenes`) and carrying their latents
    (:func:`cached_latents`): what ``data.cache_latents`` trains on."""
    dataset.use_rendered(cached_scenes(dataset, root))
    return WithLatents(dataset, cached_latents(backbone, dataset, root))


def prepare_latents(config: Config) -> None:
    """Render and encode the training scenes of ``config`` now, in this process, if it caches them: for commands
    that start several runs on the same scenes (demo, ablation), which would otherwise each do it."""
    if config.data.cache_latents:
        root = Path(config.model.cache_dir) if config.model.cache_dir else None
        with_cached_latents(build_model(config.model).backbone, build_dataset(config, "train"), root)
