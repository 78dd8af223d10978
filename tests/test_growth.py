"""bench/growth.py: the cost-growth grid on the tiny preset (timings are not asserted, their bookkeeping is)."""

import importlib.util
import json

import pytest
import torch

from bench import growth
from iedp.engine.inference import for_inference, resolve_dtype


def test_growth_grid_records_every_point_cheapest_first(tmp_path, capsys, monkeypatch):
    held = []  # the model is held as `iedp predict` holds it, in the default precision
    monkeypatch.setattr(
        growth,
        "for_inference",
        lambda model, device, dtype: held.append(dtype) or for_inference(model, device, dtype),
    )
    growth.main(
        ["--tiny", "--sides", "128", "64", "--batches", "2", "1", "--repeats", "2", "--out", str(tmp_path)]
    )
    assert held == [resolve_dtype(None, torch.device("cpu"))]
    summary = json.loads((tmp_path / "growth_cpu_tiny.json").read_text())
    points = [(r["side"], r["batch"]) for r in summary["records"]]
    assert points == [(64, 1), (64, 2), (128, 1), (128, 2)]
    for r in summary["records"]:
        assert len(r["times_s"]) == 2 and r["median_s"] > 0
        assert r["ms_per_image"] == pytest.approx(1000 * r["median_s"] / r["batch"])
    table = (tmp_path / "growth_cpu_tiny.md").read_text()
    assert "| side \\ batch | 1 | 2 |" in table and table.count("\n| 64 |") == 1
    if importlib.util.find_spec("matplotlib"):  # the bench extra
        assert (tmp_path / "growth_cpu_tiny.png").stat().st_size > 1000
    else:
        assert not (tmp_path / "growth_cpu_tiny.png").exists()


def test_growth_stops_at_its_budget_and_checks_sides(tmp_path, capsys):
    growth.main(["--tiny", "--sides", "64", "--batches", "1", "2", "--budget-s", "0", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "growth_cpu_tiny.json").read_text())["records"]
    assert [r["error"] for r in records] == ["skipped: time budget spent"] * 2
    assert "| 64 | skipped | skipped |" in (tmp_path / "growth_cpu_tiny.md").read_text()
    with pytest.raises(SystemExit):
        growth.parse_args(["--sides", "100"])
    assert "multiples of 64" in capsys.readouterr().err
