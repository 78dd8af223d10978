"""Your own data, KITTI (Eigen split, BTS layout) and Cityscapes: loaders on files written in their real layouts at odd
sizes, crops and ranges against hand-computed values, the list of problems of broken trees, `iedp data check`, and a
2-step `iedp train` on the example trees of examples/."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from iedp.cli import main
from iedp.config import load_config
from iedp.configs import packaged_config
from iedp.data.check import check_data
from iedp.data.cityscapes import Cityscapes
from iedp.data.custom import CustomDepth, CustomSegmentation, convert_label
from iedp.data.folders import DataProblems
from iedp.data.kitti import KittiDepth, kb_crop_box
from iedp.engine.data import build_dataset
from iedp.errors import InputError
from iedp.metrics.depth import depth_errors, garg_crop, valid_mask

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_rgb(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------- your own segmentation data


def seg_tree(root: Path, classes: str = "wall\nfloor\nlamp\n") -> Path:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes)
    for split, count in (("train", 3), ("val", 1)):
        for index in range(count):
            h, w = 37 + index, 53 + 2 * index
            write_rgb(root / "images" / split / f"im{index}.jpg", h, w, seed=index)
            label = np.zeros((h, w), np.uint8)
            label[h // 2 :] = 1
            label[:3, :5] = 2
            label[-1] = 255
            write_png(root / "labels" / split / f"im{index}.png", label)
    return root


def test_convert_label_index_maps_by_hand():
    raw = np.array([[0, 1, 2], [3, 255, 7]], np.uint8)
    label, bad = convert_label(raw, num_classes=3, reduce_zero_label=False, ignore_value=255)
    assert label.tolist() == [[0, 1, 2], [255, 255, 255]] and bad == ["3", "7"]
    label, bad = convert_label(raw, num_classes=3, reduce_zero_label=True, ignore_value=255)
    assert label.tolist() == [[255, 0, 1], [2, 255, 255]] and bad == ["7"]
    label, bad = convert_label(raw, num_classes=8, reduce_zero_label=False, ignore_value=7)
    assert label.tolist() == [[0, 1, 2], [3, 255, 255]] and bad == ["255"]


def test_custom_seg_loads_odd_sizes_and_prompts(tmp_path):
    root = seg_tree(tmp_path / "seg")
    train = CustomSegmentation(root, "train", class_names=["wall", "floor", "lamp"])
    assert len(train) == 3 and train.class_names == ["wall", "floor", "lamp"]
    sample = train[0]
    # the training crop, padded to 512
    assert sample["image"].shape == (3, 512, 512) and sample["label"].shape == (512, 512)
    val = CustomSegmentation(root, "val", class_names=["wall", "floor", "lamp"], val_scale=(148, 37))
    sample = val[0]
    assert sample["label"].shape == (37, 53) and sample["image"].shape == (3, 37, 53)
    assert sample["prompt"] == "a photo of a floor, wall and lamp" and sample["name"] == "im0"
    assert set(sample["label"].unique().tolist()) == {0, 1, 2, 255}


def test_custom_seg_colour_labels_through_the_palette(tmp_path):
    root = seg_tree(tmp_path / "seg")
    (root / "palette.txt").write_text("10 20 30\n40, 50, 60\n70 80 90\nignore 0 0 0\n")
    colours = np.zeros((37, 53, 3), np.uint8)
    colours[:, :20] = (40, 50, 60)
    colours[:, 20:30] = (70, 80, 90)
    write_png(root / "labels" / "val" / "im0.png", colours)
    sample = CustomSegmentation(root, "val", class_names=["wall", "floor", "lamp"])[0]
    assert (sample["label"][:, :20] == 1).all() and (sample["label"][:, 20:30] == 2).all()
    assert (sample["label"][:, 30:] == 255).all()
    colours[0, 0] = (1, 2, 3)
    write_png(root / "labels" / "val" / "im0.png", colours)
    with pytest.raises(DataProblems, match=r"label values \(1, 2, 3\) are not classes"):
        CustomSegmentation(root, "val", class_names=["wall", "floor", "lamp"])


def test_custom_seg_lists_every_problem_at_once(tmp_path):
    root = seg_tree(tmp_path / "seg")
    (root / "labels" / "train" / "im1.png").unlink()  # image without label
    write_png(root / "labels" / "train" / "orphan.png", np.zeros((5, 5), np.uint8))  # label without image
    write_png(root / "labels" / "train" / "im2.png", np.full((39, 57), 5, np.uint8))  # value 5 > 3 classes
    write_png(root / "labels" / "train" / "im0.png", np.zeros((30, 53), np.uint8))  # wrong size
    (root / "palette.txt").write_text("1 2 3\n")  # one colour for three classes
    with pytest.raises(DataProblems) as error:
        CustomSegmentation(root, "train", class_names=["wall", "floor", "lamp"])
    problems = "\n".join(error.value.problems)
    assert len(error.value.problems) == 5, problems
    assert "im1.jpg: no label map" in problems
    assert "orphan.png: no image" in problems
    assert "1 class colours for the 3 classes" in problems
    assert "size 30x53 (HxW) does not match image" in problems
    (root / "palette.txt").unlink()
    with pytest.raises(DataProblems) as error:
        CustomSegmentation(root, "train", class_names=["wall", "floor", "lamp"])
    assert any("label values 5 are not classes: expected 0..2" in p for p in error.value.problems)
    with pytest.raises(DataProblems, match="differ from model.classes"):
        CustomSegmentation(root, "val", class_names=["a", "b", "c"])


def test_model_classes_dataset_resolves_to_the_folder(tmp_path):
    root = seg_tree(tmp_path / "seg")
    config = load_config("custom_seg_vpd", [f"data.root={root}", "model.weights=tiny", "data.crop_size=64"])
    assert config.model.classes == str(root / "classes.txt")
    assert len(build_dataset(config, "train")) == 3
    assert load_config("custom_depth_vpd", [f"data.root={root}"]).model.classes == "generic_scene"
    with pytest.raises(InputError, match="model.classes: 'dataset' is for"):
        load_config("kitti_vpd", ["model.classes=dataset"])
    with pytest.raises(InputError, match="multiples of 64"):
        build_dataset(load_config("custom_seg_vpd", [f"data.root={root}", "data.crop_size=100"]), "train")
    # a wrong root is named as such, not as the class list it would hold
    with pytest.raises(InputError, match=f"data.root: {tmp_path / 'nowhere'} is not a folder"):
        build_dataset(load_config("custom_seg_vpd", [f"data.root={tmp_path / 'nowhere'}"]), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=f"model.classes: {tmp_path / 'empty' / 'classes.txt'} not found"):
        build_dataset(load_config("custom_seg_vpd", [f"data.root={tmp_path / 'empty'}"]), "train")


# ----------------------------------------------------------------------------- your own depth data


def depth_tree(root: Path) -> Path:
    (root / "scenes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "scenes.txt").write_text("kitchen\nstreet\n")
    mm = np.zeros((41, 67), np.uint16)
    mm[10:20, 5:30] = 2560  # 10 m at scale 256, 2.56 m at scale 1000
    write_rgb(root / "images" / "train" / "kitchen" / "a.jpg", 41, 67)
    write_png(root / "depth" / "train" / "kitchen" / "a.png", mm)
    write_rgb(root / "images" / "train" / "street" / "b.png", 43, 69)
    (root / "depth" / "train" / "street").mkdir(parents=True)
    np.save(root / "depth" / "train" / "street" / "b.npy", np.full((43, 69), 3.25, np.float32))
    write_rgb(root / "images" / "val" / "street" / "c.png", 39, 65)
    (root / "depth" / "val" / "street").mkdir(parents=True)
    Image.fromarray(np.full((39, 65), 7.5, np.float32), mode="F").save(
        root / "depth" / "val" / "street" / "c.tiff"
    )
    return root


def test_custom_depth_formats_scales_and_folder_scenes(tmp_path):
    root = depth_tree(tmp_path / "depth")
    train = CustomDepth(
        root, "train", ["kitchen", "street"], scenes="folder", depth_scale=256.0, augment=False
    )
    a, b = train[0], train[1]
    assert a["depth"].shape == (1, 41, 67) and a["depth"][0, 15, 10] == 10.0 and a["depth"][0, 0, 0] == 0.0
    assert (a["scene"], a["scene_id"], a["prompt"], a["name"]) == (
        "kitchen",
        0,
        "a photo of a kitchen",
        "kitchen_a",
    )
    assert torch.allclose(b["depth"], torch.tensor(3.25)) and b["scene_id"] == 1
    assert (
        CustomDepth(root, "train", ["kitchen", "street"], depth_scale=1000.0, augment=False)[0]["depth"].max()
        == 2.56
    )
    val = CustomDepth(root, "val", ["kitchen", "street"], scenes="folder")
    assert val[0]["depth"].shape == (1, 39, 65) and torch.allclose(val[0]["depth"], torch.tensor(7.5))
    crop = CustomDepth(root, "train", ["kitchen", "street"])[0]  # training: 480x480 crop padded to 512
    assert crop["image"].shape == (3, 512, 512) and crop["scene"] == ""


def test_custom_depth_csv_scenes_and_problems(tmp_path):
    root = depth_tree(tmp_path / "depth")
    (root / "scenes.csv").write_text("image,scene\nkitchen/a,street\nb,kitchen\n")
    train = CustomDepth(root, "train", ["kitchen", "street"], scenes=root / "scenes.csv", augment=False)
    assert [train[i]["scene"] for i in range(2)] == ["street", "kitchen"]
    write_png(root / "depth" / "train" / "kitchen" / "a.png", np.zeros((41, 67), np.uint8))  # 8-bit
    np.save(root / "depth" / "train" / "street" / "b.npy", np.zeros((40, 69), np.float32))  # wrong size
    write_rgb(root / "images" / "train" / "kitchen" / "lonely.jpg", 5, 5)
    (root / "scenes.csv").write_text("kitchen/a,garage\n")
    with pytest.raises(DataProblems) as error:
        CustomDepth(root, "train", ["kitchen", "street"], scenes=root / "scenes.csv")
    problems = "\n".join(error.value.problems)
    assert len(error.value.problems) == 4, problems
    assert "lonely.jpg: no depth map" in problems and "not a 16-bit depth PNG (mode L)" in problems
    assert "size 40x69 (HxW) does not match" in problems and "scene names garage are not in" in problems


def test_a_scene_table_named_in_the_config_is_found_under_a_relative_root(tmp_path, monkeypatch, capsys):
    """``data.scenes=scenes.csv`` is read from ``data.root``, however the root is written (it was joined twice)."""
    depth_tree(tmp_path / "depth")
    (tmp_path / "depth" / "scenes.csv").write_text("image,scene\nkitchen/a,street\nb,kitchen\nc,street\n")
    monkeypatch.chdir(tmp_path)
    for root in ("depth", "./depth", str(tmp_path / "depth")):
        assert (
            main(["data", "check", "custom_depth_vpd", *_sets(f"data.root={root}", "data.scenes=scenes.csv")])
            == 0
        )
        out = capsys.readouterr().out
        assert "scenes: street ×1, kitchen ×1" in out and "0 problems" in out
    config = load_config("custom_depth_vpd", ["data.root=depth", "data.scenes=depth/scenes.csv"])
    assert build_dataset(config, "train", augment=False).scenes == ["street", "kitchen"]


# ----------------------------------------------------------------------------- KITTI


DRIVE = "2011_09_26_drive_0002_sync"


def kitti_tree(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """Two frames of a raw drive at KITTI's 375x1242 with sparse uint16 depth (metres x 256), a BTS list with a None
    line; the depth of frame 1 sits under depth_root/val/ as the annotated-depth download unpacks."""
    raw, annotated = tmp_path / "raw", tmp_path / "annotated"
    sparse = np.zeros((375, 1242), np.uint16)
    sparse[200:375:3, ::4] = 5 * 256  # 5 m on every 3rd row / 4th column of the lower part
    sparse[374, 1000] = 100 * 256  # 100 m: beyond the 80 m range (and below Garg's crop)
    lines = []
    for frame, folder in ((0, ""), (1, "val")):
        name = f"{frame:010d}.png"
        rgb = f"2011_09_26/{DRIVE}/image_02/data/{name}"
        depth = f"{DRIVE}/proj_depth/groundtruth/image_02/{name}"
        image = np.zeros((375, 1242, 3), np.uint8)
        image[..., 0] = (np.arange(1242) % 256)[None]
        image[..., 1] = (np.arange(375) % 256)[:, None]
        write_png(raw / rgb, image)
        write_png(annotated / folder / depth, sparse)
        lines.append(f"{rgb} {depth} 721.5377")
    lines.insert(1, f"2011_09_26/{DRIVE}/image_02/data/0000000005.png None 721.5377")
    (tmp_path / "test.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "drives.csv").write_text(
        "drive,category\n2011_09_26_drive_0002,residential\n"
    )  # header as README
    return raw, annotated, tmp_path / "test.txt", tmp_path / "drives.csv"


def test_kb_crop_and_garg_crop_by_hand():
    rows, cols = kb_crop_box(375, 1242)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (23, 375, 13, 1229)
    rows, cols = kb_crop_box(370, 1224)
    assert (rows.start, cols.start) == (18, 4)
    with pytest.raises(ValueError, match="smaller than the 352x1216"):
        kb_crop_box(351, 1300)
    rows, cols = garg_crop(352, 1216)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (143, 349, 43, 1172)
    gt = torch.ones(352, 1216)
    assert valid_mask(gt, 1e-3, 80.0, "garg").sum() == (349 - 143) * (1172 - 43)


def test_kitti_eigen_split_in_bts_layout(tmp_path):
    raw, annotated, test_list, drives = kitti_tree(tmp_path)
    dataset = KittiDepth(raw, annotated, test_list, scene_names=["city", "residential"], scenes=drives)
    assert len(dataset) == 2 and dataset.without_depth == 1  # the None line is skipped
    sample = dataset[1]
    assert sample["image"].shape == (3, 352, 1216) and sample["depth"].shape == (1, 352, 1216)
    # column c of the crop is column c + 13 of the frame; row r is row r + 23
    assert sample["image"][0, 0, 0] == torch.tensor(13 / 127.5 - 1)
    assert sample["image"][1, 0, 0] == torch.tensor(23 / 127.5 - 1)
    depth = sample["depth"][0]
    assert (
        depth[200 - 23, 16 - 13] == 5.0
        and depth[201 - 23, 16 - 13] == 0.0
        and depth[200 - 23, 17 - 13] == 0.0
    )
    assert depth.max() == 100.0  # stored; the 80 m range applies when scoring
    assert (sample["scene"], sample["prompt"]) == ("residential", "a photo of a residential")
    assert sample["name"] == f"{DRIVE}_image_02_0000000001"
    errors = depth_errors(torch.full((352, 1216), 5.0), depth, 1e-3, 80.0, "garg")
    assert errors["abs_rel"] == 0.0 and errors["d1"] == 1.0  # the 100 m pixel is out of range and crop
    train = KittiDepth(raw, annotated, test_list, augment=True, scene_names=["city"])
    assert train[0]["image"].shape == (3, 384, 704)  # 352x704 crop padded to a multiple of 64


def test_kitti_problems_and_config(tmp_path):
    raw, annotated, test_list, _ = kitti_tree(tmp_path)
    (annotated / "val" / DRIVE / "proj_depth/groundtruth/image_02/0000000001.png").unlink()
    text = test_list.read_text() + f"2011_09_26/{DRIVE}/image_02/data/0000000009.png\n"
    test_list.write_text(text)
    with pytest.raises(DataProblems) as error:
        KittiDepth(raw, annotated, test_list)
    problems = error.value.problems
    assert len(problems) == 2, problems
    assert "line 3: depth not found" in problems[0] and "line 4: expected 'raw_rel_path" in problems[1]
    config = load_config(
        "kitti_vpd",
        [
            f"data.root={raw}",
            f"data.depth_root={annotated}",
            f"data.test_list={test_list}",
            "model.weights=tiny",
        ],
    )
    assert (config.model.max_depth, config.eval.depth_crop, config.data.crop_width) == (80.0, "garg", 704)
    report, count = check_data(config, progress=False)
    assert count >= 3 and "[val] line" not in report and "depth not found" in report
    report, _ = check_data(
        load_config("kitti_vpd", [f"data.root={tmp_path}/no", f"data.depth_root={tmp_path}/nil"])
    )
    assert f"{tmp_path}/no: folder not found" in report and f"{tmp_path}/nil: folder not found" in report


# ----------------------------------------------------------------------------- Cityscapes


def cityscapes_tree(root: Path) -> Path:
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("lindau",))):
        for index, city in enumerate(cities):
            stem = f"{city}_000000_{index:06d}"
            write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 66, 130, seed=index)
            label = np.full((66, 130), 255, np.uint8)
            label[:, :19] = np.arange(19, dtype=np.uint8)[None]
            write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", label)
    return root


def test_cityscapes_layout(tmp_path):
    root = cityscapes_tree(tmp_path / "cityscapes")
    train = Cityscapes(root, "train")
    assert len(train) == 2 and train.class_names[0] == "road" and train.class_names[18] == "bicycle"
    assert train[0]["image"].shape == (3, 768, 768)  # training crop padded to 768
    val = Cityscapes(root, "val", val_scale=(4 * 66, 66))[0]
    assert val["image"].shape == (3, 66, 130) and val["label"].shape == (66, 130)
    assert val["label"][0, :19].tolist() == list(range(19)) and val["name"] == "lindau_000000_000000"
    config = load_config("cityscapes_vpd", [f"data.root={root}", "model.weights=tiny"])
    assert len(build_dataset(config, "val")) == 1 and config.eval.window == 768


def test_cityscapes_problems(tmp_path):
    root = cityscapes_tree(tmp_path / "cityscapes")
    label = root / "gtFine/train/bremen/bremen_000000_000001_gtFine_labelTrainIds.png"
    label.rename(label.with_name("bremen_000000_000001_gtFine_labelIds.png"))
    write_png(
        root / "gtFine/train/aachen/aachen_000000_000000_gtFine_labelTrainIds.png",
        np.full((66, 130), 19, np.uint8),
    )
    write_png(root / "gtFine/train/aachen/ghost_gtFine_labelTrainIds.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(DataProblems) as error:
        Cityscapes(root, "train")
    problems = "\n".join(error.value.problems)
    assert len(error.value.problems) == 2 and "createTrainIdLabelImgs.py" in problems and "ghost" in problems
    label.with_name("bremen_000000_000001_gtFine_labelIds.png").rename(label)
    (root / "gtFine/train/aachen/ghost_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(InputError, match="label value 19 outside the allowed range 0..18"):
        Cityscapes(root, "train")[0]


# ----------------------------------------------------------------------------- data check and train on examples/


TINY_SEG = [
    "model.weights=tiny",
    "data.crop_size=64",
    "eval.window=64",
    "eval.stride=64",
    "eval.short_side=64",
    "model.neck_channels=16",
    "model.head_channels=16",
]
TINY_DEPTH = [
    "model.weights=tiny",
    "data.scenes=folder",
    "data.crop_size=48",
    "eval.depth_window=64",
    "eval.depth_stride=32",
    "model.depth_fuse_channels=32",
    "model.depth_head_channels=16",
]
TWO_STEPS = [
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.batch_size=2",
    "train.eval_every=1",
    "train.log_every=1",
    "data.num_workers=0",
]


def _sets(*assignments: str) -> list[str]:
    return [arg for a in assignments for arg in ("--set", a)]


def test_data_check_on_the_examples(capsys):
    assert main(["data", "check", "custom_seg_iedp", *_sets(f"data.root={EXAMPLES / 'custom_seg'}")]) == 0
    out = capsys.readouterr().out
    assert "[train] 4 samples" in out and "[val] 2 samples" in out and "0 problems" in out
    assert "classes: 3 of 3 appear" in out and "car  in      4 samples" in out and "70x90 ×1" in out
    sets = _sets(f"data.root={EXAMPLES / 'custom_depth'}", "data.scenes=folder")
    assert main(["data", "check", "custom_depth_vpd", *sets]) == 0
    out = capsys.readouterr().out
    assert "scenes: corridor ×2, room ×2" in out and "% of pixels valid (model.max_depth=10.0)" in out


def test_data_check_lists_the_problems_of_a_broken_copy(tmp_path, capsys):
    root = tmp_path / "custom_seg"
    shutil.copytree(EXAMPLES / "custom_seg", root)
    (root / "labels/train/train_001.png").unlink()
    write_png(root / "labels/val/val_000.png", np.full((70, 90), 9, np.uint8))
    assert main(["data", "check", "custom_seg_vpd", *_sets(f"data.root={root}")]) == 1
    out = capsys.readouterr().out
    # a split whose folder the dataset refuses is not reported as empty
    assert (
        "[train] not read: the problems below stop the whole split from loading" in out
        and "0 samples" not in out
    )
    assert (
        "2 problems:" in out
        and "train_001.jpg: no label map" in out
        and "label values 9 are not classes" in out
    )


@pytest.mark.parametrize(
    ("recipe", "example", "sets"),
    [("custom_seg_iedp", "custom_seg", TINY_SEG), ("custom_depth_vpd", "custom_depth", TINY_DEPTH)],
)
def test_two_training_steps_on_the_examples(tmp_path, recipe, example, sets):
    out = tmp_path / "run"
    config = yaml.safe_load(packaged_config(recipe).read_text())
    config["train"]["mixed_precision"] = "no"  # the recipes' bf16 is for GPUs
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config))
    args = _sets(f"data.root={EXAMPLES / example}", f"train.out={out}", *sets, *TWO_STEPS)
    assert main(["train", str(tmp_path / "recipe.yaml"), *args]) == 0
    assert (out / "final" / "model.safetensors").is_file()
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [point["step"] for point in curve] == [1, 2]  # every evaluation, the last one also in metrics.json
    assert curve[-1] == json.loads((out / "metrics.json").read_text())
    assert "NaN" not in (out / "metrics.jsonl").read_text()  # standard JSON: a class without pixels is null


def test_a_run_on_a_relative_root_evaluates_from_anywhere(tmp_path, monkeypatch):
    """The checkpoint names its data absolutely, so `iedp evaluate run/final` works from another folder."""
    shutil.copytree(EXAMPLES / "custom_depth", tmp_path / "data")
    config = yaml.safe_load(packaged_config("custom_depth_vpd").read_text())
    config["train"]["mixed_precision"] = "no"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    args = _sets("data.root=data", "train.out=run", *TINY_DEPTH, *TWO_STEPS)
    assert main(["train", "recipe.yaml", *args]) == 0
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["config"]["data"]["root"] == str(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["evaluate", str(tmp_path / "run" / "final")]) == 0
