"""One inference path: ``iedp predict`` on an image gives exactly what ``iedp evaluate`` scores for it, and the
device / precision choices resolve the same way for both."""

import numpy as np
import pytest
import torch
from PIL import Image

from iedp.cli import main
from iedp.config import Config, DataConfig, EvalConfig, ModelConfig
from iedp.data.images import read_depth_png, write_depth_png
from iedp.engine.evaluate import evaluate_checkpoint
from iedp.engine.inference import resolve_device, resolve_dtype
from iedp.engine.predict import predict_paths
from iedp.errors import InputError
from iedp.model_files import save_model
from iedp.models.build import build_model

SMALL_EVAL = EvalConfig(short_side=64, window=64, stride=43, depth_window=64, depth_stride=32, batch_size=4)
SIZES = [(75, 113), (97, 61)]  # (height, width): odd and non-square
# depth runs at the training resolution (short side data.crop_size = 64, as NYUv2's 480-row frames at 480)
DEPTH_SIZES = [(64, 97), (101, 64)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    seg = ModelConfig(task="seg", method="iedp", classes="ade20k", neck_channels=16, head_channels=16)
    depth = ModelConfig(
        task="depth", method="iedp", classes="nyu_scenes", depth_fuse_channels=32, depth_head_channels=16
    )
    data = DataConfig(crop_size=64)
    for name, cfg in (("seg", seg), ("depth", depth)):
        config = Config(model=cfg, data=data, eval=SMALL_EVAL)
        save_model(build_model(cfg, with_text=False).eval(), config, root / name)
    return root


def test_predict_gives_what_evaluate_scores_segmentation(checkpoints, tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ade"
    images = []
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    for i, (h, w) in enumerate(SIZES):
        path = root / "images/validation" / f"ADE_val_{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        Image.fromarray(rng.integers(0, 151, (h, w), dtype=np.uint8)).save(
            root / "annotations/validation" / f"ADE_val_{i}.png"
        )
        images.append(path)
    scored = tmp_path / "scored"
    evaluate_checkpoint(
        checkpoints / "seg",
        ["data.dataset=ade20k", f"data.root={root}"],
        save_predictions=str(scored),
        json_path=str(tmp_path / "m.json"),
        device="cpu",
    )
    predicted = tmp_path / "predicted"
    predict_paths(checkpoints / "seg", images, predicted, device="cpu")
    for i in range(len(SIZES)):
        labels = np.asarray(Image.open(predicted / f"ADE_val_{i}_labels.png")).astype(np.int64)
        evaluated = np.asarray(Image.open(scored / f"ADE_val_{i}.png")).astype(np.int64)
        np.testing.assert_array_equal(labels + 1, evaluated)  # ADE20K's files count classes from 1


def test_predict_gives_what_evaluate_scores_depth(checkpoints, tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "nyu"
    lines, images = [], []
    for i, (h, w) in enumerate(DEPTH_SIZES):
        folder = root / "official_splits/test/kitchen"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"rgb_{i:05d}.png")
        write_depth_png(folder / f"sync_depth_{i:05d}.png", rng.uniform(0.5, 8.0, (h, w)).astype(np.float32))
        rel = folder.relative_to(root)
        lines.append(f"{rel}/rgb_{i:05d}.png {rel}/sync_depth_{i:05d}.png")
        images.append(folder / f"rgb_{i:05d}.png")
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    scored = tmp_path / "scored"
    argv = ["evaluate", str(checkpoints / "depth"), "--save-predictions", str(scored), "--device", "cpu"]
    sets = ["data.dataset=nyu", f"data.root={root}", "data.test_list=test.txt", "eval.depth_crop=none"]
    assert main([*argv, "--json", str(tmp_path / "m.json"), *(f"--set={s}" for s in sets)]) == 0
    predicted = tmp_path / "predicted"
    assert main(["predict", str(checkpoints / "depth"), *map(str, images), "--out", str(predicted)]) == 0
    for i in range(len(DEPTH_SIZES)):
        np.testing.assert_array_equal(
            read_depth_png(predicted / f"rgb_{i:05d}_depth.png"),
            read_depth_png(scored / f"kitchen_rgb_{i:05d}.png"),
        )


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = (
        torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    )
    assert resolve_dtype("auto", resolve_device(None)) == expected
    assert resolve_dtype("auto", cpu) == torch.float32  # bf16 only where the hardware has it
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype("fp16", cpu) == torch.float16
    with pytest.raises(InputError, match="--dtype"):
        resolve_dtype("int8", cpu)
    with pytest.raises(InputError, match="--device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")


def test_bf16_predict_runs_and_stays_close(checkpoints, tmp_path):
    image = tmp_path / "room.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    fp32 = predict_paths(checkpoints / "depth", [image], tmp_path / "fp32", device="cpu", dtype="fp32")[0]
    bf16 = predict_paths(checkpoints / "depth", [image], tmp_path / "bf16", device="cpu", dtype="bf16")[0]
    a, b = read_depth_png(fp32), read_depth_png(bf16)
    assert a.shape == b.shape == (40, 50)
    assert np.abs(a - b).max() < 0.1 * a.max()


def test_sliding_window_over_a_batch_equals_each_image_alone():
    from iedp.engine.inference import sliding_window

    torch.manual_seed(0)
    blur = torch.nn.Conv2d(3, 2, 5, padding=2)
    images = torch.randn(3, 3, 70, 90)
    with torch.no_grad():
        batched = sliding_window(blur, images, window=64, stride=40, multiple=64, batch_size=5)
        alone = torch.cat(
            [sliding_window(blur, image[None], window=64, stride=40, multiple=64) for image in images]
        )
    torch.testing.assert_close(batched, alone)
