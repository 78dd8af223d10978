"""bench/speed.py on the tiny preset: the worker's JSON, the fairness of the ours-vs-baseline comparison, and the
bookkeeping that turns records into comparisons and BENCHMARKS.md rows."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import tables

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "speed.py"
RECORD_KEYS = {
    "stage",
    "variant",
    "dtype",
    "device",
    "size",
    "batch_size",
    "gradient_checkpointing",
    "channels_last",
    "times_s",
    "median_s",
    "images_per_s",
    "memory",
    "load_average",
    "build_s",
    "parameters",
    "machine",
}


@pytest.fixture(scope="module")
def speed():
    """bench/speed.py as a module (bench/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory):
    """One tiny worker: every stage, ours and baseline alternating, 64x64, one timed repetition."""
    out = tmp_path_factory.mktemp("speed")
    command = [sys.executable, str(SCRIPT), "--worker", "--tiny", "--variant", "ours,baseline"]
    command += ["--stage", "vae,unet,inference,train", "--size", "64", "--batch-size", "2"]
    command += [
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out / "records.json"),
        "--save-output",
        str(out),
    ]
    subprocess.run(command, check=True, cwd=ROOT, timeout=300)
    return json.loads((out / "records.json").read_text()), out


def test_worker_json_has_positive_timings(worker_run, speed):
    records, _ = worker_run
    assert {(r["stage"], r["variant"]) for r in records} == {
        (stage, variant) for stage in speed.STAGES for variant in speed.VARIANTS
    }
    for record in records:
        assert record.keys() >= RECORD_KEYS
        assert len(record["times_s"]) == 1
        assert record["median_s"] > 0 and record["images_per_s"] > 0
        assert record["parameters"]["unet"] > 0 and record["parameters"]["trainable"] > 0
        if record["variant"] == "ours":  # the first variant of the worker: peak memory from a fresh state
            memory = record["memory"]
            assert memory["peak_bytes"] >= memory["base_bytes"] > 0
            assert memory["extra_bytes"] == memory["peak_bytes"] - memory["base_bytes"]
        else:
            assert record["memory"] is None


def test_baseline_output_equals_ours(worker_run):
    """Same weights, different attention processors: the comparison is between equal models."""
    _, out = worker_run
    ours = torch.load(out / "ours_fp32.pt")
    baseline = torch.load(out / "baseline_fp32.pt")
    assert ours.shape == (2, 150, 64, 64)
    torch.testing.assert_close(baseline, ours, atol=1e-4, rtol=0)


def _record(variant, median_s, extra_bytes, memory_only=False):
    memory = (
        None
        if extra_bytes is None
        else {"base_bytes": 1, "peak_bytes": 1 + extra_bytes, "extra_bytes": extra_bytes}
    )
    record = dict.fromkeys(tables.COMPARED_KEYS, None) | {"stage": "unet", "dtype": "fp32", "size": 512}
    timing = {"median_s": median_s, "times_s": [median_s], "median_cpu_s": median_s, "threads": 2}
    return (
        record | timing | {"variant": variant, "device": "cpu", "memory": memory, "memory_only": memory_only}
    )


def test_comparisons_and_goals():
    records = [
        _record("ours", 2.0, 100),
        _record("baseline", 4.0, None),
        _record("baseline", None, 400, memory_only=True),
    ]
    merged = tables.merge_memory(records)
    assert len(merged) == 2 and merged[1]["memory"]["extra_bytes"] == 400
    (compared,) = tables.comparisons(merged)
    assert compared["speedup"] == compared["cpu_time_speedup"] == 2.0 and compared["memory_ratio"] == 0.25
    goals = tables.goals([compared])
    assert goals["unet_speedup>=1.5"]["met"] and goals["unet_memory_ratio<=0.5"]["met"]
    assert goals["unet_speedup>=1.5"]["measure"] == "speedup"  # wall time unless single-threaded
    assert "train_speedup>=1.5" not in goals
    goals = tables.goals([compared | {"threads": 1, "cpu_time_speedup": 1.2}])
    assert goals["unet_speedup>=1.5"] == {
        "measure": "cpu_time_speedup",
        "value": 1.2,
        "met": False,
        "size": 512,
    }


