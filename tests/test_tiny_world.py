"""The pre-trained tiny world shipped in the package (iedp/resources/tiny_world): it loads through the standard
loaders, it is what ``model.weights=tiny-pretrained`` uses, and it is not stale."""

import dataclasses
import json
from pathlib import Path

from iedp.pretrain import DEFAULT_CONFIG, cache_key, pipeline
from iedp.pretrain.pipeline import SHIPPED_DIR, stored_key
from iedp.pretrain.report import markdown
from iedp.weights import load_clip, load_stable_diffusion, make_tiny, resolve_weights

MAX_BYTES = 25 * 2**20


def test_shipped_world_matches_the_current_code():
    """Its key covers the tiny preset's, the renderer's and the pre-training code's versions, a fingerprint of
    the renderer's output and the default config: a change to any of them means pre-training it again
    (``iedp pretrain-tiny iedp/resources/tiny_world``)."""
    assert stored_key(SHIPPED_DIR) == cache_key(DEFAULT_CONFIG), (
        "iedp/resources/tiny_world is stale: rebuild it with `iedp pretrain-tiny iedp/resources/tiny_world`"
    )
    report = json.loads((SHIPPED_DIR / "report.json").read_text())
    assert report["key"] == stored_key(SHIPPED_DIR)
    assert report["config"] == json.loads(json.dumps(dataclasses.asdict(DEFAULT_CONFIG)))
    # its report reads as the current report code writes it (after a change there: `iedp pretrain-tiny
    # iedp/resources/tiny_world --refresh-denoising` where only the denoising figures are new, else a rebuild)
    assert (SHIPPED_DIR / "report.md").read_text(encoding="utf-8") == markdown(report)


def test_shipped_world_has_the_tiny_preset_layout(tmp_path):
    """Same model configs and tokenizer as :func:`make_tiny` builds now (only the VAE's scaling factor is learnt)."""
    preset = make_tiny(tmp_path, seed=DEFAULT_CONFIG.seed)
    for part in ("unet/config.json", "vae/config.json", "clip/config.json"):
        shipped, fresh = (_layout(json.loads((root / part).read_text())) for root in (SHIPPED_DIR, preset))
        assert shipped == fresh, part
    for name in ("vocab.json", "merges.txt"):
        assert (SHIPPED_DIR / "clip" / name).read_text() == (preset / "clip" / name).read_text(), name


_NOT_LAYOUT = {"scaling_factor", "_diffusers_version", "transformers_version", "_name_or_path", "dtype"}


def _layout(config: dict) -> dict:
    """A saved config without the keys that record where and how it was saved, or the learnt scaling factor."""
    return {k: _layout(v) if isinstance(v, dict) else v for k, v in config.items() if k not in _NOT_LAYOUT}


def test_shipped_world_loads_through_the_standard_loaders():
    unet, vae = load_stable_diffusion(str(SHIPPED_DIR))
    vision, text, tokenizer = load_clip(str(SHIPPED_DIR / "clip"))
    assert unet.config.cross_attention_dim == text.config.hidden_size == vision.config.projection_dim
    assert vae.config.scaling_factor != 0.18215  # learnt from the latents
    assert tokenizer.model_max_length == 77
    size = sum(path.stat().st_size for path in SHIPPED_DIR.rglob("*") if path.is_file())
    assert size <= MAX_BYTES, f"the shipped world takes {size / 2**20:.1f} MiB"


def test_tiny_pretrained_uses_the_shipped_world(monkeypatch, tmp_path):
    monkeypatch.setenv("IEDP_CACHE", str(tmp_path))

    def fail(*args, **kwargs):
        raise AssertionError("pre-trained although the shipped world is current")

    monkeypatch.setattr(pipeline, "pretrain_tiny", fail)
    assert resolve_weights("tiny-pretrained") == (str(SHIPPED_DIR), str(SHIPPED_DIR / "clip"))
    assert not any(Path(tmp_path).iterdir())


def test_a_stale_world_is_rebuilt_not_used(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("IEDP_CACHE", str(tmp_path))
    monkeypatch.setattr(pipeline, "PRETRAIN_VERSION", "stale-test")
    built = []
    monkeypatch.setattr(pipeline, "pretrain_tiny", lambda folder, config: built.append(folder))
    sd_path, _ = resolve_weights("tiny-pretrained")
    assert Path(sd_path) != SHIPPED_DIR and Path(sd_path).parent == tmp_path and built
    assert "pre-training it again" in caplog.text
