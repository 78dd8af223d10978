"""Bad input and training faults: each gives one clear message naming the file, or loses nothing."""

import argparse
import errno
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iedp.cli import main
from iedp.config import load_config
from iedp.data.images import read_rgb
from iedp.engine.train import train
from iedp.errors import InputError
from iedp.model_files import load_model
from iedp.score import run as score

TINY_RUN = [
    "model.weights=tiny",
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


def tiny_config(out: Path, *sets: str):
    return load_config("demo_seg", [*TINY_RUN, f"train.out={out}", *sets])


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setenv("IEDP_MAX_PIXELS", "1000")
    with pytest.raises(
        InputError, match=r"big.png: image is 40x30 = 1200 pixels, above the limit of 1000"
    ) as error:
        read_rgb(path)
    assert "cannot decode" not in str(error.value)  # said once, not wrapped in a decoding error
    monkeypatch.setenv("IEDP_MAX_PIXELS", "2000")
    assert read_rgb(path).shape == (30, 40, 3)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK"])
def test_unusual_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (5, 3), 7 if mode in ("P", "L") else None).save(path)
    assert read_rgb(path).shape == (3, 5, 3)


def test_depth_map_as_image_is_refused(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16)).save(path)
    with pytest.raises(InputError, match="depth.png: not a colour image"):
        read_rgb(path)


def test_non_finite_depth_prediction_is_refused(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    depth = np.full((4, 4), 2.0, dtype=np.float32)
    depth[1, 1] = np.nan
    np.save(tmp_path / "pred" / "a.npy", depth)
    Image.fromarray(np.full((4, 4), 2000, dtype=np.uint16)).save(tmp_path / "gt" / "a.png")
    args = argparse.Namespace(
        task="depth",
        pred=tmp_path / "pred",
        gt=tmp_path / "gt",
        json=None,
        crop="none",
        num_classes=150,
        reduce_zero_label=True,
    )
    with pytest.raises(InputError, match="a.npy: 1 NaN or infinite depth values"):
        score(args)


def test_yaml_cannot_run_code(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(InputError, match="evil.yaml: not valid YAML"):
        load_config(path)
    assert not Path("pwned").exists()


def test_a_yaml_error_names_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  task: seg\ntrain: lr: 1\n")
    with pytest.raises(
        InputError, match=r"bad.yaml: not valid YAML \(line 3, column 10: mapping values are not"
    ):
        load_config(path)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.yaml: no such file" in err and "Traceback" not in err
    assert main(["train", "demo_seg", "--set", "train.max_step=3"]) == 2
    assert "did you mean train.max_steps?" in capsys.readouterr().err
    with pytest.raises(InputError):
        main(["--debug", "train", str(tmp_path / "nope.yaml")])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(
        tiny_config(out, "train.max_steps=2", "train.checkpoint_every=1", "train.checkpoints_total_limit=5")
    )
    return out


def test_no_pickled_objects_in_training_checkpoints(trained):
    files = {p.name for p in (trained / "checkpoints" / "checkpoint-2").rglob("*") if p.is_file()}
    assert not any(
        name.startswith("custom_checkpoint") for name in files
    )  # these are unpickled without limits
    assert {"model.safetensors", "config.json", "state.json", "optimizer.bin", "scheduler.bin"} <= files


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_resume_refuses_a_pickle_that_runs_code(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    src = trained / "checkpoints" / "checkpoint-1"
    dst = run / "checkpoints" / "checkpoint-1"
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    (dst / "optimizer.bin").write_bytes(pickle.dumps({"state": Payload()}))
    with pytest.raises(InputError, match="refusing to load a file that holds more than tensors"):
        train(tiny_config(run, "train.max_steps=2"), resume="latest")
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_resume_with_another_class_count_is_refused(trained, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    subprocess.run(
        ["cp", "-r", str(trained / "checkpoints" / "checkpoint-1"), str(run / "checkpoints")], check=True
    )
    classes = tmp_path / "classes.txt"
    classes.write_text("wall\nfloor\nbed\n")
    with pytest.raises(InputError, match="does not match this model"):
        train(tiny_config(run, "train.max_steps=2", f"model.classes={classes}"), resume="latest")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, caplog):
    from accelerate import Accelerator

    calls = []
    original = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with caplog.at_level(logging.ERROR, logger="iedp.engine.train_state"):
        final = train(tiny_config(tmp_path, "train.max_steps=3", "train.checkpoint_every=1"))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-1", "checkpoint-3"]  # step 2's write failed; training went on
    assert any(
        "could not write checkpoint-2" in r.getMessage() and "No space left" in r.getMessage()
        for r in caplog.records
    )
    assert final.is_dir()


KILL_DURING_SECOND_SAVE = textwrap.dedent("""
    import os, signal, sys
    from iedp.config import load_config
    from iedp.engine import train_state
    from iedp.engine.train import train

    saves = []
    write_state = train_state.CheckpointManager._write_state

    def dying_write_state(self, folder, step):
        saves.append(step)
        if len(saves) == 2:  # the weights and optimizer are on disk, state.json is not: die now
            os.kill(os.getpid(), signal.SIGKILL)
        write_state(self, folder, step)

    train_state.CheckpointManager._write_state = dying_write_state
    train(load_config("demo_seg", sys.argv[1:]))
""")


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    sets = [*TINY_RUN, f"train.out={tmp_path}", "train.max_steps=5", "train.checkpoint_every=1"]
    result = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_SAVE, *sets],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == -9, result.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert (root / ".checkpoint-2.partial" / "model" / "model.safetensors").is_file()  # the half-written one
    assert not (root / "checkpoint-2").exists()
    assert sorted(p.name for p in root.iterdir() if (p / "state.json").is_file()) == ["checkpoint-1"]
    model, _ = load_model(root / "checkpoint-1" / "model")
    assert model.method == "iedp"
    # resuming picks the newest complete checkpoint and finishes the run
    train(tiny_config(tmp_path, "train.max_steps=3", "train.checkpoint_every=1"), resume="latest")
    assert json.loads((root / "checkpoint-3" / "state.json").read_text())["step"] == 3


def test_the_python_api_imports_without_library_warnings():
    """``import iedp`` keeps bitsandbytes' missing-4-bit-kernel warning out of a user's own scripts, as the CLI does."""
    code = "import logging, iedp, iedp.api; print(logging.getLogger('bitsandbytes').getEffectiveLevel())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(logging.ERROR)
    assert "kernels" not in result.stderr and "Failed to load" not in result.stderr, result.stderr
