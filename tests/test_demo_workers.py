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
