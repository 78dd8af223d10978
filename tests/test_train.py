"""End-to-end training on the tiny preset and synthetic scenes: checkpoints, exact resume, signals, multi-process."""

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iedp.config import load_config
from iedp.engine.train import train
from iedp.errors import InputError
from iedp.model_files import load_model

COMMON = [
    "model.weights=tiny",
    "data.resolution=64",
    "data.num_train=16",
    "data.num_val=2",
    "data.num_workers=0",
    "model.neck_channels=16",
    "model.head_channels=16",
    "train.batch_size=2",
    "train.lr=1e-3",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "train.log_every=1",
]


def config(tmp_path: Path, *overrides: str, task: str = "seg"):
    classes = "synthetic" if task == "seg" else "synthetic_scenes"
    sets = [*COMMON, f"model.task={task}", f"model.classes={classes}", f"train.out={tmp_path}", *overrides]
    if task == "depth":
        sets += ["model.depth_fuse_channels=32", "model.depth_head_channels=16", "eval.depth_crop=none"]
    return load_config(None, sets)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_checkpoints_pruned_and_resume_is_exact(tmp_path):
    run = tmp_path / "run"
    final = train(
        config(run, "train.max_steps=4", "train.checkpoint_every=1", "train.checkpoints_total_limit=2")
    )
    assert final == run / "final"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]
    state = json.loads((run / "checkpoints" / "checkpoint-3" / "state.json").read_text())
    assert state["step"] == 3

    # A fresh run that starts from step 3's checkpoint (optimizer, schedule, RNG and data position) ends where
    # the uninterrupted run ended.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    train(config(resumed, "train.max_steps=4", "train.checkpoint_every=1"), resume="latest")
    assert_same_weights(weights(run / "final"), weights(resumed / "final"))

    # ... and differs from a run that never trained step 4, so the comparison can fail.
    assert not torch.equal(
        weights(run / "checkpoints" / "checkpoint-3" / "model")["adapter.gamma"],
        weights(run / "final")["adapter.gamma"],
    )
    model, loaded = load_model(run / "final")
    assert loaded.train.max_steps == 4 and model.method == "iedp"
    # a training checkpoint or a run folder is not a model, but says where its model is
    checkpoint = run / "checkpoints" / "checkpoint-4"
    with pytest.raises(InputError, match=f"did you mean {checkpoint / 'model'}"):
        load_model(checkpoint)
    with pytest.raises(InputError, match=f"did you mean {run / 'final'}"):
        load_model(run)

    # a setting the checkpoint fixes cannot change on resume: it would be logged as applied and silently ignored
    resumed_config = config(resumed, "train.max_steps=6", "train.lr=0.5", "train.seed=3")
    with pytest.raises(
        InputError, match=r"train.lr is 0.5 here but 0.001 there; train.seed is 3 here but 0 there"
    ):
        train(resumed_config, resume="latest")


