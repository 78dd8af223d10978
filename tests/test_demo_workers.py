"""The demo's parallel runs: one single-thread worker process per core, at most one per run."""

import os

from iedp import demo


def test_demo_workers_one_per_core(monkeypatch):
    runs = len(demo.TASKS) * len(demo.METHODS)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert demo.demo_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert demo.demo_workers() == runs
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert demo.demo_workers() == 1


def test_worker_initialiser_sets_one_thread():
    import torch

    before = torch.get_num_threads()
    try:
        demo._single_thread_worker(20)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_attention_pictures_show_the_implicit_queries(tmp_path):
    """The report's attention row: input, the 4 largest classes' UNet maps, then the queries' mean map and the two
    most peaked queries over CLIP's patches; without learnable queries only the first five."""
    import pickle

    from PIL import Image

    from iedp.errors import Interrupted
    from iedp.models.build import build_model

    widths = {}
    for implicit in ("queries", "pooled"):
        sets = ["model.weights=tiny", "data.num_val=2", f"model.implicit={implicit}"]
        config = demo.load_config("demo_seg", sets)
        model = build_model(config.model).eval()
        path = demo.attention_pictures(model, config, tmp_path / implicit)
        widths[implicit] = Image.open(path).width
    side = config.data.resolution
    assert widths == {"queries": 8 * side, "pooled": 5 * side}
    stop = pickle.loads(pickle.dumps(Interrupted(15, "stopped")))  # crosses the demo's process boundary
    assert (stop.signum, str(stop)) == (15, "stopped")


def test_sigterm_to_the_demo_alone_stops_every_worker_with_a_checkpoint(tmp_path):
    """`kill PID` of `iedp demo` (not its process group): the workers get it too, save and stop; exit 143."""
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pytest

    if demo.demo_workers() < 2:
        pytest.skip("needs two CPU cores for two demo workers")
    command = [sys.executable, "-m", "iedp.cli", "demo", "--out", str(tmp_path), "--weights", "tiny"]
    proc = subprocess.Popen(
        [*command, "--steps", "100000"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=Path(__file__).parents[1],
    )
    lines, training = [], set()
    deadline = time.time() + 240
    for line in proc.stderr:
        lines.append(line)
        if "optimisation steps" in line:
            training.update(re.findall(r"\[worker (\d+)\]", line))
        if len(training) == 2 or time.time() > deadline:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=180)
    log = "".join(lines) + rest
    assert len(training) == 2, log
    assert proc.returncode == 143, log
    assert "stopped by SIGTERM at step" in log.splitlines()[-1], log
    for pid in training:  # no worker left running on its own
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
    saved = sorted(p.parent.parent.name for p in tmp_path.glob("*/checkpoints/checkpoint-*/state.json"))
    assert len(saved) == 2, log  # each started run kept its step
