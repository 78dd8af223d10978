"""Issue 15's CPU defaults: the default inference precision per CPU, the channels_last VAE input, the
vpd-config configuration of bench/speed.py, and the comparisons of bench/precision.py."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from bench import speed_models, tables, timing
from iedp.engine.inference import autocast, for_inference, resolve_dtype, unet_channels_last
from iedp.models.attention import ClassAttentionProcessor

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def load_script(name: str):
    """bench/NAME.py as a module (bench/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return load_script("speed")


@pytest.fixture(scope="module")
def precision():
    return load_script("precision")


# -- the default precision on a CPU ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"avx2": True, "avx512_f": True, "avx512_bf16": True}, torch.bfloat16),  # e.g. EPYC Zen 4
        ({"avx2": True, "amx_bf16": True, "amx_tile": True}, torch.bfloat16),  # Xeon with AMX
        ({"avx2": True, "avx512_f": True, "avx512_bw": True}, torch.float32),  # AVX-512 without bf16
        ({"avx2": True}, torch.float32),  # e.g. EPYC Zen 3: bf16 only by conversion
        ({"architecture": "arm64", "bf16": True}, torch.float32),  # not measured: fp32
    ],
)
def test_cpu_default_dtype_follows_native_bf16(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert resolve_dtype(None, CPU) == expected
    assert resolve_dtype("auto", CPU) == expected
    # an explicit choice is never overridden
    assert resolve_dtype("fp32", CPU) == torch.float32
    assert resolve_dtype("bf16", CPU) == torch.bfloat16


def test_cpu_default_dtype_without_capability_query_is_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # torch versions before the query existed
    assert resolve_dtype(None, CPU) == torch.float32


def test_cpu_capabilities_do_not_decide_for_other_devices(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert resolve_dtype(None, torch.device("meta")) == torch.float32


# -- channels_last VAE input -------------------------------------------------------------------------------------
def _tiny_seg_model():
    parts = speed_models.tiny_parts(CPU)
    return speed_models.build_seg_model(parts, seed=0, gradient_checkpointing=False, width=16).eval()


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny_seg_model()


def test_encoder_input_format_defaults_by_device(tiny_model):
    backbone = tiny_model.backbone
    assert backbone.encoder_channels_last is None
    assert backbone.encoder_uses_channels_last(CPU) is True
    assert backbone.encoder_uses_channels_last(torch.device("cuda")) is False  # slower on an H100
    backbone.encoder_channels_last = False
    try:
        assert backbone.encoder_uses_channels_last(CPU) is False
    finally:
        backbone.encoder_channels_last = None


def test_channels_last_encoder_matches_contiguous(tiny_model):
    """The VAE really sees channels_last input, the UNet gets contiguous latents, and both paths agree to float
    rounding (the encoder, then the whole segmentation forward)."""
    backbone = tiny_model.backbone
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = []
    hook = backbone.vae.encoder.conv_in.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    outputs = {}
    try:
        for channels_last in (False, True):
            backbone.encoder_channels_last = channels_last
            latents = backbone.encode(images)
            assert latents.is_contiguous() or not channels_last  # the UNet runs as before
            with torch.no_grad():
                logits = tiny_model({"image": images, "prompt": ["wall"] * 2}, mode="predict")
            outputs[channels_last] = (latents, logits)
    finally:
        hook.remove()
        backbone.encoder_channels_last = None
    assert (
        seen == [False] * 4 + [True] * 4
    )  # encode, then the forward's encode, each once per image (slicing)
    (latents, logits), (latents_cl, logits_cl) = outputs[False], outputs[True]
    assert latents.abs().max() > 0.1  # the comparison is of real values
    torch.testing.assert_close(latents_cl, latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_cl, logits, atol=1e-5, rtol=1e-5)


# -- bench/speed.py's configurations -----------------------------------------------------------------------------
def processors_of(module: torch.nn.Module) -> dict[str, object]:
    return {name: m.processor for name, m in module.named_modules() if isinstance(m, Attention)}


def test_vpd_config_installs_classic_attention_everywhere(tiny_model):
    backbone = tiny_model.backbone
    variants = speed_models.AttentionVariants(tiny_model)
    capture = {name.removesuffix(".processor") for name in backbone.capture_layers()}
    assert capture  # the tiny model captures class maps at some layers
    try:
        variants.use("vpd-config")
        unet, vae = processors_of(backbone.unet), processors_of(backbone.vae)
        assert len(unet) == len(backbone.unet.attn_processors) and len(vae) >= 1
        for name, processor in unet.items():
            expected = speed_models.VPDCaptureProcessor if name in capture else AttnProcessor
            assert type(processor) is expected, name
        assert all(type(p) is AttnProcessor for p in vae.values())
        assert backbone.encoder_channels_last is False
        assert timing.variant_dtype("vpd-config", "fp32", CPU) == "fp32"

        variants.use("ours-default")
        unet, vae = processors_of(backbone.unet), processors_of(backbone.vae)
        for name, processor in unet.items():
            expected = ClassAttentionProcessor if name in capture else AttnProcessor2_0
            assert type(processor) is expected, name
        assert all(type(p) is AttnProcessor2_0 for p in vae.values())
        assert backbone.encoder_channels_last is None  # the backbone's own default
        assert timing.variant_dtype("ours-default", "fp32", CPU) == timing.dtype_name(
            resolve_dtype(None, CPU)
        )

        variants.use("ours-default-contiguous")
        assert backbone.encoder_channels_last is False
    finally:
        variants.use("ours")
        backbone.encoder_channels_last = None


def test_ours_default_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert timing.variant_dtype("ours-default", "fp32", CPU) == "bf16"
    assert timing.variant_dtype("vpd-config", "fp32", CPU) == "fp32"
    assert timing.variant_dtype("ours", "fp32", CPU) == "fp32"  # attention variants keep the worker's dtype
    # each configuration holds the weights as its command would: iedp predict in bf16 here, VPD in fp32
    variants = speed_models.AttentionVariants(_tiny_seg_model())
    weight_dtypes = {}
    for name in ("ours-default", "vpd-config", "ours", "ours-default", "ours"):
        variants.use(name)
        weight_dtypes[name] = {p.dtype for p in variants.model.parameters()}
    assert weight_dtypes == {
        "ours-default": {torch.bfloat16},
        "vpd-config": {torch.float32},
        "ours": {torch.bfloat16},
    }


def _record(variant, dtype, median_s, extra_bytes, vae_channels_last=False, stage="inference"):
    memory = (
        None
        if extra_bytes is None
        else {"base_bytes": 1, "peak_bytes": 1 + extra_bytes, "extra_bytes": extra_bytes}
    )
    return {
        "stage": stage,
        "dtype": dtype,
        "size": 512,
        "batch_size": 1,
        "gradient_checkpointing": False,
        "channels_last": False,
        "vae_channels_last": vae_channels_last,
        "variant": variant,
        "device": "cpu",
        "threads": 1,
        "memory": memory,
        "median_s": median_s,
        "times_s": [median_s],
        "median_cpu_s": median_s,
    }


def test_defaults_comparison_pairs_across_dtypes():
    records = [
        _record("ours-default", "bf16", 5.0, 300, vae_channels_last=True),
        _record("vpd-config", "fp32", 20.0, 1200),
        _record("ours-default-contiguous", "bf16", 8.0, None),
        _record("ours", "fp32", 10.0, 100),  # an attention pair of another dtype: compared on its own
        _record("baseline", "fp32", 12.0, 200),
    ]
    compared = {c["variant"]: c for c in tables.comparisons(records)}
    assert compared["ours-default"]["speedup"] == 4.0 and compared["ours-default"]["memory_ratio"] == 0.25
    assert compared["ours-default"]["reference"] == "vpd-config"
    assert compared["ours-default-contiguous"]["cpu_time_speedup"] == 2.5
    assert compared["ours"]["speedup"] == 1.2 and compared["ours"]["reference"] == "baseline"
    goals = tables.goals(list(compared.values()))
    assert goals["cpu_defaults_inference_speedup>=3"] == {
        "measure": "cpu_time_speedup",
        "value": 4.0,
        "met": True,
        "size": 512,
    }
    assert goals["inference_speedup>=1.3"]["value"] == 1.2  # still ours vs baseline
    row = tables.table_row(
        records[0] | {"machine": {"gpu": "X"}, "images_per_s": 0.2, "load_average": 1.0},
        list(compared.values()),
        "2026-11-28",
    )
    assert "| VAE input |" in row and "4.00× (CPU time 4.00×) vs vpd-config" in row and "| 0.25 |" in row


def test_defaults_jobs_in_the_plan(speed):
    args = speed.parse_args(["--parts", "defaults", "--threads", "1"])
    jobs = speed.plan(args)
    timed = [j for j in jobs if not j.memory_only]
    assert [(j.stage, j.variants) for j in timed] == [
        ("inference", "ours-default,vpd-config,ours-default-contiguous"),
        ("vae", "ours-default,vpd-config,ours-default-contiguous"),
    ]
    assert all(j.dtype == "fp32" and not j.channels_last for j in jobs)  # fp32 weights, as predict loads them
    assert [(j.stage, j.variants) for j in jobs if j.memory_only] == [("inference", "vpd-config")]
    with pytest.raises(SystemExit):
        speed.parse_args(["--worker", "--variant", "vpd-config", "--dtype", "bf16"])


# -- bench/precision.py ------------------------------------------------------------------------------------------
def test_relative_depth_difference_and_summary(precision):
    reference = torch.tensor([1.0, 2.0, 4.0, 0.0])
    test = torch.tensor([1.01, 2.0, 3.0, 0.001])
    torch.testing.assert_close(
        precision.relative_difference(test, reference), torch.tensor([0.01, 0.0, 0.25, 1.0])
    )
    summary = precision.depth_summary(torch.arange(101, dtype=torch.float32) / 100)  # 0.00 … 1.00
    assert summary["pixels"] == 101 and summary["max"] == 1.0
    assert summary["mean"] == pytest.approx(0.5) and summary["p99"] == pytest.approx(0.99)


def test_seg_agreement_summary(precision):
    summary = precision.seg_summary(agree=995, total=1000, per_image=[1.0, 0.99])
    assert summary == {
        "pixel_agreement": 0.995,
        "worst_image_agreement": 0.99,
        "pixels": 1000,
        "meets_goal": True,
    }
    assert not precision.seg_summary(994, 1000, [0.994])["meets_goal"]


def test_gpu_check_defaults_comparison(monkeypatch):
    """bench/gpu_check.py's ours-default vs vpd-config ratios and goals (the GPU rows are measured elsewhere)."""
    monkeypatch.syspath_prepend(str(ROOT))  # gpu_check imports bench.*
    gpu_check = load_script("gpu_check")

    def record(variant, dtype, times, peak):
        memory = {"base_bytes": 1, "peak_bytes": peak, "extra_bytes": peak - 1}
        return {
            "stage": "inference",
            "batch_size": 16,
            "variant": variant,
            "dtype": dtype,
            "times_s": times,
            "median_s": sorted(times)[1],
            "memory": memory,
        }

    records = [
        record("ours-default", "bf16", [1.0, 2.0, 3.0], 10),
        record("vpd-config", "fp32", [6.0, 4.0, 9.0], 40),
    ]
    compared = gpu_check.defaults_comparison(records)
    assert compared["speedup"] == 3.0 and compared["memory_ratio"] == 0.25
    assert compared["speedup_paired_median"] == 3.0  # rounds: 6/1, 4/2, 9/3
    goals = gpu_check.goals(records, None, compared)
    assert goals["defaults_inference_speedup_batch16>=4"] == {"value": 3.0, "met": False}
    assert goals["defaults_inference_peak_memory_ratio_batch16<=0.5"] == {"value": 0.25, "met": True}
    assert gpu_check.defaults_comparison(records[:1]) is None


def test_gpu_check_projects_the_recipe_per_gpu_batch(monkeypatch):
    """The ADE20K projection: 80k steps at total batch 16, one layout per measured per-GPU batch, cheapest first."""
    monkeypatch.syspath_prepend(str(ROOT))
    gpu_check = load_script("gpu_check")

    def step(batch, seconds, checkpointing=False, variant="ours"):
        return {
            "stage": "train",
            "variant": variant,
            "batch_size": batch,
            "gradient_checkpointing": checkpointing,
            "median_s": seconds,
            "memory": {"peak_bytes": 2**30 * batch},
        }

    records = [
        step(2, 0.25),
        step(8, 0.36),
        step(8, 0.45, True),
        step(2, 0.1, variant="baseline"),
        step(3, 0.1),
    ]
    projected = gpu_check.projection(records)
    assert [(p["batch_per_gpu"], p["gpus"]) for p in projected["layouts"]] == [(8, 2), (8, 2), (2, 8)]
    assert projected["gpu_hours"] == pytest.approx(80_000 * 0.36 * 2 / 3600)  # 16 GPU-hours
    assert projected["layouts"][-1]["gpu_hours"] == pytest.approx(80_000 * 0.25 * 8 / 3600)  # 44.4
    assert projected["wall_clock_hours"] == pytest.approx(8.0) and projected["peak_gib"] == 8
    goals = gpu_check.goals(records, projected)
    assert goals["ade20k_80k_gpu_hours<8"] == {"value": pytest.approx(16.0), "met": False}
    assert gpu_check.projection([step(2, 0.1, variant="baseline")]) is None
    compiled = gpu_check.projection([*records, step(16, 0.3, variant=gpu_check.COMPILED)])
    assert (compiled["batch_per_gpu"], compiled["variant"]) == (
        16,
        gpu_check.COMPILED,
    )  # 6.7 GPU-hours, first
    assert gpu_check.goals(records, compiled)["ade20k_80k_gpu_hours<8"]["met"]
    summary = {"date": "d", "machine": {"gpu": "H200"}, "records": [], "projection": compiled}
    rows = gpu_check.table_rows(summary)
    assert "| projection | ours-compiled | 16×1 | no |" in rows[0] and "on 1 GPU = 6.7 GPU-hours" in rows[0]


# -- weights held in the inference precision -----------------------------------------------------------------------
def test_for_inference_holds_the_weights_in_the_autocast_dtype(tiny_model):
    """bf16 weights under bf16 autocast give what fp32 weights under it give (each matmul and convolution casts
    its weight to bf16 either way): no error beyond autocast's own, and the model then holds no fp32 parameter."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {"image": images, "prompt": ["wall"] * 2}
    model = _tiny_seg_model()  # the same weights (a deep copy would keep the original's feature hooks)
    with torch.no_grad():
        exact = model(batch, mode="predict")
        with autocast(CPU, torch.bfloat16):
            autocast_only = model(batch, mode="predict").float()
            assert for_inference(model, CPU, torch.bfloat16) is model and not model.training
            held = model(batch, mode="predict").float()
            assert torch.equal(tiny_model(batch, mode="predict").float(), autocast_only)  # same start
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(tiny_model.parameters()).dtype == torch.float32  # only the model given is cast
    autocast_error = (autocast_only - exact).abs().mean()
    assert 0 < autocast_error < 0.02 * exact.std()
    assert (held - autocast_only).abs().mean() < autocast_error  # measured: half of it
    assert (held - exact).abs().mean() < 1.25 * autocast_error  # measured: 1.005×


def test_for_inference_reorders_the_unet_to_channels_last_only_on_a_cpu_in_bf16():
    """Measured faster there (UNet 1.08× on an AVX512-BF16 EPYC), no faster in fp32 on an AVX2 one, slower on
    an H100; the reorder changes the memory layout, never the weights' values."""
    assert unet_channels_last(CPU, torch.bfloat16)
    assert not unet_channels_last(CPU, torch.float32)
    assert not unet_channels_last(torch.device("cuda"), torch.bfloat16)
    model = _tiny_seg_model()
    conv = model.unet.conv_in.weight
    assert not conv.is_contiguous(memory_format=torch.channels_last)
    values = conv.detach().to(torch.bfloat16).clone()
    for_inference(model, CPU, torch.float32)
    assert not model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for_inference(model, CPU, torch.bfloat16)
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(model.unet.conv_in.weight, values)
    assert not model.backbone.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for_inference(model, CPU, torch.float32)  # held again for another device or dtype: contiguous again
    assert model.unet.conv_in.weight.is_contiguous()


def test_precision_bench_compares_the_two_dtypes_as_evaluate_holds_the_model(
    precision, tmp_path, monkeypatch
):
    """Each dtype gets its own copy of the checkpoint, held by for_inference as `iedp evaluate` holds it (bf16
    weights, the UNet in channels_last), so the agreement measured is that of the default path."""
    from iedp.config import Config, DataConfig, ModelConfig
    from iedp.model_files import save_model
    from iedp.models.build import build_model

    torch.manual_seed(0)
    model_config = ModelConfig(
        task="seg", method="vpd", classes="synthetic", neck_channels=16, head_channels=16
    )
    config = Config(model=model_config, data=DataConfig(resolution=64, num_val=2))
    save_model(build_model(model_config, with_text=False).eval(), config, tmp_path / "ckpt")
    held = []
    monkeypatch.setattr(
        precision,
        "for_inference",
        lambda model, device, dtype: held.append((dtype, id(model))) or for_inference(model, device, dtype),
    )
    result = precision.check_checkpoint(tmp_path / "ckpt", max_images=2)
    assert [dtype for dtype, _ in held] == [torch.float32, torch.bfloat16]
    assert held[0][1] != held[1][1]  # two copies: the fp32 reference is not rounded by the bf16 cast
    agreement = result["bf16_vs_fp32"]["pixel_agreement"]
    assert result["images"] == 2 and result["bf16_vs_fp32"]["pixels"] == 2 * 64 * 64
    assert 0.5 < agreement <= 1.0 and result["metrics"]["fp32"]["mIoU"] >= 0