def test_resume_across_an_epoch_boundary(tmp_path):
    # 16 samples / batch 2 = 8 steps per epoch: resuming at step 6 replays the end of epoch 0 then epoch 1.
    sets = ("train.max_steps=10", "train.checkpoint_every=6", "data.num_train=12", "model.task=depth")
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    train(config(run, *sets, task="depth"))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint-6", resumed / "checkpoints" / "checkpoint-6")
    train(config(resumed, *sets, task="depth"), resume="latest")
    assert_same_weights(weights(run / "final"), weights(resumed / "final"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "iedp.cli", *args]


def test_sigterm_leaves_checkpoint_at_last_completed_step(tmp_path):
    sets = [
        f"--set={s}"
        for s in COMMON
        + [
            f"train.out={tmp_path}",
            "train.max_steps=100000",
            "train.checkpoint_every=100000",
            "model.classes=synthetic",
        ]
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _cli("train", "configs/demo_seg.yaml", *sets),
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    lines = []
    deadline = time.time() + 120
    for line in proc.stderr:  # the banner is logged once training starts
        lines.append(line)
        if "optimisation steps" in line or time.time() > deadline:
            break
    time.sleep(4)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert proc.returncode == 143, log  # 128 + SIGTERM: `iedp train ... && iedp evaluate ...` stops here
    assert "stopped by SIGTERM at step" in log and "--resume" in log
    saved = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1, log
    step = json.loads((saved[0] / "state.json").read_text())["step"]
    assert step >= 1 and f"saving a checkpoint at step {step} and stopping" in log
    model, _ = load_model(saved[0] / "model")
    assert model.method == "iedp"


def test_two_processes_match_one_process(tmp_path):
    # Same global batch (2 × 2 vs 1 × 4); group norm and no augmentation/dropout make the two runs the same maths.
    shared = [
        "train.max_steps=2",
        "train.checkpoint_every=100",
        "model.head_norm=gn",
        "model.dropout=0.0",
        "data.augment=false",
        "model.classes=synthetic",
    ]
    one = tmp_path / "one"
    train(config(one, *shared, "train.batch_size=4"))
    two = tmp_path / "two"
    sets = [f"--set={s}" for s in COMMON + shared + [f"train.out={two}", "train.batch_size=2"]]
    # as `accelerate launch --cpu` sets
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29517",
            "-m",
            "iedp.cli",
            "train",
            "configs/demo_seg.yaml",
            *sets,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stderr
    # Gradients agree to ~1e-6, but AdamW's first steps move each weight by about ±lr whatever the gradient's size,
    # so weights whose gradient is at float-noise level may step the other way: allow those few, by at most 2·lr.
    a, b = weights(one / "final"), weights(two / "final")
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a if a[k].is_floating_point()])
    assert (diffs <= 1e-6).float().mean() > 0.99
    assert diffs.max() <= 2 * 1e-3 * 0.25 + 1e-6  # 2 × the lr of step 2 (half-way through the 2-step warm-up)


@pytest.mark.parametrize("task", ["seg", "depth"])
def test_non_finite_losses_stop_with_a_checkpoint(tmp_path, task, monkeypatch):
    from iedp.models.iedp import IEDPModel

    loss = IEDPModel.loss
    monkeypatch.setattr(
        IEDPModel, "loss", lambda self, batch: {k: v * torch.nan for k, v in loss(self, batch).items()}
    )
    cfg = config(
        tmp_path, "train.max_steps=10", "train.max_bad_steps=2", "train.checkpoint_every=100", task=task
    )
    with pytest.raises(FloatingPointError, match="non-finite losses in a row"):
        train(cfg)
    assert any(p.name.startswith("checkpoint-") for p in (tmp_path / "checkpoints").iterdir())


def test_training_stops_at_the_first_update_that_makes_weights_non_finite(tmp_path, monkeypatch):
    step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):  # as a huge lr does: the update leaves a NaN weight
        result = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = torch.nan
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    cfg = config(tmp_path, "train.max_steps=10", "train.checkpoint_every=1")
    with pytest.raises(FloatingPointError, match="step 1: the weight update made weights NaN or infinite"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_mixed_precision_casts_the_frozen_parts_quietly(tmp_path, caplog, monkeypatch):
    """Under bf16 the frozen VAE and CLIP are held in bf16 (the UNet and heads train in fp32 under autocast),
    without diffusers' warning about float32 modules, which AutoencoderKL does not have."""
    from accelerate.state import AcceleratorState

    from iedp.engine.train import _set_up

    monkeypatch.setattr(logging.getLogger("diffusers"), "propagate", True)  # diffusers has its own handler
    AcceleratorState._reset_state()  # Accelerate keeps one precision per process: the other tests' is "no"
    try:
        run = _set_up(config(tmp_path, "train.mixed_precision=bf16", "train.max_steps=1"))
    finally:
        AcceleratorState._reset_state()
    model = run.accelerator.unwrap_model(run.model)
    assert {p.dtype for part in model.frozen_modules() for p in part.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32}
    assert "should be kept in float32" not in caplog.text


def test_the_eigen_crop_on_other_frames_is_refused_before_training(tmp_path):
    """eval.depth_crop=eigen needs NYUv2's 480x640 frames: a run on others stops at once, not at its first evaluation."""
    run = config(tmp_path / "run", "train.max_steps=2", "train.eval_every=1", task="depth")
    run = dataclasses.replace(run, eval=dataclasses.replace(run.eval, depth_crop="eigen"))
    with pytest.raises(InputError, match=r"eval.depth_crop=eigen: .* is 64x64; set eval.depth_crop=none"):
        train(run)
    assert not (tmp_path / "run" / "checkpoints").exists()
