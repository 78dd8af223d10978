"""bench/ablation.py's statistics: paired differences against vpd, read in each metric's better direction."""

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "ablation.py"
spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def runs(task, metric, values):
    return [
        {"task": task, "variant": variant, "seed": seed, metric: value}
        for variant, per_seed in values.items()
        for seed, value in enumerate(per_seed)
    ]


def test_paired_difference_mean_se_and_wins():
    data = runs("seg", "mIoU", {"vpd": [10.0, 20.0, 30.0], "iedp": [12.0, 21.0, 29.0]})
    p = ablation.paired(data, "seg", "iedp", "mIoU")
    # diffs 2, 1, -1: mean 2/3, sample std sqrt(7/3), se = std / sqrt(3)
    assert p["mean"] == pytest.approx(2 / 3)
    assert p["se"] == pytest.approx((7 / 3) ** 0.5 / 3**0.5)
    assert (p["wins"], p["n"]) == (2, 3)


def test_lower_rmse_wins_and_unpaired_seeds_are_left_out():
    data = runs("depth", "rmse", {"vpd": [1.0, 1.0, 1.0], "iedp": [0.9, 1.1]})
    p = ablation.paired(data, "depth", "iedp", "rmse")
    assert p["n"] == 2 and p["wins"] == 1 and p["mean"] == pytest.approx(0.0)
    assert ablation.paired(data[:4], "depth", "iedp", "rmse") is None  # one pair: no standard error


def test_table_marks_differences_beyond_two_standard_errors():
    data = runs("seg", "mIoU", {"vpd": [10.0, 20.0, 30.0], "iedp": [13.0, 23.1, 32.9]}) + runs(
        "seg", "aAcc", {}
    )
    for r in data:
        r.setdefault("aAcc", 50.0)
    text = ablation.table(data, "seg")
    row = next(line for line in text.splitlines() if line.startswith("| iedp"))
    assert "**+3.000 ± 0.058** (3/3)" in row and "+0.000 ± 0.000 (0/3)" in row


def test_curve_table_averages_each_evaluated_step_over_seeds():
    data = [
        {
            "task": "seg",
            "variant": "vpd",
            "seed": 0,
            "curve": [{"step": 50, "mIoU": 8.0}, {"step": 100, "mIoU": 9.0}],
        },
        {
            "task": "seg",
            "variant": "vpd",
            "seed": 1,
            "curve": [{"step": 50, "mIoU": 6.0}, {"step": 100, "mIoU": 11.0}],
        },
        {"task": "seg", "variant": "iedp", "seed": 0, "curve": [{"step": 100, "mIoU": 12.5}]},
        {"task": "depth", "variant": "vpd", "seed": 0, "curve": [{"step": 50, "rmse": 1.0}]},
    ]
    lines = ablation.curve_table(data, "seg").splitlines()
    assert lines[0] == "| seg mIoU at step | 50 | 100 |"
    assert lines[2:] == ["| vpd | 7.000 | 10.000 |", "| iedp | – | 12.500 |"]
    assert ablation.curve_table([r for r in data if "curve" not in r], "seg") == ""


def test_variants_run_every_method_of_the_package():
    from iedp.methods import METHODS

    methods = {
        o.split("=", 1)[1] for v in ablation.VARIANTS.values() for o in v if o.startswith("model.method=")
    }
    assert methods == set(METHODS)


def test_command_line_names_every_option_that_differs_from_its_default():
    args = argparse.Namespace(
        steps=100,
        seeds=[0, 1],
        weights="tiny-pretrained",
        tasks=["seg"],
        jobs=2,
        eval_every=0,
        set=["train.warmup_steps=50"],
        variants=list(ablation.VARIANTS),
        json=str(ablation.DEFAULT_JSON),
    )
    assert ablation.command_line(args) == (
        "python bench/ablation.py --steps 100 --seeds 0 1 --weights tiny-pretrained --tasks seg --jobs 2 "
        "--set train.warmup_steps=50"
    )
    args.variants, args.json = ["vpd", "explicit (oracle)"], "bench/results/mine.json"
    assert ablation.command_line(args).endswith(
        "--tasks seg --variants vpd 'explicit (oracle)' --jobs 2 --set train.warmup_steps=50 "
        "--json bench/results/mine.json"
    )
