"""predict, score and image reading with bad or odd inputs: inputs never overwritten, failures listed, one line."""

import argparse
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from iedp.cli import main
from iedp.config import Config, EvalConfig, ModelConfig
from iedp.data.images import default_max_pixels, read_rgb
from iedp.engine import inference
from iedp.engine.inference import predict_image, resized_argmax
from iedp.engine.predict import output_stems
from iedp.errors import InputError
from iedp.model_files import load_model, save_model
from iedp.models.build import build_model
from iedp.score import run as score

SMALL_EVAL = EvalConfig(short_side=64, window=64, stride=48, depth_window=64, depth_stride=48, batch_size=4)


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    names = root / "classes.txt"
    names.write_text("wall\nfloor\nbed\n")
    cfg = ModelConfig(task="seg", classes=str(names), neck_channels=16, head_channels=16)
    return str(
        save_model(build_model(cfg, with_text=False), Config(model=cfg, eval=SMALL_EVAL), root / "seg")
    )


def _photo(path, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_predict_into_the_input_folder_never_overwrites_an_input(seg_checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "x.png", seed=1)
    user = _photo(folder / "x_mask.png", seed=2)  # the user's own photo, named like an output of x.png
    before = user.read_bytes()
    assert main(["predict", seg_checkpoint, str(folder), "--out", str(folder)]) == 0
    assert user.read_bytes() == before
    assert (folder / "x_1_mask.png").is_file() and (folder / "x_mask_mask.png").is_file()
    assert output_stems([folder / "x.png", folder / "x_mask.png"], folder) == ["x_1", "x_mask"]


def test_predict_goes_on_past_bad_files_and_lists_them(seg_checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    _photo(folder / "b_good.png")
    (folder / "c_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _photo(folder / "d_good.jpg")
    out = tmp_path / "out"
    assert main(["predict", seg_checkpoint, str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 of 4 inputs failed" in err and "a_broken.jpg" in err and "c_broken.png" in err
    assert (out / "b_good_labels.png").is_file() and (out / "d_good_labels.png").is_file()


@pytest.mark.parametrize("where", ["file", "proc"])
def test_predict_out_that_cannot_be_written_fails_before_work(seg_checkpoint, tmp_path, where, capsys):
    image = _photo(tmp_path / "a.png")
    out = tmp_path / "file.txt" if where == "file" else "/proc/iedp-out"
    if where == "file":
        out.write_text("keep")
    assert main(["predict", seg_checkpoint, str(image), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}" in err
    if where == "file":
        assert out.read_text() == "keep"


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to view: a portrait phone photo
    image.save(tmp_path / "portrait.jpg", exif=exif)
    assert read_rgb(tmp_path / "portrait.jpg").shape == (40, 20, 3)


def test_default_pixel_limit_fits_the_machine_and_says_how_to_raise_it(tmp_path, monkeypatch):
    monkeypatch.delenv("IEDP_MAX_PIXELS", raising=False)
    assert 1_000_000 <= default_max_pixels() <= 40_000_000
    monkeypatch.setenv("IEDP_MAX_PIXELS", "100")
    _photo(tmp_path / "big.png", size=(20, 10))
    with pytest.raises(InputError, match="big.png: .*set IEDP_MAX_PIXELS=200 to allow it"):
        read_rgb(tmp_path / "big.png")


def _score_args(tmp_path, task, **kw):
    values = dict(
        task=task,
        pred=tmp_path / "pred",
        gt=tmp_path / "gt",
        json=None,
        crop="none",
        num_classes=150,
        reduce_zero_label=True,
    )
    return argparse.Namespace(**(values | kw))


def test_score_depth_refuses_negative_depths(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    depth = np.full((4, 4), 2.0, dtype=np.float32)
    depth[0, 0] = -1.5
    np.save(tmp_path / "pred" / "a.npy", depth)
    Image.fromarray(np.full((4, 4), 2000, dtype=np.uint16)).save(tmp_path / "gt" / "a.png")
    with pytest.raises(InputError, match=r"a.npy: 1 negative depth values \(min -1.5\)"):
        score(_score_args(tmp_path, "depth"))


def _seg_files(tmp_path, classes=150):
    for sub in ("pred", "gt"):
        (tmp_path / sub).mkdir()
        Image.fromarray((np.arange(16 * 16).reshape(16, 16) % classes + 1).astype(np.uint8)).save(
            tmp_path / sub / "a.png"
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-classes", "-5"], "--num-classes: -5 must be in 1..255"),
        (["--json", "/proc/iedp.json"], "--json /proc: cannot write there"),
    ],
)
def test_score_arguments(tmp_path, argv, message, capsys):
    _seg_files(tmp_path)
    assert main(["score", "seg", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_score_seg_shows_the_best_and_worst_classes(tmp_path, capsys):
    _seg_files(tmp_path)
    base = ["score", "seg", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    assert main(base) == 0
    short = capsys.readouterr().out
    assert "more (--all)" in short and len(short.splitlines()) < 20
    assert main([*base, "--all"]) == 0
    assert len(capsys.readouterr().out.splitlines()) > 150


def test_pickled_weights_file_is_one_line_naming_it(tmp_path, capsys):
    import shutil

    from iedp.weights import tiny_weights_dir

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights_dir(), weights)
    unet = weights / "unet"
    for path in unet.glob("*.safetensors"):
        path.unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    (unet / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    argv = [
        "train",
        "demo_seg",
        "--set",
        f"model.weights={weights}",
        "--set",
        f"train.out={tmp_path / 'run'}",
    ]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().count("\n") == 0 or "Traceback" not in captured.err
    assert "diffusion_pytorch_model.bin" in captured.err.strip().splitlines()[-1]
    assert "code ran" not in captured.out


@pytest.mark.parametrize("size", [(37, 53), (128, 96), (5, 300)])
def test_resized_argmax_in_bands_equals_resizing_the_whole_map(size):
    scores = torch.randn(7, 16, 12, generator=torch.Generator().manual_seed(0))
    whole = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0].argmax(dim=0)
    banded = resized_argmax(scores, size, budget=7 * size[1] * 3)  # three rows per band
    assert banded.dtype == torch.int32
    assert (banded == whole).float().mean() == 1.0


def test_large_image_labels_come_in_bounded_memory_and_match(seg_checkpoint, monkeypatch):
    model, config = load_model(seg_checkpoint)
    image = np.random.default_rng(1).integers(0, 255, (96, 160, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    expected = predict_image(model, image, config, cpu).argmax(dim=0)
    monkeypatch.setattr(inference, "SCORE_BUDGET", 3 * 96 * 160 - 1)  # the image is now above the budget
    seen = []
    real = inference.resized_argmax
    monkeypatch.setattr(
        inference, "resized_argmax", lambda s, size: seen.append(s.shape) or real(s, size, 3 * 160)
    )
    labels = inference.predict_labels(model, image, config, cpu)
    assert seen == [(3, 64, 107)]  # the scores stay at the model's input size
    assert labels.shape == (96, 160)
    assert (labels == expected).float().mean() > 0.999
