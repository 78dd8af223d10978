"""The miniature pre-training (iedp.pretrain): each stage on a few steps, the saved folder, the report, the cache."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from iedp.cli import main
from iedp.errors import InputError
from iedp.pretrain import QUICK_CONFIG, PretrainConfig, cache_key, pipeline
from iedp.pretrain.clip import object_retrieval, recall_at
from iedp.pretrain.data import SceneSet, caption, colour_name, render_scenes, sample_caption, visible_classes
from iedp.pretrain.report import markdown
from iedp.pretrain.text_to_image import Conditioner
from iedp.pretrain.vae import psnr, random_crops
from iedp.weights import load_clip, load_stable_diffusion, make_tiny, resolve_weights


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pretrain_cache")


@pytest.fixture(scope="module")
def pretrained(cache_dir) -> Path:
    """``resolve_weights("tiny-pretrained")`` with the quick config, built once into a fresh cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IEDP_CACHE", str(cache_dir))
        patch.setattr(pipeline, "DEFAULT_CONFIG", QUICK_CONFIG)
        sd_path, clip_path = resolve_weights("tiny-pretrained")
    assert clip_path == str(Path(sd_path) / "clip"), "the CLIP part is the folder's clip/"
    return Path(sd_path)


@pytest.fixture(scope="module")
def report(pretrained) -> dict:
    return json.loads((pretrained / "report.json").read_text())


@pytest.mark.parametrize("stage", ["vae", "clip", "unet", "classifier"])
def test_stage_loss_falls(report, stage):
    losses = report["losses"][stage]
    assert len(losses) == getattr(QUICK_CONFIG, f"{stage}_steps")
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), f"{stage} losses {losses}"


def test_folder_loads_through_the_standard_loaders(pretrained, tmp_path):
    assert pretrained.name == f"tiny-pretrained-{cache_key(QUICK_CONFIG)}"
    unet, vae = load_stable_diffusion(str(pretrained))
    vision, text, tokenizer = load_clip(str(pretrained / "clip"))
    assert unet.config.cross_attention_dim == vision.config.projection_dim == text.config.projection_dim == 32
    # The UNet reads the text tower's last hidden states, as SD's reads CLIP ViT-L/14's (768 = 768).
    assert text.config.hidden_size == unet.config.cross_attention_dim
    assert tokenizer("a photo of a kitchen").input_ids[0] == tokenizer.bos_token_id
    assert vae.config.scaling_factor == pytest.approx(report_scaling(pretrained))
    assert (pretrained / "scheduler" / "scheduler_config.json").is_file()
    for part in ("unet", "vae"):  # named after the world, not the temporary folder the stages read them from
        assert (
            json.loads((pretrained / part / "config.json").read_text())["_name_or_path"] == "tiny-pretrained"
        )
    # Every part was trained: its weights differ from the preset it started from.
    make_tiny(tmp_path, seed=QUICK_CONFIG.seed)
    start_unet, start_vae = load_stable_diffusion(str(tmp_path))
    start_vision, start_text, _ = load_clip(str(tmp_path / "clip"))
    for trained, start in ((unet, start_unet), (vae, start_vae), (vision, start_vision), (text, start_text)):
        assert not all(
            torch.equal(a, b)
            for a, b in zip(trained.state_dict().values(), start.state_dict().values(), strict=True)
        ), type(trained).__name__


def report_scaling(folder: Path) -> float:
    return json.loads((folder / "report.json").read_text())["vae"]["scaling_factor"]


