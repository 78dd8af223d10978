"""Evaluation protocols and `iedp evaluate` on real dataset layouts with odd, non-square images."""

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from iedp.cli import main
from iedp.config import Config, ModelConfig
from iedp.data.check import check_split
from iedp.data.images import write_depth_png
from iedp.engine.evaluate import evaluate_checkpoint
from iedp.engine.inference import predict_padded, segment, sliding_window, window_starts
from iedp.errors import InputError
from iedp.model_files import load_model, save_model
from iedp.models.build import build_model
from iedp.score import run as score


@pytest.mark.parametrize(
    ("size", "window", "stride", "starts"),
    [
        (640, 480, 160, [0, 160]),
        (480, 480, 160, [0]),
        (300, 512, 341, [0]),
        (700, 512, 341, [0, 188]),
        (1000, 512, 341, [0, 341, 488]),
    ],
)
def test_window_starts(size, window, stride, starts):
    assert window_starts(size, window, stride) == starts


def pointwise(images: torch.Tensor) -> torch.Tensor:
    """A per-pixel 'model': its windowed average must equal the whole-image pass exactly."""
    weight = torch.arange(6, dtype=torch.float32).view(2, 3, 1, 1) - 2.5
    return F.conv2d(images, weight)


def test_sliding_window_average_equals_whole_image_pass():
    torch.manual_seed(0)
    image = torch.randn(1, 3, 150, 230)
    whole = pointwise(image)
    windowed = sliding_window(pointwise, image, window=64, stride=40, multiple=64)
    torch.testing.assert_close(windowed, whole)
    # a window that covers the image is one padded pass, whatever the model
    blur = torch.nn.Conv2d(3, 2, 5, padding=2)
    with torch.no_grad():
        torch.testing.assert_close(
            sliding_window(blur, image, window=256, stride=100, multiple=64), predict_padded(blur, image, 64)
        )
        # overlapping windows of a model with context do differ from the whole pass: the test above can fail
        assert not torch.allclose(sliding_window(blur, image, window=64, stride=40, multiple=64), blur(image))


def test_segment_multi_scale_averages_probabilities():
    image = torch.randn(1, 3, 64, 96)
    scores = segment(
        pointwise, image, (67, 101), window=64, stride=40, multiple=64, scales=(1.0, 1.5), flip=True
    )
    assert scores.shape == (1, 2, 67, 101)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(1, 67, 101))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    seg = ModelConfig(task="seg", method="iedp", classes="ade20k", neck_channels=16, head_channels=16)
    depth = ModelConfig(
        task="depth", method="vpd", classes="nyu_scenes", depth_fuse_channels=32, depth_head_channels=16
    )
    for name, cfg in (("seg", seg), ("depth", depth)):
        save_model(build_model(cfg, with_text=False).eval(), Config(model=cfg), root / name)
    return root


SIZES = [(75, 113), (97, 61)]  # (height, width): odd and non-square


def write_ade20k(root, rng):
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "images/validation" / f"ADE_val_{i}.jpg"
        )
        Image.fromarray(rng.integers(0, 151, (h, w), dtype=np.uint8)).save(
            root / "annotations/validation" / f"ADE_val_{i}.png"
        )


def test_evaluate_ade20k_odd_sizes_agrees_with_score(checkpoints, tmp_path):
    write_ade20k(tmp_path / "ade", np.random.default_rng(0))
    preds = tmp_path / "preds"
    overrides = [
        "data.dataset=ade20k",
        f"data.root={tmp_path / 'ade'}",
        "eval.window=64",
        "eval.stride=43",
        "eval.short_side=64",
    ]
    metrics = evaluate_checkpoint(
        checkpoints / "seg", overrides, save_predictions=str(preds), json_path=str(tmp_path / "m.json")
    )
    for i, (h, w) in enumerate(SIZES):
        saved = np.array(Image.open(preds / f"ADE_val_{i}.png"))
        assert saved.shape == (h, w) and saved.min() >= 1 and saved.max() <= 150  # ADE20K's own 1..150
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["mIoU"] == pytest.approx(metrics["mIoU"])
    # `iedp score` on the saved predictions gives the same numbers as evaluate
    out = tmp_path / "score.json"
    args = argparse.Namespace(
        task="seg",
        pred=preds,
        gt=tmp_path / "ade/annotations/validation",
        json=out,
        num_classes=150,
        reduce_zero_label=True,
        crop="eigen",
    )
    assert score(args) == 0
    scored = json.loads(out.read_text())["metrics"]
    for key in ("mIoU", "mAcc", "aAcc"):
        assert scored[key] == pytest.approx(metrics[key], abs=1e-6)
    assert 0 <= metrics["aAcc"] < 100