def test_append_rows_keeps_sections_apart(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    tables.append_rows(path, "A", "| x |", ["| 1 |"], "about A")
    tables.append_rows(path, "B", "| y |", ["| 2 |"])
    path.write_text(path.read_text().replace("| 1 |\n", "| 1 |\n\nnotes on A\n"))
    tables.append_rows(path, "A", "| x |", ["| 3 |"])
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "| x |\n|---|\n| 1 |\n| 3 |\n\nnotes on A\n\n## B\n\n| y |\n|---|\n| 2 |\n" in text


def _memory_bench():
    """bench/memory.py as a module; its top level imports neither torch nor iedp (the worker does)."""
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_bench_summary_and_table():
    memory = _memory_bench()
    gib = memory.GIB

    def record(method, variant, peak_gib, step_gib):
        return {
            "method": method,
            "variant": variant,
            "peak_bytes": peak_gib * gib,
            "step_bytes": step_gib * gib,
        }

    records = [
        record("iedp", "baseline", 16, 12) | {"loss": 5.0},
        record("iedp", "baseline", 18, 13) | {"loss": 5.0},
        record("iedp", "baseline", 17, 14) | {"loss": 5.0},
        record("iedp", "all", 8.5, 6) | {"loss": 5.25},
        record("vpd", "adamw8bit", 10, 7) | {"loss": 4.0},
    ]
    rows = memory.summarize(records)
    assert [(r["method"], r["variant"], r["repeats"]) for r in rows] == [
        ("iedp", "baseline", 3),
        ("iedp", "all", 1),
        ("vpd", "adamw8bit", 1),
    ]
    assert rows[0]["peak_bytes"] == 17 * gib and rows[0]["step_bytes"] == 13 * gib  # medians
    assert rows[0]["peak_vs_baseline"] == 1.0 and rows[1]["peak_vs_baseline"] == 0.5
    assert rows[2]["peak_vs_baseline"] is None  # no vpd baseline measured
    assert set(rows[0]) == {
        "method",
        "variant",
        "repeats",
        "peak_bytes",
        "step_bytes",
        "loss",
        "peak_vs_baseline",
    }
    json.dumps(rows)  # JSON-safe as written to bench/results
    table = memory.markdown_table(rows).splitlines()
    assert table[0].startswith("| method | variant | peak (GiB)") and len(table) == 2 + len(rows)
    assert table[2] == "| iedp | baseline | 17.00 | 13.00 | 1.00× | 5.0000 | 3 |"
    assert table[3] == "| iedp | all | 8.50 | 6.00 | 0.50× | 5.2500 | 1 |"
    assert table[4] == "| vpd | adamw8bit | 10.00 | 7.00 | – | 4.0000 | 1 |"


def test_memory_bench_options():
    memory = _memory_bench()
    args = memory.parse_args(["--methods", "vpd", "--variants", "baseline,all", "--tiny"])
    assert args.methods == ["vpd"] and args.variants == ["baseline", "all"] and args.batch_size == 2
    assert memory._shared_options(args)[-1] == "--tiny"
    with pytest.raises(SystemExit):
        memory.parse_args(["--variants", "baseline,fp8"])
    assert set(memory.VARIANTS["all"]) == {"gradient_checkpointing", "optimizer", "frozen_bf16"}


def test_vae_slicing_bench_pairs_each_batch(tmp_path):
    """bench/vae_slicing.py on the real-size VAE at a tiny input: both variants per batch, each in its own process,
    the same latents, and one table row each."""
    from bench import vae_slicing

    out = tmp_path / "slicing.json"
    vae_slicing.main(
        [
            "--device",
            "cpu",
            "--sizes",
            "32",
            "--batches",
            "2",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--slices",
            "0",
            "1",
            "--json",
            str(out),
        ]
    )
    summary = json.loads(out.read_text())
    records = summary["records"]
    assert [(r["size"], r["batch"], r["slice"]) for r in records] == [(32, 2, 0), (32, 2, 1)]
    assert all(
        r["median_s"] > 0 and len(r["times_s"]) == 1 and r["memory"]["peak_bytes"] > 0 for r in records
    )
    assert records[1]["latents_max_abs_diff"] < 1e-4  # one image at a time encodes to the same latents
    rows = vae_slicing.rows(summary)
    assert "| 32² | 2 | all |" in rows[0] and "| 32² | 2 | 1 |" in rows[1] and "max abs diff" in rows[1]


def test_peak_memory_floor_is_taken_after_the_first_configuration_casts_its_weights(monkeypatch):
    """A bf16 configuration casts the fp32 weights first; a floor taken before the cast would sit above the
    memory its call then uses (on a bf16 CPU the worker reported 4 MB of activations for a 512² inference)."""
    from bench import speed_models, timing

    device = torch.device("cpu")
    model = speed_models.build_seg_model(speed_models.build_parts(True, device, 0), 0, False, 16)
    bf16 = speed_models.Configuration("ours", "bf16", False, True)
    monkeypatch.setitem(speed_models.CONFIGURATIONS, "ours-default", bf16)
    floors = []
    start = timing.PeakMemory.start

    def start_and_note_dtype(self):
        floors.append(next(model.unet.parameters()).dtype)
        start(self)

    monkeypatch.setattr(timing.PeakMemory, "start", start_and_note_dtype)
    batch = speed_models.make_batch(1, 64, model.num_classes, device, 0)
    records, _ = timing.measure_variants(
        model,
        speed_models.AttentionVariants(model),
        ["ours-default", "vpd-config"],
        "vae",
        batch,
        "fp32",
        False,
        1,
        1,
    )
    assert floors == [torch.bfloat16]
    assert records["ours-default"]["dtype"] == "bf16" and records["vpd-config"]["dtype"] == "fp32"
    assert records["ours-default"]["memory"]["base_bytes"] > 0 and records["vpd-config"]["memory"] is None


def test_a_configuration_may_keep_fp32_weights_under_its_autocast(monkeypatch):
    """``ours-default-fp32-weights`` times ours-default's autocast over fp32 weights (a Pipeline over a model passed
    in): switching to it casts the weights back to fp32, while the autocast stays the default's."""
    from bench import speed_models

    held = speed_models.Configuration("ours", "bf16", False, True)
    kept = speed_models.Configuration("ours", "bf16", False, True, weights_dtype="fp32")
    monkeypatch.setitem(speed_models.CONFIGURATIONS, "held", held)
    monkeypatch.setitem(speed_models.CONFIGURATIONS, "kept", kept)
    model = speed_models.build_seg_model(speed_models.build_parts(True, torch.device("cpu"), 0), 0, False, 16)
    variants = speed_models.AttentionVariants(model)
    variants.use("held")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    variants.use("kept")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    default, api = (speed_models.CONFIGURATIONS[k] for k in ("ours-default", "ours-default-fp32-weights"))
    assert api.weights_dtype == "fp32"
    assert api._replace(weights_dtype=None, unet_channels_last=None) == default


def test_compile_probe_dry_run_measures_each_variant_in_the_default_precision(tmp_path):
    """bench/compile_probe.py on the tiny preset with the eager backend: the same code as on a GPU, in iedp's
    default precision on this device (bf16 on a CPU with bf16 instructions, else fp32)."""
    from bench import compile_probe
    from bench.timing import dtype_name
    from iedp.engine.inference import resolve_dtype

    compile_probe.main([str(tmp_path), "--tiny", "--backend", "eager", "--batches", "1", "--repeats", "1"])
    summary = json.loads((tmp_path / "compile.json").read_text())
    assert summary["dtype"] == dtype_name(resolve_dtype(None, torch.device("cpu")))
    variants = [r["variant"] for r in summary["records"]]
    assert variants == ["eager", "compiled VAE", "compiled VAE + UNet"]
    assert all(r["median_s"] > 0 and r["first_call_s"] > 0 for r in summary["records"])
    assert "| compiled VAE + UNet | 1 |" in (tmp_path / "compile.md").read_text()


def test_stage_probe_repeats_each_stage_exactly_and_scores_the_shipped_world():
    from bench.stage_probe import probe
    from iedp.pretrain.pipeline import SHIPPED_DIR

    world = str(SHIPPED_DIR)
    quick = [
        "num_train=32",
        "resolution=64",
        "vae_crop=32",
        "unet_resolution=64",
        "vae_steps=6",
        "unet_steps=4",
    ]
    quick += ["vae_batch=4", "unet_batch=4", "num_heldout=8", "retrieval_gallery=8"]
    first, again = probe("vae", quick, 2, 8, world, False), probe("vae", quick, 2, 8, world, False)
    assert first["psnr_vae"] == again["psnr_vae"] and first["chroma_ratio"] == again["chroma_ratio"]
    assert first["config"]["vae_steps"] == 6 and first["selection_seed"] == 2
    first, again = probe("unet", quick, 2, 8, world, False), probe("unet", quick, 2, 8, world, False)
    assert first["denoising_mse"] == again["denoising_mse"] and first["last_loss"] == again["last_loss"]
    assert (
        first["own_caption_margin"]
        == 1 - first["denoising_mse"]["caption"] / first["denoising_mse"]["wrong_scene"]
    )

    shipped = probe("vae", [], 2, 24, world, True)
    # the shipped VAE keeps the image far better than a 1/8 thumbnail and most of its colour
    assert shipped["psnr_vae"] > shipped["psnr_thumbnail"] + 3 and shipped["chroma_ratio"] > 0.85
    shipped = probe("unet", [], 2, 24, world, True)
    # the shipped UNet uses its caption, most where the image is most hidden
    assert 0 < shipped["own_caption_margin"] < shipped["margin_by_timestep"][-1]
    assert shipped["margin_by_timestep"][-1] > 0.05


def _stage_probe(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bench.stage_probe", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)


def test_stage_probe_refuses_the_reports_data_seed_and_saves_only_a_trained_unet(tmp_path):
    result = _stage_probe("unet", "--selection-seed", "1", "--json", str(tmp_path / "p.json"))
    assert result.returncode == 2 and "--selection-seed: 1 is the training scenes' data seed" in result.stderr
    result = _stage_probe("vae", "--save", str(tmp_path / "w"), "--json", str(tmp_path / "p.json"))
    assert result.returncode == 2 and "--save: only a trained UNet is saved" in result.stderr
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "w").exists()
