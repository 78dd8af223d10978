"""The Python API (``iedp.load``) and hub folders on tiny checkpoints: any input kind and size, equal to
``iedp predict``'s files; ``from_pretrained(save_pretrained(m))`` bit for bit, with a model card."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import iedp
from iedp.api import DepthOutput, Pipeline, SegmentationOutput, to_rgb
from iedp.config import Config, EvalConfig, ModelConfig
from iedp.data.images import read_depth_png, read_rgb, write_depth_png
from iedp.engine.predict import predict_paths
from iedp.errors import InputError
from iedp.model_files import WEIGHTS_NAME, load_model, save_model
from iedp.models.build import build_model

CLASSES = ["wall", "floor", "ceiling", "bed", "lamp"]
SMALL_EVAL = EvalConfig(short_side=64, window=64, stride=48, depth_window=64, depth_stride=48, batch_size=4)


def gradient(height, width, seed, channels=3):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height), x * 0 + 200], -1)
    noise = rng.integers(0, 40, size=(height, width, 4))
    return np.clip(base + noise, 0, 255).astype(np.uint8)[..., :channels]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    names = root / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    seg = ModelConfig(task="seg", method="iedp", classes=str(names), neck_channels=16, head_channels=16)
    depth = ModelConfig(
        task="depth", method="iedp", classes="nyu_scenes", depth_fuse_channels=32, depth_head_channels=16
    )
    return {
        task: save_model(build_model(cfg, with_text=False), Config(model=cfg, eval=SMALL_EVAL), root / task)
        for task, cfg in (("seg", seg), ("depth", depth))
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Odd sizes, an RGBA PNG and a greyscale PNG."""
    root = tmp_path_factory.mktemp("images")
    Image.fromarray(gradient(67, 101, 0)).save(root / "odd.png")
    Image.fromarray(gradient(45, 70, 1, channels=4), "RGBA").save(root / "rgba.png")
    Image.fromarray(gradient(59, 33, 2)[..., 0], "L").save(root / "grey.png")
    return {p.stem: p for p in sorted(root.iterdir())}


def test_segmentation_api_equals_predict_files(checkpoints, files, tmp_path):
    model = iedp.load(checkpoints["seg"], device="cpu")
    assert model.task == "seg" and model.class_names == CLASSES and model.dtype == torch.float32
    # every input kind: paths, a PIL RGBA image, a greyscale numpy array; a list gives a list
    inputs = [
        files["odd"],
        Image.open(files["rgba"]),
        np.asarray(Image.open(files["grey"])),
        str(files["odd"]),
    ]
    results = model(inputs)
    assert isinstance(results, list) and len(results) == 4
    assert all(isinstance(r, SegmentationOutput) for r in results)
    out = tmp_path / "out"
    predict_paths(checkpoints["seg"], [files["odd"], files["rgba"], files["grey"]], out, device="cpu")
    for stem, result in zip(("odd", "rgba", "grey", "odd"), results, strict=True):
        height, width = read_rgb(files[stem]).shape[:2]
        assert result.labels.shape == (height, width) and result.image.shape == (height, width, 3)
        np.testing.assert_array_equal(result.labels, np.asarray(Image.open(out / f"{stem}_labels.png")))
        np.testing.assert_array_equal(
            result.mask, np.asarray(Image.open(out / f"{stem}_mask.png").convert("RGB"))
        )
        overlay_file = np.asarray(Image.open(out / f"{stem}_overlay.png").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(result.overlay), overlay_file[:height, :width])
        assert result.overlay_with_legend().size == Image.open(out / f"{stem}_overlay.png").size
        assert result.probabilities is None and result.attention is None
        areas = result.areas()
        assert set(areas) <= set(CLASSES) and sum(areas.values()) == pytest.approx(1.0)
    # one image in, one result out; the same numbers as in the list
    single = model(files["odd"])
    np.testing.assert_array_equal(single.labels, results[0].labels)


def test_probabilities_and_attention_maps_on_request(checkpoints, files):
    model = iedp.load(checkpoints["seg"], device="cpu")
    result = model(files["odd"], probabilities=True, attention=True)
    assert result.probabilities.shape == (len(CLASSES), 67, 101)
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.probabilities.argmax(axis=0), result.labels)
    assert result.attention.shape == (len(CLASSES), 67, 101)
    assert np.isfinite(result.attention).all() and result.attention.min() >= 0