def test_evaluate_nyu_layout_odd_sizes_and_cli(checkpoints, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    root = tmp_path / "nyu"
    lines = []
    for i, (h, w) in enumerate(SIZES):
        folder = root / "official_splits/test" / ("kitchen" if i == 0 else "bedroom")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"rgb_{i:05d}.jpg")
        write_depth_png(folder / f"sync_depth_{i:05d}.png", rng.uniform(0.5, 8.0, (h, w)).astype(np.float32))
        rel = folder.relative_to(root)
        lines.append(f"{rel}/rgb_{i:05d}.jpg {rel}/sync_depth_{i:05d}.png 518.8579")
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    preds = tmp_path / "preds"
    sets = [
        "data.dataset=nyu",
        f"data.root={root}",
        "data.test_list=test.txt",
        "eval.depth_window=64",
        "eval.depth_stride=32",
        "eval.depth_crop=none",
    ]
    argv = [
        "evaluate",
        str(checkpoints / "depth"),
        "--save-predictions",
        str(preds),
        "--json",
        str(tmp_path / "m.json"),
    ]
    assert main(argv + [f"--set={s}" for s in sets]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert metrics["count"] == 2 and 0 < metrics["rmse"] < 10 and 0 <= metrics["d1"] <= 1
    for i, (h, w) in enumerate(SIZES):
        scene = "kitchen" if i == 0 else "bedroom"
        saved = np.array(Image.open(preds / f"{scene}_rgb_{i:05d}.png"))
        assert saved.shape == (h, w) and saved.dtype == np.uint16 and saved.min() > 0 and saved.max() <= 10000
    # a model key cannot change on a checkpoint; a bad override is one line and exit status 2
    assert main(["evaluate", str(checkpoints / "depth"), "--set", "model.max_depth=3"]) == 2
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    with pytest.raises(InputError, match="--multi-scale / eval.multi_scale: segmentation only"):
        evaluate_checkpoint(checkpoints / "depth", multi_scale=True)
    # a list file named relative to the working folder (VPD's lists live in its repository, not the data)
    (tmp_path / "lists").mkdir()
    shutil.copy(root / "test.txt", tmp_path / "lists" / "vpd_test.txt")
    monkeypatch.chdir(tmp_path)
    listed = [*sets[:2], "data.test_list=lists/vpd_test.txt", *sets[3:]]
    assert evaluate_checkpoint(checkpoints / "depth", listed, json_path="m2.json")["rmse"] == metrics["rmse"]
    # the Eigen crop on frames that are not NYUv2's 480x640: refused before evaluating, and listed by data check
    eigen = [*sets[:-1], "eval.depth_crop=eigen"]
    with pytest.raises(
        InputError, match=r"eval.depth_crop=eigen: .* but kitchen_rgb_00000 is \d+x\d+; set eval"
    ):
        evaluate_checkpoint(checkpoints / "depth", eigen)
    config = load_model(checkpoints / "depth", eigen)[1]
    assert any(
        "eval.depth_crop=eigen is defined on NYUv2's" in p for p in check_split(config, "val").problems
    )


def test_explicit_oracle_is_evaluated_with_the_sample_prompt():
    from iedp.engine.inference import model_predictor

    torch.manual_seed(0)
    cfg = ModelConfig(task="seg", method="explicit", classes="synthetic", neck_channels=16, head_channels=16)
    model = build_model(cfg).eval()
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        wall = model_predictor(model, {"prompt": "a photo of a wall"}, torch.device("cpu"))(image)
        bed = model_predictor(model, {"prompt": "a photo of a bed and lamp"}, torch.device("cpu"))(image)
    assert not torch.equal(wall, bed)
    with pytest.raises(ValueError, match="label prompts"):
        model_predictor(model, {}, torch.device("cpu"))(image)
