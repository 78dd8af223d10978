"""Building into the cache (iedp.cache.build_cached): whole folders only, and a resumable build goes on where it
stopped."""

import threading
from pathlib import Path

import pytest

from iedp.cache import build_cached


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def fail(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        build_cached(tmp_path / "thing", fail, "a thing")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_resumable_build_goes_on_where_it_stopped(tmp_path):
    seen = []

    def build(folder: Path) -> None:
        seen.append(sorted(p.name for p in folder.iterdir()))
        if not (folder / "stage1").exists():
            (folder / "stage1").write_text("done")
            raise KeyboardInterrupt  # stopped after its first stage
        (folder / "stage2").write_text("done")

    target = tmp_path / "world"
    with pytest.raises(KeyboardInterrupt):
        build_cached(target, build, "a world", resumable=True)
    assert not target.exists() and (tmp_path / ".world.partial" / "stage1").is_file()
    assert build_cached(target, build, "a world", resumable=True) == target
    assert seen == [[], ["stage1"]]  # the second build found the first one's finished stage
    assert sorted(p.name for p in target.iterdir()) == ["stage1", "stage2"]
    assert not (tmp_path / ".world.partial").exists()
    assert build_cached(target, build, "a world", resumable=True) == target and len(seen) == 2


def test_concurrent_resumable_builders_build_once(tmp_path):
    builds, started = [], threading.Event()

    def build(folder: Path) -> None:
        builds.append(folder)
        started.set()
        threading.Event().wait(0.3)  # the other builder arrives meanwhile and waits on the lock
        (folder / "weights").write_text("w")

    target, results = tmp_path / "world", []
    first = threading.Thread(
        target=lambda: results.append(build_cached(target, build, "a world", resumable=True))
    )
    first.start()
    started.wait(5)
    results.append(build_cached(target, build, "a world", resumable=True))
    first.join()
    assert results == [target, target] and len(builds) == 1
    assert (target / "weights").read_text() == "w"
