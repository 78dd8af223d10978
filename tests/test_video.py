"""Video in ``iedp predict``: a generated 10-frame clip round-trips to a side-by-side MP4 with 10 frames of the
right size, frames predicted in batches, raw per-frame outputs on request (PyAV, ``pip install "iedp[video]"``)."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from iedp.api import Pipeline
from iedp.cli import main
from iedp.config import Config, EvalConfig, ModelConfig
from iedp.data.images import read_depth_png
from iedp.model_files import save_model
from iedp.models.build import build_model

av = pytest.importorskip("av", reason='video needs PyAV: pip install "iedp[video]"')

from iedp.video import VideoWriter, read_frames  # noqa: E402

SMALL_EVAL = EvalConfig(short_side=64, window=64, stride=48, depth_window=64, depth_stride=48, batch_size=4)
FRAMES, HEIGHT, WIDTH = 10, 47, 63  # odd: the MP4 pads to even sizes


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    writer = VideoWriter(root / "clip.mp4", Fraction(10), WIDTH, HEIGHT)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    for t in range(FRAMES):  # a gradient moving right
        writer.write(np.stack([(x * 4 + t * 8) % 256, y * 5, np.full_like(x, 128)], -1).astype(np.uint8))
    writer.close()
    return root / "clip.mp4"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    seg = ModelConfig(task="seg", method="iedp", classes="synthetic", neck_channels=16, head_channels=16)
    depth = ModelConfig(
        task="depth", method="iedp", classes="nyu_scenes", depth_fuse_channels=32, depth_head_channels=16
    )
    return {
        task: save_model(build_model(cfg, with_text=False), Config(model=cfg, eval=SMALL_EVAL), root / task)
        for task, cfg in (("seg", seg), ("depth", depth))
    }


def test_generated_clip_reads_back(clip):
    frames, rate, _ = read_frames(clip)
    frames = list(frames)
    assert rate == 10 and len(frames) == FRAMES
    assert frames[0].shape == (HEIGHT + 1, WIDTH + 1, 3)  # padded to even by the encoder


@pytest.mark.parametrize("task", ["seg", "depth"])
def test_predict_video_writes_side_by_side_mp4_and_raw_frames(checkpoints, clip, tmp_path, task):
    out = tmp_path / "out"
    argv = [
        "predict",
        str(checkpoints[task]),
        str(clip),
        "--out",
        str(out),
        "--raw-frames",
        "--video-batch",
        "4",
    ]
    assert main([*argv, "--device", "cpu"]) == 0
    frames, rate, _ = read_frames(out / "clip_side_by_side.mp4")
    frames = list(frames)
    assert rate == 10 and len(frames) == FRAMES
    assert frames[0].shape == (HEIGHT + 1, 2 * (WIDTH + 1), 3)  # input | prediction
    source = next(read_frames(clip)[0])
    assert (
        np.abs(frames[0][:, : WIDTH + 1].astype(int) - source.astype(int)).mean() < 8
    )  # lossy, but the input
    raw = sorted((out / "clip_frames").iterdir())
    assert [p.name for p in raw] == [
        f"{i:06d}_{'labels' if task == 'seg' else 'depth'}.png" for i in range(FRAMES)
    ]
    # batched frames agree with one-by-one prediction of the decoded frame (up to float reordering)
    pipeline = Pipeline.from_pretrained(checkpoints[task], device="cpu")
    single = pipeline(source)
    if task == "seg":
        labels = np.asarray(Image.open(raw[0]))
        assert labels.shape == source.shape[:2] and (labels == single.labels).mean() > 0.99
    else:
        depth = read_depth_png(raw[0])
        np.testing.assert_allclose(depth, np.maximum(single.depth, 1e-3), atol=2e-3)


def test_missing_pyav_is_one_line(checkpoints, clip, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    assert main(["predict", str(checkpoints["seg"]), str(clip), "--out", str(tmp_path / "out")]) == 2
    assert 'pip install "iedp[video]"' in capsys.readouterr().err
