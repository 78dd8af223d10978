"""``iedp predict`` end to end on tiny checkpoints: any image size, folders, name collisions, bad input, CLI."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import iedp.engine.inference as inference
from iedp.cli import main
from iedp.config import Config, EvalConfig, ModelConfig
from iedp.data.images import read_rgb
from iedp.engine.predict import expand_inputs, output_stems, predict_paths, write_segmentation
from iedp.errors import InputError
from iedp.model_files import save_model
from iedp.models.build import build_model
from iedp.visualize import TURBO, colorize_labels, label_legend, overlay, palette

CLASSES = ["wall", "floor", "ceiling", "bed", "lamp"]
MAX_DEPTH = 10.0
# Small windows keep the tiny model fast on CPU and still exercise several overlapping windows per image.
SMALL_EVAL = EvalConfig(short_side=64, window=64, stride=48, depth_window=64, depth_stride=48, batch_size=4)


def write_image(path, height, width, seed):
    """A smooth colour gradient plus noise, so JPEG keeps it close and the model sees structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    names = root / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    seg = ModelConfig(task="seg", method="iedp", classes=str(names), neck_channels=16, head_channels=16)
    depth = ModelConfig(
        task="depth",
        method="iedp",
        classes="nyu_scenes",
        max_depth=MAX_DEPTH,
        depth_fuse_channels=32,
        depth_head_channels=16,
    )
    return {
        task: str(
            save_model(build_model(cfg, with_text=False), Config(model=cfg, eval=SMALL_EVAL), root / task)
        )
        for task, cfg in (("seg", seg), ("depth", depth))
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {
        "wide": write_image(root / "wide.jpg", 67, 101, seed=0),
        "tall": write_image(root / "tall.png", 150, 97, seed=1),
    }


def test_segmentation_writes_labels_mask_and_overlay_at_input_size(
    checkpoints, images, tmp_path, monkeypatch
):
    shapes = []
    original = inference.predict_scores

    def spy(model, sample, config, device, out_size=None, dtype=torch.float32):
        shapes.append((tuple(sample["image"].shape), tuple(out_size)))
        return original(model, sample, config, device, out_size, dtype)

    monkeypatch.setattr(inference, "predict_scores", spy)
    out = tmp_path / "out"
    written = predict_paths(checkpoints["seg"], [images["wide"], images["tall"]], out)
    # short side to eval.short_side = 64 for the model, scores back at the input size
    assert shapes == [((3, 64, 96), (67, 101)), ((3, 99, 64), (150, 97))]
    expected = [
        out / f"{stem}_{kind}.png" for stem in ("wide", "tall") for kind in ("labels", "mask", "overlay")
    ]
    assert written == expected and all(p.is_file() for p in expected)
    colors = palette(len(CLASSES))
    for stem in ("wide", "tall"):
        image = read_rgb(images[stem])
        height, width = image.shape[:2]
        with Image.open(out / f"{stem}_labels.png") as file:
            assert file.mode == "L" and file.size == (width, height)
            labels = np.asarray(file)
        assert labels.max() < len(CLASSES)
        mask = np.asarray(Image.open(out / f"{stem}_mask.png").convert("RGB"))
        np.testing.assert_array_equal(mask, colorize_labels(labels, colors))
        blended = np.asarray(Image.open(out / f"{stem}_overlay.png").convert("RGB"))
        legend = label_legend(labels, CLASSES, colors)
        assert blended.shape == (max(height, legend.height), width + legend.width, 3)
        np.testing.assert_array_equal(blended[:height, :width], overlay(image, mask))
        np.testing.assert_array_equal(blended[: legend.height, width:], np.asarray(legend))


def test_segmentation_is_deterministic(checkpoints, images, tmp_path):
    first = predict_paths(checkpoints["seg"], [images["wide"]], tmp_path / "a")[0]
    second = predict_paths(checkpoints["seg"], [images["wide"]], tmp_path / "b")[0]
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_depth_writes_uint16_millimetres_and_colours_at_input_size(checkpoints, images, tmp_path):
    out = tmp_path / "out"
    written = predict_paths(checkpoints["depth"], [images["wide"], images["tall"]], out)
    assert written == [
        out / f"{stem}_{kind}.png" for stem in ("wide", "tall") for kind in ("depth", "depth_color")
    ]
    turbo = {tuple(c) for c in TURBO.tolist()}
    for stem in ("wide", "tall"):
        height, width = read_rgb(images[stem]).shape[:2]
        with Image.open(out / f"{stem}_depth.png") as file:
            assert file.mode == "I;16" and file.size == (width, height)
            millimetres = np.asarray(file).astype(np.int64)
        assert millimetres.min() > 0 and millimetres.max() <= MAX_DEPTH * 1000
        picture = np.asarray(Image.open(out / f"{stem}_depth_color.png").convert("RGB"))
        assert picture.shape[1] > width  # the depth, then a colour bar in metres to its right
        colors = picture[:height, :width]
        assert {tuple(c) for c in colors.reshape(-1, 3).tolist()} <= turbo  # every pixel valid, none black


def test_depth_window_larger_than_the_image_via_override(checkpoints, images, tmp_path, monkeypatch):
    seen = []
    original = inference.predict_scores

    def spy(model, sample, config, device, out_size=None, dtype=torch.float32):
        seen.append(config.eval.depth_window)
        return original(model, sample, config, device, out_size, dtype)

    monkeypatch.setattr(inference, "predict_scores", spy)
    out = tmp_path / "out"
    predict_paths(checkpoints["depth"], [images["wide"]], out, overrides=["eval.depth_window=480"])
    assert seen == [480]
    with Image.open(out / "wide_depth.png") as file:
        assert file.size == (101, 67)
        assert np.asarray(file).min() > 0


def test_folder_inputs_and_colliding_stems(checkpoints, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_image(folder / "b.JPG", 40, 70, seed=2)
    write_image(folder / "a.png", 65, 33, seed=3)
    (folder / "notes.txt").write_text("not an image")
    other = tmp_path / "other"
    other.mkdir()
    write_image(other / "a.webp", 50, 50, seed=4)
    assert expand_inputs([folder, other / "a.webp"]) == [folder / "a.png", folder / "b.JPG", other / "a.webp"]
    out = tmp_path / "out"
    written = predict_paths(checkpoints["depth"], [str(folder), str(other / "a.webp")], out)
    assert [p.name for p in written] == [
        "a_depth.png",
        "a_depth_color.png",
        "b_depth.png",
        "b_depth_color.png",
        "a_1_depth.png",
        "a_1_depth_color.png",
    ]
    with Image.open(out / "a_1_depth.png") as file:
        assert file.size == (50, 50)


def test_more_than_256_classes_give_16_bit_labels_and_no_ignore_colour(tmp_path):
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    labels = np.array([[0, 299, 1], [256, 255, 0]])
    names = [f"class{k}" for k in range(300)]
    labels_path, mask_path, _ = write_segmentation(image, labels, names, tmp_path, "many")
    with Image.open(labels_path) as file:
        assert file.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(file), labels)
    mask = np.asarray(Image.open(mask_path))
    assert mask[1, 1].tolist() == palette(300)[255].tolist()  # 255 is a class here, not "ignore"


def test_explicit_checkpoint_is_refused(images, tmp_path):
    cfg = ModelConfig(task="seg", method="explicit", classes="nyu_scenes", neck_channels=16, head_channels=16)
    checkpoint = save_model(
        build_model(cfg, with_text=False), Config(model=cfg, eval=SMALL_EVAL), tmp_path / "ck"
    )
    with pytest.raises(InputError, match="oracle that needs ground-truth labels"):
        predict_paths(checkpoint, [images["wide"]], tmp_path / "out")


def test_output_stems_never_collide():
    stems = output_stems([Path(p) for p in ("x/a.jpg", "y/a.png", "z/a_1.jpg", "w/A.bmp")])
    assert stems == ["a", "a_1", "a_1_1", "A_2"]
    assert len({s.casefold() for s in stems}) == len(stems)


def test_corrupt_image_is_an_input_error_naming_it(checkpoints, images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(InputError, match="broken.jpg"):
        predict_paths(checkpoints["seg"], [images["wide"], bad], tmp_path / "out")


def test_empty_folder_and_missing_path_are_input_errors(checkpoints, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no pictures here")
    with pytest.raises(InputError, match="empty: folder holds no images"):
        predict_paths(checkpoints["seg"], [empty], tmp_path / "out")
    # a TIFF is read in a folder as when it is named
    Image.new("RGB", (40, 30), (120, 80, 40)).save(empty / "scan.tif")
    written = predict_paths(checkpoints["seg"], [empty], tmp_path / "tif")
    assert written and all(path.name.startswith("scan") for path in written)
    with pytest.raises(InputError, match="nowhere.png: no such file or folder"):
        predict_paths(checkpoints["seg"], [tmp_path / "nowhere.png"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # inputs are checked before anything is written


def test_overrides_bad_key_and_model_keys_fail(checkpoints, images, tmp_path, caplog):
    with pytest.raises(InputError, match="unknown config key eval.windoww"):
        predict_paths(checkpoints["seg"], [images["wide"]], tmp_path / "out", overrides=["eval.windoww=64"])
    with pytest.raises(InputError, match="--set model.max_depth: a trained checkpoint's model cannot change"):
        predict_paths(
            checkpoints["depth"], [images["wide"]], tmp_path / "out", overrides=["model.max_depth=5"]
        )
    with caplog.at_level(logging.INFO, logger="iedp.engine.predict"):
        predict_paths(checkpoints["depth"], [images["wide"]], tmp_path / "out", overrides=["eval.flip=false"])
    assert any("wide.jpg (101x67): depth" in r.getMessage() for r in caplog.records)  # one line per image


def test_cli_predict(checkpoints, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", checkpoints["seg"], str(images["tall"]), "--out", str(out)]) == 0
    assert (out / "tall_labels.png").is_file()
    assert main(["predict", checkpoints["seg"], str(tmp_path / "missing.jpg"), "--out", str(out)]) == 2
    assert "missing.jpg: no such file or folder" in capsys.readouterr().err
