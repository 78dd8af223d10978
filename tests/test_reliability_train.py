"""Training and checkpoint faults: nothing lost, nothing silently wrong, one line and a meaningful exit status."""

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from iedp.cli import main
from iedp.config import load_config
from iedp.engine import train as train_module
from iedp.engine.train import train
from iedp.errors import InputError, Interrupted
from iedp.model_files import load_model

TINY_RUN = [
    "model.weights=tiny",
    "model.classes=synthetic",
    "data.resolution=64",
    "data.num_train=8",
    "data.num_val=2",
    "data.num_workers=0",
    "model.neck_channels=16",
    "model.head_channels=16",
    "train.batch_size=2",
    "train.eval_every=0",
    "train.warmup_steps=1",
]


def sets(out: Path, *extra: str) -> list[str]:
    return [f"--set={s}" for s in [*TINY_RUN, f"train.out={out}", *extra]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(
        load_config(
            "demo_seg", [*TINY_RUN, f"train.out={out}", "train.max_steps=2", "train.checkpoint_every=1"]
        )
    )
    return out


def test_train_into_an_existing_run_is_refused_and_nothing_changes(run, capsys):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert main(["train", "demo_seg", *sets(run, "train.max_steps=3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"train.out {run}: already holds a run" in err and "--resume" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_train_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("keep")
    assert main(["train", "demo_seg", *sets(tmp_path / "file")]) == 2
    assert "train.out" in capsys.readouterr().err and (tmp_path / "file").read_text() == "keep"


def _copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_corrupt_rng_state_on_resume_is_refused(run, tmp_path):
    copy = _copy_run(run, tmp_path)
    rng = copy / "checkpoints" / "checkpoint-2" / "random_states_0.pkl"
    rng.write_bytes(b"\x80\x04corrupt")
    with pytest.raises(InputError, match="random_states_0.pkl: not a valid RNG-state file"):
        train(load_config("demo_seg", [*TINY_RUN, f"train.out={copy}", "train.max_steps=3"]), resume="latest")
    torch.save({"not": torch.zeros(1)}, rng)
    with pytest.raises(InputError, match="random_states_0.pkl: not an RNG-state file"):
        train(load_config("demo_seg", [*TINY_RUN, f"train.out={copy}", "train.max_steps=3"]), resume="latest")
    rng.unlink()
    with pytest.raises(InputError, match="random_states_0.pkl: missing"):
        train(load_config("demo_seg", [*TINY_RUN, f"train.out={copy}", "train.max_steps=3"]), resume="latest")


def test_non_finite_checkpoint_weights_are_refused(run, tmp_path, capsys):
    copy = _copy_run(run, tmp_path)
    weights = copy / "final" / "model.safetensors"
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point() and not k.startswith("class_tokens"))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, weights, metadata={"format": "iedp-checkpoint/1"})
    with pytest.raises(InputError, match="weight tensors hold NaN or infinite values"):
        load_model(copy / "final")
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    assert main(["predict", str(copy / "final"), str(image), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN or infinite" in err and name in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda meta: meta.pop("components"), "'components' must map"),
        (lambda meta: meta.pop("config"), "'config' is NoneType, expected a mapping"),
        (lambda meta: meta.update(config="seg"), "'config' is str, expected a mapping"),
        (lambda meta: meta.update(class_names=meta["class_names"][:2]), "class names for"),
        (lambda meta: meta["components"]["unet"].update(block_out_channels="x"), "do not build a model"),
    ],
)
def test_damaged_checkpoint_config_is_one_line(run, tmp_path, edit, message, capsys):
    copy = _copy_run(run, tmp_path)
    path = copy / "final" / "config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    assert main(["evaluate", str(copy / "final")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err and message in err, err


def test_sigint_during_validation_saves_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while validating
        raise AssertionError("the signal should have stopped validation")

    monkeypatch.setattr(train_module, "evaluate_model", interrupted_evaluation)
    argv = ["train", "demo_seg", *sets(tmp_path, "train.max_steps=5", "train.eval_every=2")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT at step 2" in err and "--resume" in err
    assert json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "final").exists()
    with pytest.raises(Interrupted):  # the library raises; the command line turns it into the exit status
        monkeypatch.setattr(train_module, "evaluate_model", interrupted_evaluation)
        cfg = load_config(
            "demo_seg", [*TINY_RUN, f"train.out={tmp_path}", "train.max_steps=5", "train.eval_every=2"]
        )
        train(cfg, resume="latest")


def _ade_root(tmp_path: Path, bad: dict[str, str]) -> Path:
    root = tmp_path / "ade"
    rng = np.random.default_rng(0)
    for sub in ("images", "annotations"):
        (root / sub / "training").mkdir(parents=True)
    for index in range(8):
        stem = f"ADE_train_{index:08d}"
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(
            root / "images" / "training" / f"{stem}.jpg"
        )
        label = rng.integers(0, 4, (72, 80), dtype=np.uint8)
        Image.fromarray(label).save(root / "annotations" / "training" / f"{stem}.png")
    for stem, kind in bad.items():
        label_path = root / "annotations" / "training" / f"{stem}.png"
        if kind == "value":
            Image.fromarray(np.full((72, 80), 200, dtype=np.uint8)).save(label_path)
        elif kind == "size":
            Image.fromarray(np.ones((10, 10), dtype=np.uint8)).save(label_path)
        elif kind == "rgb":
            Image.new("RGB", (80, 72)).save(label_path)
        elif kind == "truncated":
            image = root / "images" / "training" / f"{stem}.jpg"
            image.write_bytes(image.read_bytes()[:200])
    return root


ADE_RUN = [
    "data.dataset=ade20k",
    "data.augment=true",
    "data.cache_latents=false",
    "data.crop_size=64",
    "data.num_workers=2",
    "train.max_steps=2",
]


@pytest.mark.parametrize("kind", ["value", "size", "rgb", "truncated"])
def test_bad_training_file_under_workers_is_one_line_naming_it(tmp_path, kind, capsys):
    root = _ade_root(tmp_path, {"ADE_train_00000003": kind})
    argv = ["train", "demo_seg", *sets(tmp_path / "run", *ADE_RUN, f"data.root={root}", "train.batch_size=8")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ADE_train_00000003" in err and "Traceback" not in err, err


def test_skip_bad_under_workers_is_summarised(tmp_path, caplog):
    root = _ade_root(tmp_path, {"ADE_train_00000002": "value", "ADE_train_00000005": "truncated"})
    config = load_config(
        "demo_seg",
        [
            *TINY_RUN,
            f"train.out={tmp_path / 'run'}",
            *ADE_RUN,
            f"data.root={root}",
            "data.skip_bad=true",
            "train.batch_size=8",
        ],
    )
    with caplog.at_level("WARNING", logger="iedp.engine.train"):
        train(config)
    summary = [r.getMessage() for r in caplog.records if "unreadable training files" in r.getMessage()]
    assert len(summary) == 1 and "skipped 2 unreadable training files" in summary[0]
    assert "ADE_train_00000002" in summary[0] and "ADE_train_00000005" in summary[0]


def test_too_many_loader_workers_is_said_once_in_one_line(monkeypatch, caplog):
    import logging
    import warnings

    from iedp.engine.data import make_loader

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loader = make_loader([{"x": torch.zeros(1)}] * 4, 2, num_workers=2, shuffle=False, seed=0)
        for _ in range(2):  # two epochs: PyTorch warned at each
            assert sum(len(batch["x"]) for batch in loader) == 4
    assert [r.getMessage() for r in caplog.records] == [
        "data.num_workers=2 is more than the 1 CPU cores this process may use"
    ]
    assert not [w for w in caught if "DataLoader" in str(w.message)]
