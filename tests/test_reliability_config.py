"""Bad config values and files: one line naming the key (or file), exit status 2, before any work starts."""

import re

import pytest

from iedp.cli import main
from iedp.config import MAX_YAML_NODES, load_config
from iedp.errors import InputError


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("train.max_steps=-5", "train.max_steps: -5 must be at least 1"),
        ("train.lr=.inf", "train.lr: inf is not a finite number"),
        ("train.lr=nan", "train.lr: nan is not a finite number"),
        ("train.lr=0", "train.lr: 0.0 must be above 0"),
        ("train.checkpoints_total_limit=-1", "train.checkpoints_total_limit: -1 must be at least 1"),
        ("train.checkpoints_total_limit=0", "train.checkpoints_total_limit: 0 must be at least 1"),
        ("train.batch_size=0", "train.batch_size: 0 must be at least 1"),
        ("train.grad_accum=0", "train.grad_accum: 0 must be at least 1"),
        ("train.checkpoint_every=0", "train.checkpoint_every: 0 must be at least 1"),
        ("train.log_every=0", "train.log_every: 0 must be at least 1"),
        ("train.out=", "train.out: empty"),
        ("eval.window=0", "eval.window: 0 must be at least 1"),
        ("eval.stride=-3", "eval.stride: -3 must be at least 1"),
        ("eval.stride=200", "eval.stride: 200 is larger than eval.window=128"),
        ("eval.depth_stride=500", "eval.depth_stride: 500 is larger than eval.depth_window=480"),
        ("eval.batch_size=0", "eval.batch_size: 0 must be at least 1"),
        ("eval.scales=[1.0,-1.0]", "eval.scales: -1.0 must be above 0"),
        ("data.resolution=0", "data.resolution: 0 must be at least 64"),
        ("data.resolution=96", "data.resolution: 96 is not a multiple of 64"),
        ("data.num_workers=-1", "data.num_workers: -1 must be at least 0"),
        ("model.dropout=1.5", "model.dropout: 1.5 must be in 0..1"),
        ("model.max_depth=0", "model.max_depth: 0.0 must be above 0"),
        ("train.max_steps=1e10", "train.max_steps: '1e10' is not an integer"),
        ("data.augment=maybe", "data.augment: 'maybe' is not a boolean"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(assignment, message, capsys):
    with pytest.raises(InputError, match="^" + re.escape(message)):
        load_config("demo_seg", [assignment])
    assert main(["train", "demo_seg", "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_every_shipped_recipe_passes_the_checks():
    for name in ("demo_seg", "demo_depth", "ade20k_iedp", "ade20k_vpd", "nyu_iedp", "nyu_vpd"):
        load_config(name)


def test_set_values_are_read_by_the_field_type():
    config = load_config(
        "demo_seg",
        [
            "train.mixed_precision=no",  # YAML would read false
            "train.lr=1e10",  # YAML 1.1 would read a string
            "train.grad_clip=null",
            "train.checkpoints_total_limit=none",
            "data.augment=no",
            "eval.scales=[1.0, 1.5]",
            "model.classes=123",
        ],
    )
    assert config.train.mixed_precision == "no" and config.train.lr == 1e10
    assert config.train.grad_clip is None and config.train.checkpoints_total_limit is None
    assert config.data.augment is False and config.eval.scales == (1.0, 1.5) and config.model.classes == "123"


def test_binary_file_as_yaml(tmp_path, capsys):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)) * 8)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights.yaml: not a text file" in err


def test_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    lines = ['x0: &a0 ["lol", "lol"]']
    for level in range(1, 9):
        lines.append(f"x{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("model:\n  classes:\n" + "".join(f"    {line}\n" for line in lines))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"more than {MAX_YAML_NODES} values" in err
    # many alias uses are refused by count, before anything is built
    path.write_text("a: &a 1\nb: [" + ", ".join(["*a"] * 150) + "]\n")
    with pytest.raises(InputError, match="more than 100 aliases"):
        load_config(path)


def test_a_long_value_is_cut_in_the_message(capsys):
    assert main(["train", "demo_seg", "--set", "train.max_steps=" + "9x" * 5000]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 300 and "train.max_steps" in err


def test_make_tiny_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    weights = tmp_path / "weights" / "unet"
    weights.mkdir(parents=True)
    (weights / "diffusion_pytorch_model.safetensors").write_bytes(b"real weights")
    assert main(["make-tiny", str(tmp_path / "weights")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "folder is not empty" in err and "--force" in err
    assert (weights / "diffusion_pytorch_model.safetensors").read_bytes() == b"real weights"
    (tmp_path / "file").write_text("keep")
    assert main(["make-tiny", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and (tmp_path / "file").read_text() == "keep"


def test_depth_scale_is_refused_where_the_dataset_fixes_the_units():
    """Only custom depth folders read data.depth_scale; on NYUv2 or KITTI it would be silently ignored."""
    for recipe in ("nyu_vpd", "kitti_vpd"):
        with pytest.raises(InputError, match="data.depth_scale: data.dataset=.* does not read it"):
            load_config(recipe, ["data.depth_scale=256"])
    assert load_config("custom_depth_vpd", ["data.depth_scale=256"]).data.depth_scale == 256
