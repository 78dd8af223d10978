"""Recipes that inherit: ``base:`` resolves to the same config the flat recipes gave, and a loop is refused."""

import json
from pathlib import Path

import pytest

from iedp.config import config_from_dict, load_config
from iedp.errors import InputError

SHIPPED = Path(__file__).parents[1] / "iedp" / "configs"
# Every shipped recipe as it loaded when each was written out in full (before ``base:``), resolved.
FLAT = json.loads((Path(__file__).parent / "data" / "recipes_resolved.json").read_text(encoding="utf-8"))


def _plain(tree: dict) -> dict:
    return json.loads(json.dumps(tree))


def test_every_shipped_recipe_equals_its_flat_form() -> None:
    assert sorted(FLAT) == sorted(p.name for p in SHIPPED.glob("*.yaml"))
    for name, flat in FLAT.items():
        assert _plain(load_config(SHIPPED / name).to_dict()) == flat, name
        assert _plain(load_config(name.removesuffix(".yaml")).to_dict()) == flat, name
    assert "base: ade20k_iedp" in (SHIPPED / "ade20k_vpd.yaml").read_text(encoding="utf-8")


def test_base_relative_to_the_recipe_folder_merges_sections(tmp_path: Path) -> None:
    (tmp_path / "parent.yaml").write_text(
        "model:\n  task: depth\n  classes: nyu_scenes\ntrain:\n  lr: 1.0e-3\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../parent.yaml\nmodel:\n  method: vpd\n")
    config = load_config(tmp_path / "sub" / "child.yaml", ["train.max_steps=7"])
    assert (config.model.task, config.model.classes, config.model.method) == ("depth", "nyu_scenes", "vpd")
    assert (config.train.lr, config.train.max_steps) == (1e-3, 7)
    # a shipped recipe's name works as a base too; the child's value wins
    (tmp_path / "mine.yaml").write_text("base: nyu_vpd\ntrain:\n  out: runs/mine\n")
    mine = load_config(tmp_path / "mine.yaml")
    assert mine.train.out == "runs/mine" and mine.model.method == "vpd" and mine.data.dataset == "nyu"


def test_a_base_loop_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(
        InputError, match=r"base: chain loops \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\)"
    ) as error:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(error.value)
    (tmp_path / "self.yaml").write_text("base: self\n")
    with pytest.raises(InputError, match="loops"):
        load_config(tmp_path / "self.yaml")
    (tmp_path / "lost.yaml").write_text("base: nowhere\n")
    with pytest.raises(InputError, match="base nowhere of a recipe in .*: no such file"):
        load_config(tmp_path / "lost.yaml")
    with pytest.raises(InputError, match=r"config demo_segg: no such file \(did you mean demo_seg\?\)"):
        load_config("demo_segg")


def test_checkpoints_save_the_resolved_recipe() -> None:
    config = load_config("ade20k_vpd")
    tree = config.to_dict()  # what save_model writes into config.json and train_state into state.json
    assert "base" not in tree and _plain(tree) == FLAT["ade20k_vpd.yaml"]
    assert config_from_dict(tree) == config