def test_report_lists_the_evidence(pretrained, report):
    for key in ("psnr_vae", "psnr_mean_colour", "psnr_thumbnail", "chroma_ratio"):
        assert np.isfinite(report["vae"]["trained"][key]) and np.isfinite(report["vae"]["random_init"][key])
    for key in (
        "zero_shot_accuracy",
        "i2t_r1",
        "t2i_r1",
        "i2t_r5",
        "t2i_r5",
        "object_p5",
        "object_p5_chance",
    ):
        assert 0 <= report["clip"]["trained"][key] <= 1
    assert report["clip"]["trained"]["gallery"] == QUICK_CONFIG.retrieval_gallery
    assert set(report["unet"]["denoising_mse"]) == {"caption", "scene_only", "empty", "wrong_scene"}
    bands = report["unet"]["denoising_by_timestep"]
    assert [b["timesteps"] for b in bands] == [[0, 249], [250, 499], [500, 749], [750, 999]]
    # the bands split the same draws: their sizes add up, their shares sum to one, and their MSEs, weighted by
    # size, average to the overall figure
    samples = np.array([b["samples"] for b in bands])
    assert samples.sum() == QUICK_CONFIG.num_heldout * QUICK_CONFIG.denoise_draws
    assert sum(b["share_of_error"] for b in bands) == pytest.approx(1.0)
    for context, overall in report["unet"]["denoising_mse"].items():
        by_band = np.array([b[context] for b in bands])
        assert (samples[samples > 0] * by_band[samples > 0]).sum() / samples.sum() == pytest.approx(overall)
    assert 0 <= report["unet"]["sample_zero_shot_accuracy"] <= 1
    assert 0 <= report["unet"]["sample_classifier_accuracy"] <= 1
    assert 0 <= report["classifier"]["heldout_accuracy"] <= 1
    assert (
        json.loads((pretrained / "version.json").read_text())["key"]
        == report["key"]
        == cache_key(QUICK_CONFIG)
    )
    assert report["config"] == dataclasses.asdict(QUICK_CONFIG)
    assert report["device"] == "cpu" and report["render_workers"] == report["workers"]
    assert report["timings_s"]["total"] >= report["timings_s"]["vae"] > 0
    text = (pretrained / "report.md").read_text()
    for phrase in (
        "PSNR",
        "zero-shot accuracy",
        "R@1",
        "P@5",
        "noise-prediction MSE",
        "| 750–999 |",
        "samples.png",
        "classifier",
    ):
        assert phrase in text
    grid = Image.open(pretrained / "samples.png")
    size = QUICK_CONFIG.unet_resolution
    assert grid.width == (1 + QUICK_CONFIG.samples_per_scene) * size  # a real scene, then the samples
    assert grid.height > 6 * size  # six scene types, each under its titles
    assert Image.open(pretrained / "reconstructions.png").width == 8 * QUICK_CONFIG.resolution


def test_resolve_weights_reuses_the_cache(pretrained, cache_dir, monkeypatch):
    monkeypatch.setenv("IEDP_CACHE", str(cache_dir))
    monkeypatch.setattr(pipeline, "DEFAULT_CONFIG", QUICK_CONFIG)

    def fail(*args, **kwargs):
        raise AssertionError("pre-trained again despite the cache")

    monkeypatch.setattr(pipeline, "pretrain_tiny", fail)
    assert resolve_weights("tiny-pretrained") == (str(pretrained), str(pretrained / "clip"))


def test_same_weights_in_one_process_or_two(pretrained, report, tmp_path):
    """The VAE and classifier run in a worker process beside CLIP and the UNet, or all in one process: each stage
    seeds its own random numbers, so the weights and the report's figures are the same either way."""
    other = 1 if report["workers"] == 2 else 2
    folder = pipeline.pretrain_tiny(tmp_path, QUICK_CONFIG, workers=other)
    assert json.loads((folder / "report.json").read_text())["workers"] == other
    assert_same_world(folder, pretrained, report)


def assert_same_world(folder: Path, reference: Path, reference_report: dict) -> None:
    """``folder`` holds the weights of ``reference`` bit for bit, and its report the same figures and losses."""
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "clip/model.safetensors",
    ):
        ours, theirs = load_file(folder / part), load_file(reference / part)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[name], theirs[name]) for name in ours), part
    figures = json.loads((folder / "report.json").read_text())
    for stage in ("vae", "clip", "unet", "classifier", "losses"):
        assert figures[stage] == reference_report[stage], stage


