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