def test_depth_api_equals_predict_files(checkpoints, files, tmp_path):
    model = iedp.load(checkpoints["depth"], device="cpu")
    results = model([files["odd"], Image.open(files["rgba"])])
    out = tmp_path / "out"
    predict_paths(checkpoints["depth"], [files["odd"], files["rgba"]], out, device="cpu")
    for stem, result in zip(("odd", "rgba"), results, strict=True):
        assert isinstance(result, DepthOutput)
        height, width = read_rgb(files[stem]).shape[:2]
        assert result.depth.shape == (height, width) and result.depth.dtype == np.float32
        saved = read_depth_png(out / f"{stem}_depth.png")
        write_depth_png(tmp_path / "api.png", np.maximum(result.depth, 1e-3))  # the millimetres predict wrote
        np.testing.assert_array_equal(read_depth_png(tmp_path / "api.png"), saved)
        assert result.color.size == (width, height)
        picture = np.asarray(Image.open(out / f"{stem}_depth_color.png").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(result.color), picture[:height, :width])  # same fixed scale


def test_input_conversion():
    rgba = gradient(5, 7, 0, channels=4)
    np.testing.assert_array_equal(to_rgb(rgba), rgba[..., :3])
    np.testing.assert_array_equal(to_rgb(Image.fromarray(rgba, "RGBA")), rgba[..., :3])
    grey = gradient(5, 7, 0)[..., 0]
    np.testing.assert_array_equal(to_rgb(grey), np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(to_rgb(grey[..., None]), np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(to_rgb(np.full((2, 3, 3), 1.0)), np.full((2, 3, 3), 255, np.uint8))
    # a phone photo stored sideways with EXIF orientation 6 (rotate 90° clockwise to view) is turned upright
    sideways = Image.fromarray(gradient(5, 7, 0))
    exif = sideways.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    sideways.save(buffer, format="JPEG", exif=exif.tobytes())
    assert to_rgb(Image.open(buffer)).shape == (7, 5, 3)
    for bad in (np.zeros((4, 4, 5), np.uint8), np.zeros((0, 3, 3), np.uint8), np.zeros((3, 3), np.int32), 42):
        with pytest.raises(InputError):
            to_rgb(bad)
    # floats outside 0..1 (a 0..255 image cast to float) or non-finite are refused, not clipped to white
    with pytest.raises(InputError, match=r"float values span 0..255, expected 0..1 \(pass uint8"):
        to_rgb(np.linspace(0, 255, 12, dtype=np.float32).reshape(2, 2, 3))
    with pytest.raises(InputError, match="NaN or infinite"):
        to_rgb(np.full((2, 2, 3), np.nan, np.float32))


def test_arrays_meet_the_pixel_limit_and_depth_models_refuse_probabilities(checkpoints, monkeypatch):
    monkeypatch.setenv("IEDP_MAX_PIXELS", "100")
    with pytest.raises(InputError, match="image array is 11x10, above the limit of 100 pixels"):
        to_rgb(np.zeros((10, 11, 3), np.uint8))
    monkeypatch.delenv("IEDP_MAX_PIXELS")
    model = iedp.load(checkpoints["depth"], device="cpu")
    for option in ({"probabilities": True}, {"attention": True}):
        with pytest.raises(InputError, match="probabilities and attention: segmentation only"):
            model(np.zeros((8, 8, 3), np.uint8), **option)


def test_save_pretrained_round_trip_is_bit_exact_with_model_card(checkpoints, files, tmp_path):
    (checkpoints["seg"] / "metrics.json").write_text(
        json.dumps({"checkpoint": "x", "metrics": {"mIoU": 12.5, "mAcc": 20.25, "aAcc": 70.0}})
    )
    try:
        model = Pipeline.from_pretrained(checkpoints["seg"], device="cpu")
        folder = model.save_pretrained(tmp_path / "hub")
    finally:
        (checkpoints["seg"] / "metrics.json").unlink()
    assert {p.name for p in folder.iterdir()} == {
        "model.safetensors",
        "config.json",
        "metrics.json",
        "README.md",
    }
    loaded = Pipeline.from_pretrained(folder, device="cpu")
    original, restored = model.model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded(files["odd"]).labels, model(files["odd"]).labels)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "license: apache-2.0" in card and "library_name: iedp" in card
    assert "`iedp`" in card and "IEDP (Wang, Cao et al." in card  # the method
    assert (
        "| mIoU | 12.5000 |" in card and "value (%)" in card and "| aAcc | 70.0000 |" in card
    )  # the last evaluation
    assert "iedp.load(" in card
    # the saved folder carries its metrics on: saved again, the card still has them
    again = loaded.save_pretrained(tmp_path / "again")
    assert "| mIoU | 12.5000 |" in (again / "README.md").read_text()


def test_pipeline_holds_weights_in_its_precision_and_saves_the_checkpoint_exactly(
    checkpoints, files, tmp_path, caplog
):
    """from_pretrained holds the weights in bf16 as `iedp predict` does, yet save_pretrained writes the checkpoint's
    own fp32 weights; changed after loading, the weights are saved as held (in fp32) with a warning."""
    source = checkpoints["seg"]
    pipeline = Pipeline.from_pretrained(source, device="cpu", dtype="bf16")
    assert {p.dtype for p in pipeline.model.parameters()} == {torch.bfloat16}
    assert pipeline.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    pipeline.to("cpu")  # moved, it stays held for inference
    assert pipeline.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert next(pipeline.model.parameters()).dtype == torch.bfloat16
    model, config = load_model(source)
    # a model passed in runs as it is held: fp32 weights under bf16 autocast
    autocast_only = Pipeline(model, config, device="cpu", dtype="bf16")
    assert next(model.parameters()).dtype == torch.float32
    held, cast = pipeline(files["odd"]).labels, autocast_only(files["odd"]).labels
    assert (held == cast).mean() > 0.9 and len(np.unique(cast)) > 1

    original = load_file(source / WEIGHTS_NAME)
    saved = load_file(pipeline.save_pretrained(tmp_path / "exact") / WEIGHTS_NAME)
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original)

    with torch.no_grad():
        pipeline.model.unet.conv_in.bias.add_(1.0)
    with caplog.at_level(logging.WARNING, logger="iedp.api"):
        changed = load_file(pipeline.save_pretrained(tmp_path / "changed") / WEIGHTS_NAME)
    assert "changed since they were loaded" in caplog.text
    bias = next(k for k in original if k.endswith("unet.conv_in.bias"))
    assert changed[bias].dtype == torch.float32
    assert torch.equal(changed[bias], (original[bias].bfloat16() + 1.0).float())
    assert torch.equal(changed["class_tokens"], original["class_tokens"].bfloat16().float())


