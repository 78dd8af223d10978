"""Pretrained parts: Stable Diffusion (UNet + VAE), CLIP (vision and text towers, tokenizer), and the tiny preset.

Users point at weights they already have (DESIGN §5): a diffusers folder or a single ``.safetensors``/``.ckpt``
file for Stable Diffusion, a transformers folder for CLIP, or a Hub id where they have network access. The
tiny preset builds the same classes at small widths, saves them in the same formats and is loaded back through
the same functions, so tests and the CPU demo exercise the real loading code without downloading anything.

The package, from the bottom up (each module imports only those above it in this list, and :mod:`iedp.cache`):

- :mod:`~iedp.weights.loaders`: ``load_stable_diffusion`` and ``load_clip``, with their input checks;
- :mod:`~iedp.weights.tokenizer`: the tiny preset's CLIP tokenizer, a BPE learnt on iedp's prompt words;
- :mod:`~iedp.weights.tiny`: the tiny preset (``make_tiny``) and its cached folder;
- :mod:`~iedp.weights.resolve`: ``resolve_weights``, from ``model.weights`` to folders; it sits above the tiny
  preset and :mod:`iedp.pretrain` (the pre-trained tiny preset), which itself uses the modules above.
"""

from iedp.cache import build_cached, cache_root
from iedp.weights.loaders import _SD_V1_ORIGINAL_CONFIG, load_clip, load_stable_diffusion
from iedp.weights.resolve import resolve_weights
from iedp.weights.tiny import TINY_VERSION, VAE_CHANNELS, VAE_NORM_GROUPS, make_tiny, tiny_weights_dir
from iedp.weights.tokenizer import learn_bpe_merges

__all__ = [
    "TINY_VERSION",
    "VAE_CHANNELS",
    "VAE_NORM_GROUPS",
    "_SD_V1_ORIGINAL_CONFIG",  # bench/speed.py builds SD v1.5's layout from it
    "build_cached",
    "cache_root",
    "learn_bpe_merges",
    "load_clip",
    "load_stable_diffusion",
    "make_tiny",
    "resolve_weights",
    "tiny_weights_dir",
]
