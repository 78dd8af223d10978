"""Readers, datasets, prompts and transforms on files written in the real layouts."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iedp.config import Config, DataConfig, ModelConfig
from iedp.data.ade20k import ADE20K
from iedp.data.folders import DataProblems
from iedp.data.images import check_same_size, read_depth_png, read_label, read_rgb, write_depth_png
from iedp.data.nyu import LIST_FOLDERS, NYUDepthV2, read_list_file
from iedp.data.prompts import match_scene, scene_prompt, seg_prompt
from iedp.data.transforms import DepthTrainTransform, SegTrainTransform, random_crop, rescale_size
from iedp.engine.data import build_dataset
from iedp.errors import InputError
from iedp.resources import read_names

RNG = np.random.default_rng(0)


def _jpeg(path: Path, height: int, width: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return pixels


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- readers


def test_read_rgb_converts_modes(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    _png(tmp_path / "gray.png", gray)
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    _png(tmp_path / "rgba.png", np.zeros((3, 4, 4), dtype=np.uint8) + 7)
    for name in ("gray.png", "palette.png", "rgba.png"):
        rgb = read_rgb(tmp_path / name)
        assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert (read_rgb(tmp_path / "gray.png")[..., 1] == gray).all()


def test_read_rgb_truncated_jpeg(tmp_path):
    path = tmp_path / "ADE_train_00000001.jpg"
    _jpeg(path, 333, 517)
    _truncate(path)
    with pytest.raises(InputError, match="ADE_train_00000001.jpg: cannot decode image.*truncated"):
        read_rgb(path)


def test_read_rgb_missing_file(tmp_path):
    with pytest.raises(InputError, match="nothere.jpg: file not found"):
        read_rgb(tmp_path / "nothere.jpg")


def test_read_label_reduce_zero_label(tmp_path):
    _png(tmp_path / "a.png", np.array([[0, 1, 150, 255]], dtype=np.uint8))
    assert read_label(tmp_path / "a.png", 150, reduce_zero_label=True).tolist() == [[255, 0, 149, 255]]
    _png(tmp_path / "b.png", np.array([[0, 1, 149, 255]], dtype=np.uint8))
    assert read_label(tmp_path / "b.png", 150, reduce_zero_label=False).tolist() == [[0, 1, 149, 255]]


def test_read_label_out_of_range(tmp_path):
    path = tmp_path / "ADE_val_00000007.png"
    _png(path, np.array([[3, 200]], dtype=np.uint8))
    with pytest.raises(
        InputError, match=r"ADE_val_00000007.png: label value 200 outside the allowed range 0\.\.150"
    ):
        read_label(path, 150, reduce_zero_label=True)
    with pytest.raises(InputError, match=r"label value 3 outside the allowed range 0\.\.2"):
        read_label(path, 3, reduce_zero_label=False)


def test_read_label_rejects_16_bit(tmp_path):
    _png(tmp_path / "deep.png", np.zeros((2, 2), dtype=np.uint16))
    with pytest.raises(InputError, match="deep.png: not an 8-bit label map"):
        read_label(tmp_path / "deep.png", 150, True)


def test_depth_png_round_trip(tmp_path):
    millimetres = np.array([[0, 1000, 2345], [65535, 500, 9999]], dtype=np.uint16)
    _png(tmp_path / "sync_depth_00001.png", millimetres)
    depth = read_depth_png(tmp_path / "sync_depth_00001.png")
    assert depth.dtype == np.float32
    np.testing.assert_allclose(depth, millimetres / 1000.0, rtol=1e-6)
    write_depth_png(tmp_path / "again.png", depth)
    assert (np.asarray(Image.open(tmp_path / "again.png")) == millimetres).all()


def test_depth_png_must_be_16_bit(tmp_path):
    path = tmp_path / "sync_depth_00002.png"
    _png(path, np.full((4, 4), 3, dtype=np.uint8))
    with pytest.raises(InputError, match="sync_depth_00002.png: not a 16-bit depth PNG"):
        read_depth_png(path)


def test_size_check_names_both_files():
    with pytest.raises(
        InputError, match=r"lab.png: size 333x516 \(HxW\) does not match image img.jpg of size 333x517"
    ):
        check_same_size(np.zeros((333, 517, 3)), "img.jpg", np.zeros((333, 516)), "lab.png")


# ----------------------------------------------------------------------------- ADE20K


def _ade_root(tmp_path: Path, split: str, sizes: list[tuple[int, int]]) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    for index, (height, width) in enumerate(sizes):
        stem = f"ADE_{'train' if split == 'training' else 'val'}_{index + 1:08d}"
        _jpeg(root / "images" / split / f"{stem}.jpg", height, width)
        label = RNG.integers(0, 151, (height, width), dtype=np.uint8)
        label[: height // 2] = 1  # a dominant "wall" so prompts are predictable
        _png(root / "annotations" / split / f"{stem}.png", label)
    return root


def test_ade20k_training_sample(tmp_path):
    root = _ade_root(tmp_path, "training", [(333, 517), (400, 300)])
    dataset = ADE20K(root, "training")
    assert len(dataset) == 2
    sample = dataset[0]
    assert sample["image"].shape == (3, 512, 512) and sample["image"].dtype == torch.float32
    assert sample["image"].min() >= -1.0 and sample["image"].max() <= 1.0
    assert sample["label"].shape == (512, 512) and sample["label"].dtype == torch.int64
    values = set(sample["label"].unique().tolist())
    assert values <= set(range(150)) | {255}
    assert sample["prompt"].startswith("a photo of a ")
    assert sample["prompt"] == seg_prompt(sample["label"], read_names("ade20k_classes.txt"))
    assert sample["name"] == "ADE_train_00000001"
    assert torch.equal(dataset[0]["image"], sample["image"])  # deterministic for a seed and epoch
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["image"], sample["image"])


def test_ade20k_validation_keeps_label_size(tmp_path):
    root = _ade_root(tmp_path, "validation", [(333, 517)])
    sample = ADE20K(root, "validation")[0]
    assert sample["image"].shape == (3, 512, 795)  # short side 512
    assert sample["label"].shape == (333, 517)
    assert sample["prompt"].startswith("a photo of a wall")


def test_ade20k_missing_annotation(tmp_path):
    root = _ade_root(tmp_path, "training", [(20, 30), (20, 30)])
    (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(InputError, match="ADE_train_00000002.png: annotation not found"):
        ADE20K(root, "training")


def test_ade20k_empty_folder(tmp_path):
    for sub in ("images", "annotations"):
        (tmp_path / sub / "training").mkdir(parents=True)
    with pytest.raises(InputError, match="training: no .jpg images"):
        ADE20K(tmp_path, "training")
    with pytest.raises(InputError, match="not one of training, validation"):
        ADE20K(tmp_path, "train")


def test_ade20k_skip_bad(tmp_path):
    root = _ade_root(tmp_path, "training", [(40, 60), (40, 60)])
    bad = root / "images" / "training" / "ADE_train_00000001.jpg"
    _truncate(bad)
    with pytest.raises(InputError, match="ADE_train_00000001.jpg: cannot decode"):
        ADE20K(root, "training")[0]
    dataset = ADE20K(root, "training", skip_bad=True)
    assert dataset[0]["name"] == "ADE_train_00000002"
    assert list(dataset.skipped) == [str(bad)]
    assert "cannot decode" in dataset.skipped[str(bad)]


# ----------------------------------------------------------------------------- NYUv2


def _nyu_frame(root: Path, folder: str, index: int) -> tuple[str, str]:
    rgb = f"{folder}/rgb_{index:05d}.jpg"
    depth = f"{folder}/sync_depth_{index:05d}.png"
    _jpeg(root / rgb, 480, 640)
    millimetres = RNG.integers(0, 10000, (480, 640)).astype(np.uint16)
    _png(root / depth, millimetres)
    return rgb, depth


def test_nyu_list_file_and_samples(tmp_path, caplog):
    root = tmp_path / "sync"
    a = _nyu_frame(root, "office_kitchen_0001a", 1)
    b = _nyu_frame(root, "kitchen_0028b", 45)
    c = _nyu_frame(root, "mystery_place_0001", 2)
    list_file = tmp_path / "nyu_train.txt"
    list_file.write_text(f"/{a[0]} /{a[1]} 518.8579\n\n{b[0]} {b[1]}\n{c[0]} {c[1]} 518.8579\n")
    with caplog.at_level(logging.WARNING):
        dataset = NYUDepthV2(root, list_file)
    assert len(dataset) == 3
    assert "mystery_place_0001" in caplog.text

    sample = dataset[0]
    assert sample["image"].shape == (3, 480, 640) and sample["depth"].shape == (1, 480, 640)
    expected = np.asarray(Image.open(root / a[1])) / 1000.0
    np.testing.assert_allclose(sample["depth"][0].numpy(), expected, rtol=1e-6)
    assert sample["scene"] == "office_kitchen"
    assert sample["scene_id"] == read_names("nyu_scenes.txt").index("office_kitchen")
    assert sample["prompt"] == "a photo of a office kitchen"
    assert sample["name"] == "office_kitchen_0001a_rgb_00001"
    assert dataset[1]["scene"] == "kitchen"
    unknown = dataset[2]
    assert (unknown["scene"], unknown["scene_id"], unknown["prompt"]) == ("", -1, "a photo")

    train = NYUDepthV2(root, list_file, augment=True, seed=3)
    sample = train[1]
    assert sample["image"].shape == (3, 512, 512) and sample["depth"].shape == (1, 512, 512)
    assert (sample["depth"][:, 480:] == 0).all() and (sample["depth"][:, :, 480:] == 0).all()
    assert torch.equal(train[1]["image"], sample["image"])


def test_nyu_lists_as_bts_and_vpd_write_them(tmp_path):
    """data.root at the folder holding sync/ and official_splits/; training lines relative to sync/ (with a leading
    "/"), test lines relative to official_splits/test/, as in VPD's train_list.txt / test_list.txt and BTS's
    nyudepthv2_{train,test}_files_with_gt.txt; lines relative to the root and absolute lines still work."""
    root = tmp_path / "nyu"
    _nyu_frame(root / "sync", "kitchen_0028b", 45)
    _nyu_frame(root / "sync", "living_room_0019", 111)
    _nyu_frame(root / "official_splits" / "test", "bathroom", 45)
    _nyu_frame(root / "official_splits" / "test", "bedroom", 46)
    (root / "train.txt").write_text(
        "/kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png 518.8579\n"
        "sync/living_room_0019/rgb_00111.jpg sync/living_room_0019/sync_depth_00111.png 518.8579\n"
    )
    absolute = root / "official_splits" / "test" / "bedroom"
    (root / "test.txt").write_text(
        "bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 518.8579\n"
        f"{absolute}/rgb_00046.jpg {absolute}/sync_depth_00046.png\n"
    )
    config = Config(
        model=ModelConfig(task="depth", method="vpd", classes="nyu_scenes"),
        data=DataConfig(dataset="nyu", root=str(root), train_list="train.txt", test_list="test.txt"),
    )
    train, test = build_dataset(config, "train"), build_dataset(config, "val")
    assert [e.rgb for e in train.entries] == [
        root / "sync/kitchen_0028b/rgb_00045.jpg",
        root / "sync/living_room_0019/rgb_00111.jpg",
    ]
    assert [e.depth for e in test.entries] == [
        root / "official_splits/test/bathroom/sync_depth_00045.png",
        absolute / "sync_depth_00046.png",
    ]
    assert [s["scene"] for s in (train[0], test[0])] == ["kitchen", "bathroom"]
    assert test[0]["name"] == "bathroom_rgb_00045"
    # the test list read as a training list still finds its files (its own folder is tried second)
    assert read_list_file(root / "test.txt", root, LIST_FOLDERS["train"])[0].rgb == test.entries[0].rgb


@pytest.mark.parametrize("line", ["kitchen/rgb_00001.jpg", "a b c d"])
def test_nyu_bad_list_line(tmp_path, line):
    root = tmp_path / "test"
    rgb, depth = _nyu_frame(root, "kitchen", 1)
    list_file = tmp_path / "nyu_test.txt"
    list_file.write_text(f"{rgb} {depth}\n{line}\n")
    with pytest.raises(InputError, match=r"nyu_test.txt, line 2: expected 'rgb depth \[focal\]'"):
        NYUDepthV2(root, list_file)


def test_nyu_missing_file(tmp_path):
    root = tmp_path / "test"
    rgb, depth = _nyu_frame(root, "kitchen", 1)
    list_file = tmp_path / "nyu_test.txt"
    list_file.write_text(f"{rgb} {depth}\nkitchen/rgb_00009.jpg kitchen/sync_depth_00009.png\n")
    with pytest.raises(InputError, match=r"nyu_test.txt, line 2: file not found: .*kitchen/rgb_00009.jpg"):
        NYUDepthV2(root, list_file)
    # every bad line at once, as data check lists them
    list_file.write_text(
        f"{rgb} {depth}\nkitchen/rgb_00009.jpg {depth}\na b c d\n{rgb} kitchen/nothing.png\n"
    )
    with pytest.raises(DataProblems) as error:
        NYUDepthV2(root, list_file)
    assert [p.split(": ")[0].split(", ")[-1] for p in error.value.problems] == ["line 2", "line 3", "line 4"]


def test_nyu_8_bit_depth(tmp_path):
    root = tmp_path / "test"
    rgb, depth = _nyu_frame(root, "bedroom", 1)
    _png(root / depth, np.zeros((480, 640), dtype=np.uint8))
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"{rgb} {depth}\n")
    with pytest.raises(InputError, match="sync_depth_00001.png: not a 16-bit depth PNG"):
        NYUDepthV2(root, list_file)[0]


# ----------------------------------------------------------------------------- prompts


NAMES = ["wall", "floor", "bed", "lamp"]


def test_seg_prompt_largest_first():
    label = np.array([[0, 0, 0, 1], [1, 2, 255, 255]])
    assert seg_prompt(label, NAMES) == "a photo of a wall, floor and bed"
    assert seg_prompt(torch.from_numpy(label), NAMES) == "a photo of a wall, floor and bed"
    assert seg_prompt(np.array([[1, 1, 0]]), NAMES) == "a photo of a floor and wall"
    assert seg_prompt(np.array([[3]]), NAMES) == "a photo of a lamp"
    assert (
        seg_prompt(np.array([[2, 3, 3, 2]]), NAMES) == "a photo of a bed and lamp"
    )  # tie: lower index first
    assert seg_prompt(np.full((2, 2), 255), NAMES) == "a photo"


def test_seg_prompt_word_cap_drops_smallest():
    label = np.array([[0, 0, 0, 1, 1, 2]])
    assert seg_prompt(label, NAMES, tokenizer_max_words=7) == "a photo of a wall and floor"
    assert seg_prompt(label, NAMES, tokenizer_max_words=3) == "a photo"


def test_scene_prompt():
    assert scene_prompt("kitchen") == "a photo of a kitchen"
    assert scene_prompt("living_room") == "a photo of a living room"
    assert scene_prompt(None) == "a photo"
    assert scene_prompt("") == "a photo"


@pytest.mark.parametrize(
    ("folder", "scene"),
    [
        ("kitchen_0028b", "kitchen"),
        ("kitchen", "kitchen"),
        ("office_kitchen_0001a", "office_kitchen"),
        ("office_0003", "office"),
        ("nyu_office_0001", "office"),
        ("living_room_0038", "living_room"),
        ("study_room_0004", "study_room"),
        ("study_0008", "study"),
        ("home_office_0005", "home_office"),
        ("officers_0001", None),
        ("garage_0001", None),
    ],
)
def test_match_scene(folder, scene):
    assert match_scene(folder, read_names("nyu_scenes.txt")) == scene


# ----------------------------------------------------------------------------- transforms


def test_rescale_size_follows_mmcv():
    assert rescale_size(333, 517, (2048, 512)) == (512, 795)
    assert rescale_size(512, 4096, (2048, 512)) == (256, 2048)  # long edge bound


def test_seg_train_transform_is_deterministic():
    image = RNG.integers(0, 256, (333, 517, 3), dtype=np.uint8)
    label = RNG.integers(0, 150, (333, 517), dtype=np.uint8)
    transform = SegTrainTransform()
    a = transform(image, label, np.random.default_rng(7))
    b = transform(image, label, np.random.default_rng(7))
    c = transform(image, label, np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_seg_train_transform_pads():
    image = np.full((30, 50, 3), 200, dtype=np.uint8)
    label = np.ones((30, 50), dtype=np.uint8)
    transform = SegTrainTransform(crop_size=(64, 64), base_scale=(40, 20), ratio_range=(1.0, 1.0))
    image_t, label_t = transform(image, label, np.random.default_rng(0))
    assert image_t.shape == (3, 64, 64) and label_t.shape == (64, 64)
    assert (label_t[20:] == 255).all() and (label_t[:, 33:] == 255).all() and (label_t[:20, :33] == 1).all()
    assert (image_t[:, 20:] == 0).all() and (image_t[:, :, 33:] == 0).all()


def _max_share(label: np.ndarray) -> float:
    _, counts = np.unique(label, return_counts=True)
    return counts.max() / counts.sum()


def test_random_crop_cat_max_ratio():
    # 96 of 128 columns are class 0; only crops reaching past column 104 keep class 0 under 75%.
    label = np.zeros((32, 128), dtype=np.uint8)
    label[:, 96:] = 1
    image = np.zeros((32, 128, 3), dtype=np.float32)
    limited = [
        _max_share(random_crop(image, label, (32, 32), 0.75, np.random.default_rng(s))[1]) for s in range(40)
    ]
    free = [
        _max_share(random_crop(image, label, (32, 32), 1.0, np.random.default_rng(s))[1]) for s in range(40)
    ]
    assert sum(share < 0.75 for share in limited) >= 34  # up to 10 retries: ~96% succeed
    assert sum(share < 0.75 for share in free) <= 20  # one draw: ~25% succeed
    crop = random_crop(image, label, (32, 32), 0.75, np.random.default_rng(3))
    assert crop[0].shape == (32, 32, 3) and crop[1].shape == (32, 32)


def test_depth_train_transform_is_deterministic():
    image = RNG.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    depth = RNG.uniform(0.5, 9.0, (480, 640)).astype(np.float32)
    transform = DepthTrainTransform()
    a = transform(image, depth, np.random.default_rng(1))
    b = transform(image, depth, np.random.default_rng(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3, 512, 512) and a[1].shape == (1, 512, 512)
    kept = a[1][0, :480, :480].numpy()  # a 480x480 window of the (possibly flipped) frame, values untouched
    assert any((kept == frame[:, x : x + 480]).all() for frame in (depth, depth[:, ::-1]) for x in range(161))
