"""Training latents encoded once (data.cache_latents): the same training as encoding each batch, cached by key."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from iedp.data.synthetic import SyntheticScenes
from iedp.data.synthetic import dataset as dataset_module
from iedp.engine import latents as latents_module
from iedp.engine.data import collate
from iedp.engine.latents import WithLatents, cached_latents, cached_scenes, latents_folder, prepare_latents
from iedp.engine.train import train
from iedp.errors import InputError
from iedp.models.build import build_model
from iedp.workers import intra_op_threads
from tests.test_train import config


def test_cached_latents_give_the_same_loss_and_gradients(tmp_path):
    cfg = config(tmp_path, "data.augment=false", "data.cache_latents=true", f"model.cache_dir={tmp_path}")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    scenes = SyntheticScenes("seg", "train", size=4, resolution=64)
    batch = collate(
        [WithLatents(scenes, cached_latents(model.backbone, scenes, tmp_path))[i] for i in (3, 1)]
    )
    results = []
    for inputs in (batch, {k: v for k, v in batch.items() if k != "latents"}):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        with intra_op_threads(1):  # as the cached latents were encoded: only the batch size differs
            loss = model.loss(inputs)["loss"]
            loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (cached_loss, cached_grads), (loss, grads) = results
    # the encoder saw a batch of 4 instead of 2: the same numbers up to float rounding
    torch.testing.assert_close(cached_loss, loss, rtol=1e-5, atol=0)
    assert cached_grads.keys() == grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(cached_grads[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)
    torch.manual_seed(1)
    other = model.loss({**batch, "latents": torch.zeros_like(batch["latents"])})["loss"]
    assert abs(float(other - loss)) > 1e-3  # the model reads the given latents, it does not encode again


def test_training_with_cached_latents_writes_them_once(tmp_path):
    cache = tmp_path / "cache"
    sets = ["data.augment=false", "data.cache_latents=true", "train.max_steps=2", f"model.cache_dir={cache}"]
    train(config(tmp_path / "a", *sets))
    (entry,) = (cache / "latents").iterdir()
    stamp = (entry / "latents.safetensors").stat().st_mtime_ns
    train(config(tmp_path / "b", *sets, "model.task=depth", "model.classes=synthetic_scenes"))
    assert list((cache / "latents").iterdir()) == [entry]  # depth runs on the same images reuse it
    assert (entry / "latents.safetensors").stat().st_mtime_ns == stamp


def test_training_scenes_are_rendered_once_and_read_back_as_rendered(tmp_path, monkeypatch):
    seg = SyntheticScenes("seg", "train", size=5, resolution=(48, 64), seed=2)
    saved = cached_scenes(seg, tmp_path)
    for index in (0, 4):
        fresh = seg.render(index)
        again = saved[index]
        for name in ("rgb", "label", "depth"):
            np.testing.assert_array_equal(getattr(again, name), getattr(fresh, name))
            assert getattr(again, name).dtype == getattr(fresh, name).dtype
        assert (again.scene, again.objects) == (fresh.scene, fresh.objects)
    depth = SyntheticScenes("depth", "train", size=5, resolution=(48, 64), seed=2)
    depth.use_rendered(cached_scenes(depth, tmp_path))  # the same scenes: the same entry, read back
    assert len(list((tmp_path / "scenes").iterdir())) == 1
    monkeypatch.setattr(dataset_module, "render_scene", lambda *args: pytest.fail("rendered again"))
    sample = depth[3]
    monkeypatch.undo()
    expected = SyntheticScenes("depth", "train", size=5, resolution=(48, 64), seed=2)[3]
    torch.testing.assert_close(sample["image"], expected["image"], rtol=0, atol=0)
    torch.testing.assert_close(sample["depth"], expected["depth"], rtol=0, atol=0)
    assert sample["scene"] == expected["scene"]
    with pytest.raises(IndexError, match="out of range"):
        saved[5]
    with pytest.raises(ValueError, match="5 rendered scenes for a split of 4"):
        SyntheticScenes("seg", "train", size=4, resolution=(48, 64), seed=2).use_rendered(saved)


def test_latents_are_encoded_once_and_keyed_by_vae_and_images(tmp_path, monkeypatch):
    backbone = build_model(config(tmp_path, "data.augment=false").model).backbone
    seg = SyntheticScenes("seg", "train", size=4, resolution=64, seed=3)
    calls = []
    encode = latents_module.encode_images
    monkeypatch.setattr(latents_module, "encode_images", lambda *a: calls.append(1) or encode(*a))

    first = cached_latents(backbone, seg, tmp_path)
    again = cached_latents(backbone, seg, tmp_path)
    assert len(calls) == 1
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(first[2:3], backbone.encode(seg[2]["image"][None]), rtol=1e-5, atol=1e-5)
    assert (WithLatents(seg, first)[1]["latents"] == first[1]).all()

    # depth samples of the same scenes have the same images, so they share the entry
    depth = SyntheticScenes("depth", "train", size=4, resolution=64, seed=3)
    assert torch.equal(depth[0]["image"], seg[0]["image"])
    assert latents_folder(backbone, depth, tmp_path) == latents_folder(backbone, seg, tmp_path)
    # other scenes or another VAE: another entry
    other = SyntheticScenes("seg", "train", size=4, resolution=64, seed=4)
    assert latents_folder(backbone, other, tmp_path) != latents_folder(backbone, seg, tmp_path)
    before = latents_folder(backbone, seg, tmp_path)
    with torch.no_grad():
        next(backbone.vae.parameters()).add_(1e-3)
    assert latents_folder(backbone, seg, tmp_path) != before


def test_latents_are_encoded_with_one_thread_whatever_the_caller_has(tmp_path, monkeypatch):
    """Thread counts round the VAE's convolutions differently, so the cache must not depend on who encoded it."""
    backbone = build_model(config(tmp_path, "data.augment=false").model).backbone
    scenes = SyntheticScenes("seg", "train", size=3, resolution=64, seed=3)
    threads = []
    encode = backbone.encode
    monkeypatch.setattr(
        backbone, "encode", lambda images: threads.append(torch.get_num_threads()) or encode(images)
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        latents_module.encode_images(backbone, scenes, batch=2)
        assert threads == [1, 1] and torch.get_num_threads() == 2  # the caller's count is back afterwards
    finally:
        torch.set_num_threads(previous)
    assert "thread" in latents_module.ENCODING  # part of the key: caches encoded otherwise are not reused


def test_augmented_images_have_no_fixed_latents(tmp_path):
    # a training option: checked when training starts, so a demo checkpoint still evaluates on other data
    with pytest.raises(InputError, match=r"^data.cache_latents: needs .*augment=false"):
        train(config(tmp_path, "data.cache_latents=true"))
    augmented = SyntheticScenes("seg", "train", size=2, resolution=64, augment=True)
    with pytest.raises(ValueError, match="un-augmented"):
        latents_folder(build_model(config(tmp_path).model).backbone, augmented, tmp_path)


def test_prepare_latents_encodes_only_for_recipes_that_cache_them(tmp_path):
    prepare_latents(config(tmp_path, "data.augment=false", f"model.cache_dir={tmp_path}"))
    assert not (tmp_path / "latents").exists() and not (tmp_path / "scenes").exists()
    prepare_latents(
        config(tmp_path, "data.augment=false", "data.cache_latents=true", f"model.cache_dir={tmp_path}")
    )
    (entry,) = (tmp_path / "latents").iterdir()
    assert load_file(entry / "latents.safetensors")["latents"].shape == (16, 4, 8, 8)
    (scenes,) = (tmp_path / "scenes").iterdir()
    assert np.load(scenes / "rgb.npy", mmap_mode="r").shape == (16, 64, 64, 3)