def test_missing_folder_that_is_no_hub_id_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # tests never reach the network
    with pytest.raises(InputError, match="no such folder"):
        iedp.load(tmp_path / "nothing" / "here")
    with pytest.raises(InputError, match="no such folder"):
        iedp.load("someone/not-cached-model")


def test_point_cloud_back_projection_and_ply_round_trip(tmp_path):
    from iedp.pointcloud import default_focal, depth_to_points, read_ply, write_ply

    depth = np.full((4, 6), 2.0, np.float32)
    depth[0, 0] = 0.0  # no depth: dropped
    image = gradient(4, 6, 0)
    points, colours = depth_to_points(depth, image, focal=2.0)
    assert points.shape == (23, 3) and colours.shape == (23, 3)
    # pixel (row 3, column 5): centre (5.5, 3.5) against the principal point (3, 2), z = 2 m, f = 2 px
    np.testing.assert_allclose(points[-1], [(5.5 - 3) * 2 / 2, -(3.5 - 2) * 2 / 2, -2.0])
    np.testing.assert_array_equal(colours[-1], image[3, 5])
    back, back_colours = read_ply(write_ply(tmp_path / "cloud.ply", points, colours))
    np.testing.assert_array_equal(back, points)
    np.testing.assert_array_equal(back_colours, colours)
    assert len(depth_to_points(np.ones((100, 100)), np.zeros((100, 100, 3), np.uint8), 50.0, 1000)[0]) <= 1000
    assert default_focal(640) == pytest.approx(518.8579)
    with pytest.raises(ValueError, match="focal"):
        depth_to_points(depth, image, focal=0.0)


def test_push_to_hub_uploads_the_saved_folder(checkpoints, monkeypatch):
    """No network in tests: HfApi is replaced by a recorder; the folder it is given is save_pretrained's."""
    calls = {}

    class RecordingApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            calls["repo"] = (repo_id, private, exist_ok, repo_type)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["card"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    url = iedp.load(checkpoints["depth"], device="cpu").push_to_hub(
        "someone/tiny-depth", private=True, token="t"
    )
    assert url == "https://huggingface.co/someone/tiny-depth"
    assert calls["repo"] == ("someone/tiny-depth", True, True, "model") and calls["token"] == "t"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert "depth-estimation" in calls["card"] and "No evaluation recorded yet" in calls["card"]
