"""``iedp score`` on small folders of label maps and depth maps."""

import argparse
import json
import math

import numpy as np
import pytest
from PIL import Image

from iedp import score
from iedp.cli import build_parser
from iedp.data.images import write_depth_png
from iedp.errors import InputError


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["score", *argv])


def _write_labels(folder, maps: dict[str, list[list[int]]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, values in maps.items():
        Image.fromarray(np.array(values, dtype=np.uint8)).save(folder / f"{stem}.png")


def test_score_seg_by_hand(tmp_path, capsys):
    # ADE convention with 3 classes: stored 1..3 are classes 0..2, stored 0 is ignored.
    _write_labels(tmp_path / "gt", {"a": [[1, 1, 2], [2, 2, 0]], "b": [[3, 3]]})
    _write_labels(tmp_path / "pred", {"a": [[1, 2, 2], [2, 1, 3]], "b": [[3, 1]]})
    out = tmp_path / "out" / "seg.json"
    args = _parse(["seg", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--num-classes", "3",
                   "--json", str(out)])  # fmt: skip
    assert args.func is score.run
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    # class 0: I=1, P=3, L=2 -> IoU 1/4; class 1: I=2, P=3, L=3 -> 1/2; class 2: I=1, P=1, L=2 -> 1/2
    # (the stored 3 predicted on a's ignored pixel does not count)
    assert result["num_images"] == 2
    assert metrics["IoU"]["class_0"] == pytest.approx(25.0)
    assert metrics["IoU"]["class_1"] == pytest.approx(50.0)
    assert metrics["IoU"]["class_2"] == pytest.approx(50.0)
    assert metrics["mIoU"] == pytest.approx(125 / 3)
    assert metrics["aAcc"] == pytest.approx(100 * 4 / 7)
    printed = capsys.readouterr().out
    assert "class_1" in printed and "mIoU 41.67" in printed


def test_score_seg_ade_names_and_nan_as_null(tmp_path):
    _write_labels(tmp_path / "gt", {"x": [[1, 4]]})
    _write_labels(tmp_path / "pred", {"x": [[1, 4]]})
    out = tmp_path / "ade.json"
    args = _parse(["seg", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json", str(out)])
    assert score.run(args) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["IoU"]["wall"] == 100.0 and metrics["IoU"]["floor"] == 100.0
    assert metrics["IoU"]["sky"] is None
    assert metrics["mIoU"] == 100.0


def test_score_seg_no_reduce_zero_label(tmp_path):
    _write_labels(tmp_path / "gt", {"x": [[0, 1, 255]]})
    _write_labels(tmp_path / "pred", {"x": [[0, 0, 1]]})
    out = tmp_path / "r.json"
    args = _parse(["seg", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--num-classes", "2",
                   "--no-reduce-zero-label", "--json", str(out)])  # fmt: skip
    assert score.run(args) == 0
    assert json.loads(out.read_text())["metrics"]["aAcc"] == pytest.approx(50.0)


def test_score_depth(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    gt = np.full((480, 640), 2.0)
    gt[0, 0] = 0.0
    write_depth_png(tmp_path / "gt" / "kitchen_rgb_00001.png", gt)
    write_depth_png(tmp_path / "gt" / "kitchen_rgb_00002.png", gt)
    write_depth_png(tmp_path / "pred" / "kitchen_rgb_00001.png", gt)  # perfect
    np.save(tmp_path / "pred" / "kitchen_rgb_00002.npy", np.full((1, 480, 640), 2.5, dtype=np.float32))
    out = tmp_path / "depth.json"
    args = _parse(
        ["depth", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json", str(out)]
    )
    assert score.run(args) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["count"] == 2
    assert metrics["rmse"] == pytest.approx(0.25)  # (0 + 0.5) / 2 images
    assert metrics["abs_rel"] == pytest.approx(0.125)
    assert metrics["d1"] == pytest.approx(0.5)  # 2.5 / 2 = 1.25 is not < 1.25
    assert metrics["log10"] == pytest.approx(math.log10(1.25) / 2)
    assert "rmse" in capsys.readouterr().out


def test_score_depth_crop_none_on_other_sizes(tmp_path):
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
        write_depth_png(tmp_path / folder / "a.png", np.full((30, 40), 3.0))
    base = ["depth", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    with pytest.raises(
        InputError, match="a.png: 30x40, but --crop eigen is for 480x640 NYUv2 maps; use --crop none"
    ):
        score.run(_parse(base))
    assert score.run(_parse([*base, "--crop", "none"])) == 0


def test_score_mismatched_sets(tmp_path):
    _write_labels(tmp_path / "gt", {name: [[1]] for name in ("a", "b", "c", "d", "e", "f", "g")})
    _write_labels(tmp_path / "pred", {name: [[1]] for name in ("a", "z")})
    args = _parse(["seg", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")])
    with pytest.raises(InputError) as error:
        score.run(args)
    message = str(error.value)
    assert "6 ground-truth file(s)" in message and "b, c, d, e, f, ... (1 more)" in message
    assert "1 prediction(s)" in message and "no ground truth: z" in message


def test_score_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    _write_labels(tmp_path / "gt", {"a": [[1]]})
    with pytest.raises(InputError, match="missing: prediction folder not found"):
        score.run(_parse(["seg", "--pred", str(tmp_path / "missing"), "--gt", str(tmp_path / "gt")]))
    with pytest.raises(InputError, match=r"empty: no prediction files \(.png\)"):
        score.run(_parse(["seg", "--pred", str(tmp_path / "empty"), "--gt", str(tmp_path / "gt")]))


def test_score_rejects_bad_prediction_values(tmp_path):
    _write_labels(tmp_path / "gt", {"a": [[1, 2]]})
    _write_labels(tmp_path / "pred", {"a": [[1, 9]]})
    args = _parse(
        ["seg", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--num-classes", "3"]
    )
    with pytest.raises(InputError, match=r"pred/a.png: label value 9 outside the allowed range 0\.\.3"):
        score.run(args)


def test_score_depth_reads_the_nyu_tree_through_a_list_file(tmp_path):
    """--list: the ground truth is where an NYUv2 list file names it under the root (--gt), in scene folders
    (official_splits/test/bathroom/sync_depth_00045.png), and each prediction is found by the name `iedp evaluate
    --save-predictions` gives it (bathroom_rgb_00045), as the dataset names the sample."""
    from iedp.data.nyu import NYUDepthV2

    root, pred = tmp_path / "nyu", tmp_path / "pred"
    pred.mkdir()
    gt = np.full((480, 640), 2.0)
    for scene, index in (("bathroom", 45), ("bedroom", 46)):
        folder = root / "official_splits" / "test" / scene
        folder.mkdir(parents=True)
        Image.new("RGB", (640, 480)).save(folder / f"rgb_{index:05d}.jpg")
        write_depth_png(folder / f"sync_depth_{index:05d}.png", gt)
    (tmp_path / "test.txt").write_text(
        "bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 518.8579\n"
        "bedroom/rgb_00046.jpg bedroom/sync_depth_00046.png 518.8579\n"
    )
    names = [sample["name"] for sample in NYUDepthV2(root, tmp_path / "test.txt")]
    assert names == ["bathroom_rgb_00045", "bedroom_rgb_00046"]
    write_depth_png(pred / f"{names[0]}.png", gt)  # perfect
    write_depth_png(pred / f"{names[1]}.png", np.full((480, 640), 2.5))
    base = ["depth", "--pred", str(pred), "--gt", str(root), "--list", str(tmp_path / "test.txt")]
    out = tmp_path / "depth.json"
    assert score.run(_parse([*base, "--json", str(out)])) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert (
        metrics["count"] == 2
        and metrics["rmse"] == pytest.approx(0.25)
        and metrics["d1"] == pytest.approx(0.5)
    )

    (root / "test.txt").write_text((tmp_path / "test.txt").read_text())
    assert score.run(_parse([*base[:-1], "test.txt"])) == 0  # a list file under the root, as data.test_list

    (pred / f"{names[1]}.png").unlink()
    with pytest.raises(InputError, match="1 ground-truth file.* have no prediction: bedroom_rgb_00046"):
        score.run(_parse(base))
    with pytest.raises(InputError, match="--list: only for depth"):
        score.run(_parse(["seg", *base[1:]]))
    (tmp_path / "bad.txt").write_text("kitchen/rgb_00001.jpg kitchen/sync_depth_00001.png\n")
    with pytest.raises(InputError, match="bad.txt, line 1: file not found: .*kitchen/rgb_00001.jpg"):
        score.run(_parse([*base[:-1], str(tmp_path / "bad.txt")]))
    with pytest.raises(InputError, match="elsewhere: --gt with --list is the NYUv2 root"):
        score.run(_parse([*base[:4], str(tmp_path / "elsewhere"), *base[5:]]))