def test_an_interrupted_run_resumes_after_its_finished_stages(pretrained, report, tmp_path, monkeypatch):
    """A run stopped in the UNet stage keeps the VAE and CLIP it trained; the same call on the same folder trains
    only the UNet and ends with the weights and figures of an uninterrupted run."""

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "train_unet", interrupt)
        with pytest.raises(KeyboardInterrupt):
            pipeline.pretrain_tiny(tmp_path, QUICK_CONFIG, workers=1)
    stages = json.loads((tmp_path / pipeline.STAGES_FILE).read_text())
    assert stages["key"] == cache_key(QUICK_CONFIG) and sorted(stages["stages"]) == ["clip", "vae"]
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half written")

    def train_again(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(pipeline, "train_vae", train_again)
    monkeypatch.setattr(pipeline, "train_clip", train_again)
    folder = pipeline.pretrain_tiny(tmp_path, QUICK_CONFIG, workers=1)
    assert not (folder / pipeline.STAGES_FILE).exists()
    resumed = json.loads((folder / "report.json").read_text())
    assert resumed["resumed_after"] == ["clip", "vae"]
    assert "resumed after an interruption: clip, vae" in (folder / "report.md").read_text()
    assert_same_world(folder, pretrained, report)


def test_a_unet_probe_saved_on_a_world_finishes_as_a_build_from_scratch(pretrained, tmp_path, monkeypatch):
    """``bench/stage_probe.py unet --save`` trains a UNet stage on a world's VAE and CLIP; ``pretrain-tiny`` on the
    folder it leaves trains only the classifier and ends with the weights and figures of a build from scratch."""
    from bench.stage_probe import probe

    changed = dataclasses.replace(QUICK_CONFIG, unet_steps=16, unet_lr=1e-3, snr_gamma=None)
    scratch = pipeline.pretrain_tiny(tmp_path / "scratch", changed, workers=1)
    overrides = [
        f"{name}={'none' if value is None else value}"
        for name, value in dataclasses.asdict(changed).items()
        if value != getattr(pipeline.DEFAULT_CONFIG, name)
    ]
    probe("unet", overrides, 2, 8, str(pretrained), False, save=tmp_path / "staged")
    assert json.loads((tmp_path / "staged" / pipeline.STAGES_FILE).read_text())["key"] == cache_key(changed)

    def train_again(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    for stage in ("train_vae", "train_clip", "train_unet"):
        monkeypatch.setattr(pipeline, stage, train_again)
    folder = pipeline.pretrain_tiny(tmp_path / "staged", changed, workers=1)
    assert json.loads((folder / "report.json").read_text())["resumed_after"] == ["clip", "unet", "vae"]
    assert_same_world(folder, scratch, json.loads((scratch / "report.json").read_text()))


def test_a_unet_build_needs_a_world_of_the_same_vae_and_clip_settings(pretrained, tmp_path):
    other_vae = dataclasses.replace(QUICK_CONFIG, vae_steps=13, unet_steps=16)
    with pytest.raises(InputError, match=r"built with other vae_steps; its VAE and CLIP are not"):
        pipeline.check_unet_build(tmp_path / "new", pretrained, other_vae)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(InputError, match=r"full: not empty"):
        pipeline.check_unet_build(tmp_path / "full", pretrained, QUICK_CONFIG)
    with pytest.raises(InputError, match=r"not a finished build of the tiny world"):
        pipeline.check_unet_build(tmp_path / "new", tmp_path, QUICK_CONFIG)


def test_the_worker_s_vae_is_kept_when_clip_fails_beside_it(tmp_path, monkeypatch):
    """With two processes the VAE trains in the worker while CLIP trains here; a failure in CLIP still leaves the
    VAE recorded once the worker finishes it."""

    def fail(*args, **kwargs):
        raise RuntimeError("CLIP failed")

    monkeypatch.setattr(pipeline, "train_clip", fail)  # this process only: the worker trains its VAE
    with pytest.raises(RuntimeError, match="CLIP failed"):
        pipeline.pretrain_tiny(tmp_path, QUICK_CONFIG, workers=2)
    stages = json.loads((tmp_path / pipeline.STAGES_FILE).read_text())["stages"]
    assert list(stages) == ["vae"]
    assert len(stages["vae"]["report"]["losses"]) == QUICK_CONFIG.vae_steps


def test_stage_record_of_other_settings_starts_over_and_a_broken_one_is_one_line(tmp_path):
    pipeline.StageRecord(tmp_path, "key-a").add("vae", {"psnr": 25.0}, 12.5)
    assert pipeline.StageRecord.load(tmp_path, "key-a").finished == {
        "vae": {"report": {"psnr": 25.0}, "seconds": 12.5}
    }
    assert pipeline.StageRecord.load(tmp_path, "key-b").finished == {}
    assert pipeline.StageRecord.load(tmp_path / "elsewhere", "key-a").finished == {}
    (tmp_path / pipeline.STAGES_FILE).write_text('{"key": "key-a"')
    with pytest.raises(InputError, match=r"stages\.json: unreadable record of finished stages .*delete it"):
        pipeline.StageRecord.load(tmp_path, "key-a")


def test_cache_key_covers_versions_and_config(monkeypatch):
    key = cache_key(QUICK_CONFIG)
    assert cache_key(dataclasses.replace(QUICK_CONFIG, unet_steps=13)) != key
    monkeypatch.setattr(pipeline, "RENDERER_VERSION", "changed")
    assert cache_key(QUICK_CONFIG) != key


def test_cli_writes_the_folder(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["pretrain-tiny", str(out), "--quick", "--set", "unet_steps=5", "--set", "snr_gamma=none"]) == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    for name in ("unet", "vae", "clip", "report.md", "report.json", "samples.png", "version.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    changed = dataclasses.replace(QUICK_CONFIG, unet_steps=5, snr_gamma=None)
    assert report["config"] == dataclasses.asdict(changed) and report["key"] == cache_key(changed)
    assert len(report["losses"]["unet"]) == 5

    # the same command again finds the finished build and trains nothing
    weights = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    args = ["pretrain-tiny", str(out), "--quick", "--set", "unet_steps=5", "--set", "snr_gamma=none"]
    assert main(args) == 0 and capsys.readouterr().out.strip() == str(out)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert json.loads((out / "report.json").read_text()) == report


def test_cli_refuses_a_folder_it_would_overwrite(pretrained, tmp_path, capsys):
    """Only a new or empty folder, a build in progress or the same finished build: nothing else is overwritten."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    shutil.copytree(pretrained, tmp_path / "world")
    for folder, message in (
        (
            "notes",
            "not a build of the tiny world, which this build would overwrite; choose a new or empty folder",
        ),
        ("file", "is a file, not a folder"),
        ("world", f"a finished build of other settings (key {cache_key(QUICK_CONFIG)})"),
    ):
        assert main(["pretrain-tiny", str(tmp_path / folder), "--quick", "--set", "unet_steps=5"]) == 2
        assert f"{tmp_path / folder}: {message}" in capsys.readouterr().err
    assert (tmp_path / "notes" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["notes.txt"]


def test_refresh_denoising_recomputes_the_same_figures_without_training(pretrained, report, tmp_path, capsys):
    world = tmp_path / "world"
    shutil.copytree(pretrained, world)
    stale = json.loads((world / "report.json").read_text())
    del stale["unet"]["denoising_by_timestep"]  # as a report of older code
    stale["unet"]["denoising_mse"] = dict.fromkeys(stale["unet"]["denoising_mse"], 1.0)
    (world / "report.json").write_text(json.dumps(stale))
    weights = (world / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["pretrain-tiny", str(world), "--refresh-denoising"]) == 0
    assert capsys.readouterr().out.strip() == str(world)
    refreshed = json.loads((world / "report.json").read_text())
    assert refreshed["unet"]["denoising_mse"] == pytest.approx(report["unet"]["denoising_mse"], rel=1e-5)
    for new, old in zip(
        refreshed["unet"]["denoising_by_timestep"], report["unet"]["denoising_by_timestep"], strict=True
    ):
        assert new["timesteps"] == old["timesteps"]
        assert {k: v for k, v in new.items() if k != "timesteps"} == pytest.approx(
            {k: v for k, v in old.items() if k != "timesteps"}, rel=1e-5
        )
    assert {k: v for k, v in refreshed.items() if k != "unet"} == {
        k: v for k, v in stale.items() if k != "unet"
    }
    assert (world / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert "| 0–249 |" in (world / "report.md").read_text()


def test_refresh_denoising_needs_a_report(tmp_path, capsys):
    assert main(["pretrain-tiny", str(tmp_path), "--refresh-denoising"]) == 2
    error = capsys.readouterr().err.strip()
    assert "report.json: no report to refresh" in error and len(error.splitlines()) == 1
    assert main(["pretrain-tiny", str(tmp_path), "--refresh-denoising", "--quick"]) == 2
    assert "drop --quick and --set" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("vae_stepz=9", "unknown config key vae_stepz; did you mean vae_steps?"),
        ("vae_steps=many", "vae_steps: 'many' is not an integer"),
        ("vae_crop=60", "PretrainConfig.vae_crop: must be a multiple of the VAE factor 8, got 60"),
    ],
)
def test_cli_refuses_a_bad_setting_in_one_line(tmp_path, capsys, assignment, message):
    assert main(["pretrain-tiny", str(tmp_path / "out"), "--quick", "--set", assignment]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_rendering_in_processes_gives_the_same_scenes():
    alone = render_scenes("val", 9, 32, seed=5)
    split = render_scenes("val", 9, 32, seed=5, workers=2)
    assert torch.equal(alone.images, split.images)
    assert (alone.scenes, alone.classes, alone.counts, alone.colours) == (
        split.scenes,
        split.classes,
        split.counts,
        split.colours,
    )
    assert len(set(alone.scenes)) > 1  # the chunks hold different scenes, in order


def test_report_says_where_it_trained(report):
    assert "one intra-op thread per process" in markdown(report)
    on_gpu = markdown({**report, "device": "NVIDIA H200", "render_workers": 16})
    assert "every stage on one NVIDIA H200, one after another" in on_gpu
    assert "rendered in 16 process(es)" in on_gpu


def test_bad_workers_or_device_is_one_line(tmp_path, capsys):
    with pytest.raises(InputError, match="--workers: must be 1 or 2 on the CPU"):
        pipeline.pretrain_tiny(tmp_path, QUICK_CONFIG, workers=3)
    assert not any(tmp_path.iterdir()), "nothing written before the check"
    if not torch.cuda.is_available():
        assert main(["pretrain-tiny", str(tmp_path / "out"), "--quick", "--device", "cuda"]) == 2
        assert "--device: 'cuda' asked for, but PyTorch sees no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="vae_crop"):
        PretrainConfig(vae_crop=60)
    with pytest.raises(ValueError, match="retrieval_gallery"):
        PretrainConfig(num_heldout=10, retrieval_gallery=20)


def _scene_set() -> SceneSet:
    label = np.zeros((10, 10), dtype=np.uint8)  # wall
    label[5:] = 1  # floor
    label[6:9, 2:8] = 4  # table
    label[2:4, 2:3] = 7  # lamp, 2 pixels
    label[2:4, 5:6] = 5  # chairs, 2 pixels
    return SceneSet(
        images=torch.zeros(1, 3, 10, 10, dtype=torch.uint8),
        scenes=["dining_room"],
        classes=[visible_classes(label)],
        counts=[{"table": 1, "lamp": 1, "chair": 2}],
        colours=[{"wall": "white", "floor": "brown", "table": "red", "lamp": "yellow", "chair": "blue"}],
    )


def test_captions():
    scenes = _scene_set()
    assert scenes.classes[0] == ["wall", "floor", "table", "chair", "lamp"]  # largest first, each >= 0.5%
    assert scenes.objects(0) == ["table", "chair", "lamp"]
    assert scenes.phrases(0) == ["white walls", "a brown floor", "a red table", "two chairs", "a yellow lamp"]
    assert (
        caption("kitchen", ["a red table", "two chairs"])
        == "a photo of a kitchen with a red table and two chairs"
    )
    assert caption("living_room", []) == "a photo of a living room"
    rng = np.random.default_rng(0)
    seen = {sample_caption(scenes, 0, rng) for _ in range(400)}
    full = (
        "a photo of a dining room with white walls, a brown floor, a red table, two chairs and a yellow lamp"
    )
    assert {full, "a photo of a dining room", "a photo of a wall, floor, table, chair and lamp"} < seen
    assert "a photo of a dining room with two chairs" in seen  # a subset of the phrases
    assert all(text.startswith("a photo of a") for text in seen)


def test_colour_names():
    assert colour_name((0.9, 0.1, 0.1)) == "red"
    assert colour_name((0.1, 0.6, 0.1)) == "green"
    assert colour_name((0.1, 0.2, 0.8)) == "blue"
    assert colour_name((0.95, 0.95, 0.95)) == "white"
    assert colour_name((0.5, 0.5, 0.5)) == "grey"
    assert colour_name((0.05, 0.05, 0.05)) == "black"
    assert colour_name((0.4, 0.25, 0.1)) == "brown"


def test_pure_functions():
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.1, 0.5]])
    assert recall_at(similarity, 1) == pytest.approx(2 / 3)  # row 1 ranks its own column second
    assert recall_at(similarity, 2) == pytest.approx(1.0)
    # object 0 is in images 0 and 2, object 1 in image 1, object 2 nowhere (left out)
    contains = torch.tensor([[True, False, True], [False, True, False], [False, False, False]])
    precision, chance = object_retrieval(similarity, contains, k=2)
    assert precision == pytest.approx((1 / 2 + 1 / 2) / 2)  # object 0: images 0, 1; object 1: images 1, 2
    assert chance == pytest.approx((2 / 3 + 1 / 3) / 2)
    images = torch.zeros(1, 3, 4, 4)
    assert psnr(images + 0.2, images).item() == pytest.approx(10 * np.log10(4 / 0.04))
    crops = random_crops(
        torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8), 4, torch.Generator()
    )
    assert crops.shape == (2, 3, 4, 4)


def test_conditioner_gives_the_last_hidden_states(pretrained):
    _, text, tokenizer = load_clip(str(pretrained / "clip"))
    conditioner = Conditioner(text, tokenizer)
    context = conditioner(["a photo of a kitchen", "a photo of a wall, floor and lamp"])
    assert context.shape == (2, tokenizer.model_max_length, text.config.hidden_size) == (2, 77, 32)
    tokens = tokenizer(["a photo of a kitchen"], padding="max_length", max_length=77, return_tensors="pt")
    assert torch.allclose(context[:1], text.text_model(input_ids=tokens.input_ids).last_hidden_state)
