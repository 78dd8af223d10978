"""The IEDP model on the tiny preset: methods, branches, attention capture, frozen parts, checkpoints."""

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from iedp.config import Config, ModelConfig, TrainConfig
from iedp.engine.optim import lr_factor, parameter_groups
from iedp.errors import InputError
from iedp.methods import METHODS
from iedp.model_files import load_model, save_model
from iedp.models.build import build_model

SIZE = 64  # the smallest input the 4-level UNet + VAE (factor 64) accepts


def seg_config(method="iedp", **kw):
    return ModelConfig(
        task="seg", method=method, classes="synthetic", neck_channels=16, head_channels=16, **kw
    )


def depth_config(method="iedp", **kw):
    return ModelConfig(
        task="depth",
        method=method,
        classes="synthetic_scenes",
        depth_fuse_channels=32,
        depth_head_channels=16,
        **kw,
    )


def seg_batch(model, B=2, H=SIZE, W=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(B, 3, H, W, generator=g) * 2 - 1,
        "label": torch.randint(0, model.num_classes, (B, H, W), generator=g),
        "prompt": ["a photo of a wall and floor"] * B,
    }


def depth_batch(B=2, H=SIZE, W=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(B, 3, H, W, generator=g) * 2 - 1,
        "depth": torch.rand(B, 1, H, W, generator=g) * 5 + 0.5,
        "prompt": ["a photo of a kitchen"] * B,
        "scene_id": torch.tensor([1, -1])[:B],
    }


@pytest.fixture(scope="module")
def seg_model():
    torch.manual_seed(0)
    return build_model(seg_config())


@pytest.mark.parametrize("method", ["vpd", "implicit", "explicit", "iedp"])
@pytest.mark.parametrize("task", ["seg", "depth"])
def test_methods_train_and_predict(task, method):
    torch.manual_seed(0)
    cfg = seg_config(method) if task == "seg" else depth_config(method)
    model = build_model(cfg)
    batch = seg_batch(model) if task == "seg" else depth_batch()
    losses = model(batch, mode="loss")
    assert set(losses) == {"loss"} | {f"loss_{b}" for b in METHODS[method].train_branches}
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    with torch.no_grad():
        out = model.eval()(batch, mode="predict")
    expected = (2, model.num_classes, SIZE, SIZE) if task == "seg" else (2, 1, SIZE, SIZE)
    assert out.shape == expected
    if task == "depth":
        assert (out > 0).all() and (out < cfg.max_depth).all()


def test_backbone_feature_pyramid(seg_model):
    backbone = seg_model.backbone
    C = seg_model.num_classes
    widths = list(reversed(backbone.unet.config.block_out_channels))
    assert backbone.out_channels == {8: widths[3], 16: widths[2] + C, 32: widths[1] + C, 64: widths[0]}
    images = torch.rand(1, 3, 128, 192) * 2 - 1
    context = seg_model.context(None, 1)
    output = backbone(backbone.encode(images), context)
    features = output.features
    assert {s: tuple(f.shape) for s, f in features.items()} == {
        s: (1, backbone.out_channels[s], 128 // s, 192 // s) for s in (8, 16, 32, 64)
    }
    # the class maps are attention probabilities averaged over heads and layers: in [0, 1], summing to <= 1
    maps = features[16][:, -C:]
    assert maps.min() >= 0 and maps.sum(dim=1).max() <= 1 + 1e-5
    # ... and the backbone names them: the same maps as the last C channels of each map stride's feature
    assert sorted(output.class_attention) == sorted(backbone.map_strides)
    for stride, named in output.class_attention.items():
        assert named.shape == (1, C, 128 // stride, 192 // stride)
        assert torch.equal(named, features[stride][:, -C:])


def test_capture_processor_matches_stock_and_naive_reference(seg_model):
    backbone = seg_model.backbone
    unet = backbone.unet
    C = seg_model.num_classes
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 16, 16)
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    context = seg_model.context(seg_model.guidance_tokens("implicit", images, {}), 2)
    t = torch.ones(2, dtype=torch.long)

    # Naive reference: softmax(QK^T / sqrt(d)) of every captured layer, from the layer's own inputs.
    reference: dict[int, list[torch.Tensor]] = {}

    def naive(module, args, kwargs):
        hidden, encoder = args[0], kwargs["encoder_hidden_states"]
        q, k = module.to_q(hidden), module.to_k(encoder)
        B, N, _ = q.shape
        q = q.view(B, N, module.heads, -1).transpose(1, 2)
        k = k.view(B, k.shape[1], module.heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        reference.setdefault(N, []).append(probs.mean(1)[..., :C])

    layers = [unet.get_submodule(name.removesuffix(".processor")) for name in backbone.capture_layers()]
    # down blocks 1, 2: L layers each; up blocks 1, 2: L + 1 layers each
    assert len(layers) == 4 * unet.config.layers_per_block + 2
    handles = [layer.register_forward_pre_hook(naive, with_kwargs=True) for layer in layers]
    with torch.no_grad():
        captured = backbone(latents, context).features
        ours = unet(latents, t, encoder_hidden_states=context).sample
    for h in handles:
        h.remove()
    for stride, n in ((16, 8 * 8), (32, 4 * 4)):
        expected = torch.stack(reference[n][: len(reference[n]) // 2]).mean(0)  # first UNet call only
        side = int(n**0.5)
        got = captured[stride][:, -C:].reshape(2, C, n).transpose(1, 2)
        assert side * side == n
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

    processors = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        with torch.no_grad():
            stock = unet(latents, t, encoder_hidden_states=context).sample
    finally:
        unet.set_attn_processor(processors)
    assert (ours - stock).abs().max() <= 1e-5


def test_iedp_branches_reach_unet_and_prompt_matters(seg_model):
    model = seg_model.train()
    batch = seg_batch(model)
    torch.manual_seed(0)
    losses = model(batch)
    assert torch.allclose(losses["loss"], losses["loss_implicit"] + losses["loss_explicit"])
    unet_params = [p for p in model.unet.parameters() if p.requires_grad]
    for name in ("loss_implicit", "loss_explicit"):
        grads = torch.autograd.grad(losses[name], unet_params, retain_graph=True, allow_unused=True)
        assert sum(g.abs().sum() for g in grads if g is not None) > 0, name

    model.eval()  # no dropout: the only difference below is the prompt
    with torch.no_grad():
        a = model(batch)["loss_explicit"]
        b = model({**batch, "prompt": ["a photo of a bed, lamp and sofa"] * 2})["loss_explicit"]
        c = model({**batch, "prompt": ["a photo of a bed, lamp and sofa"] * 2})["loss_explicit"]
    assert a != b and b == c


def test_explicit_weight_scales_explicit_loss():
    torch.manual_seed(0)
    model = build_model(seg_config(explicit_weight=0.25)).eval()
    with torch.no_grad():
        losses = model(seg_batch(model))
    torch.testing.assert_close(losses["loss"], losses["loss_implicit"] + 0.25 * losses["loss_explicit"])


def test_iedp_inference_needs_no_labels_and_no_text_tower(seg_model):
    model = seg_model.eval()
    explicit, model.explicit = model.explicit, None
    try:
        image = torch.rand(1, 3, SIZE, 128) * 2 - 1
        with torch.no_grad():
            logits = model({"image": image}, mode="predict")
        assert logits.shape == (1, model.num_classes, SIZE, 128)
        with pytest.raises(RuntimeError, match="text tower"):
            model(seg_batch(model), mode="loss")
    finally:
        model.explicit = explicit


def test_frozen_parts_have_no_gradients_and_stay_in_eval(seg_model):
    model = seg_model.train()
    model.zero_grad()
    model(seg_batch(model))["loss"].backward()
    for part in model.frozen_modules():
        assert not part.training
        assert all(not p.requires_grad and p.grad is None for p in part.parameters())
    assert all(not m.training for part in model.frozen_modules() for m in part.modules())
    assert model.head.training and model.unet.training
    groups = parameter_groups(model, model.unet, lr=1.0, weight_decay=0.5, unet_lr_mult=0.1)
    in_groups = {id(p) for g in groups for p in g["params"]}
    frozen = {id(p) for part in model.frozen_modules() for p in part.parameters()}
    assert not in_groups & frozen
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    by_name = {g["name"]: g for g in groups}
    assert by_name["unet"]["lr"] == pytest.approx(0.1) and by_name["head"]["lr"] == 1.0
    assert by_name["unet_no_decay"]["weight_decay"] == 0 and by_name["head"]["weight_decay"] == 0.5
    assert all(p.ndim < 2 for p in by_name["head_no_decay"]["params"])
    model.zero_grad()


@pytest.mark.parametrize("task", ["seg", "depth"])
def test_checkpoint_round_trip_is_exact(task, tmp_path):
    torch.manual_seed(0)
    model_cfg = seg_config() if task == "seg" else depth_config("vpd")
    model = build_model(model_cfg).eval()
    config = Config(model=model_cfg)
    save_model(model, config, tmp_path / "ckpt")
    loaded, loaded_config = load_model(tmp_path / "ckpt")
    assert loaded_config == config and loaded.explicit is None
    batch = seg_batch(model) if task == "seg" else depth_batch()
    with torch.no_grad():
        assert torch.equal(model(batch, mode="predict"), loaded(batch, mode="predict"))
    assert all(not p.requires_grad for p in loaded.backbone.vae.parameters())


def test_compiled_unet_pass_reads_out_what_eager_reads_out():
    """model.compile_unet traces the UNet with its feature hooks and class-attention capture as one graph (under
    fullgraph a graph break is an error) and trains as eager does: same loss, same gradients. Dynamo's eager
    backend keeps the test fast; inductor changes the kernels, not what is traced."""
    torch.manual_seed(0)
    model = build_model(seg_config())
    batch = seg_batch(model)

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(1)  # the head's dropout draws the same masks in both runs
        loss = model(batch, mode="loss")["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = loss_and_grads()
    model.backbone.compile_unet(backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loss, grads = loss_and_grads()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it was traced, not run eagerly
    assert torch.equal(loss, eager_loss)
    assert grads.keys() == eager_grads.keys() and any(n.startswith("backbone.unet.") for n in grads)
    assert all(torch.equal(grads[n], eager_grads[n]) for n in grads)


def test_vae_slicing_encodes_a_batch_in_slices_to_the_same_latents(tmp_path):
    """model.vae_slicing (the default) runs the VAE encoder on slices of a batch (one image on a CPU, up to four
    512² images on an accelerator), which bounds its full-resolution activations, and gives the latents of the
    whole-batch encoder; a checkpoint can turn it off."""
    from iedp.models import backbone

    images = torch.zeros(3, 3, 512, 512)
    assert backbone.vae_slice_size(images) == 1 and backbone.vae_slice_size(images[..., :256, :256]) == 1
    on_gpu = images.to("meta")  # any accelerator
    assert backbone.vae_slice_size(on_gpu) == 4 and backbone.vae_slice_size(on_gpu[..., :256, :256]) == 16
    assert backbone.vae_slice_size(torch.zeros(1, 3, 1024, 1024, device="meta")) == 1  # never fewer than one
    torch.manual_seed(0)
    model = build_model(seg_config())
    images = seg_batch(model)["image"][:1].repeat(3, 1, 1, 1) + torch.linspace(-0.1, 0.1, 3).view(3, 1, 1, 1)
    encoder_batches = []
    model.backbone.vae.encoder.conv_in.register_forward_pre_hook(
        lambda _m, args: encoder_batches.append(len(args[0]))
    )
    sliced = model.backbone.encode(images)
    assert encoder_batches == [1, 1, 1]
    model.backbone.vae_slicing = False
    whole = model.backbone.encode(images)
    assert encoder_batches[3:] == [3]
    assert sliced.abs().max() > 0.1 and not torch.equal(sliced[0], sliced[1])
    torch.testing.assert_close(sliced, whole, rtol=1e-4, atol=1e-5)  # float rounding of another batch size
    save_model(model, Config(model=seg_config()), tmp_path / "ckpt")
    loaded, config = load_model(tmp_path / "ckpt", overrides=["model.vae_slicing=false"])
    assert not config.model.vae_slicing and not loaded.backbone.vae_slicing
    assert load_model(tmp_path / "ckpt")[0].backbone.vae_slicing


def test_a_checkpoint_loads_compiled_when_asked(tmp_path, monkeypatch):
    """--set model.compile_vae/compile_unet reach a trained checkpoint's model (how it runs, not what it is);
    what it is still cannot change."""
    from iedp.models.backbone import DiffusionBackbone

    torch.manual_seed(0)
    save_model(build_model(seg_config()), Config(model=seg_config()), tmp_path / "ckpt")
    compiled = []
    monkeypatch.setattr(DiffusionBackbone, "compile_unet", lambda self, **options: compiled.append("unet"))
    monkeypatch.setattr(DiffusionBackbone, "compile_encoder", lambda self, **options: compiled.append("vae"))
    _, config = load_model(tmp_path / "ckpt", overrides=["model.compile_unet=true", "eval.batch_size=3"])
    assert compiled == ["unet"] and config.model.compile_unet and config.eval.batch_size == 3
    load_model(tmp_path / "ckpt", overrides=["model.compile_vae=true"])
    assert compiled == ["unet", "vae"]
    with pytest.raises(InputError, match="model.neck_channels: a trained checkpoint's model cannot change"):
        load_model(tmp_path / "ckpt", overrides=["model.neck_channels=8"])
    # the text tower comes from where --set says the weights are now
    with pytest.raises(InputError, match="moved-away"):
        load_model(tmp_path / "ckpt", with_text=True, overrides=[f"model.weights={tmp_path / 'moved-away'}"])


def test_bad_checkpoint_and_weights_paths(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path)):
        load_model(tmp_path)
    with pytest.raises(InputError, match="nowhere"):
        build_model(dataclasses.replace(seg_config(), weights=str(tmp_path / "nowhere")))


def test_lr_schedules():
    poly = TrainConfig(schedule="poly", lr=1.0, max_steps=100, warmup_steps=10, warmup_ratio=0.0, min_lr=0.0)
    assert lr_factor(0, poly) == 0.0
    assert lr_factor(5, poly) == pytest.approx(0.5 * 0.95)
    assert lr_factor(10, poly) == pytest.approx(0.9)
    assert lr_factor(100, poly) == 0.0
    # rise_fall (VPD's depth schedule): tests/test_vpd_exactness.py
    linear = TrainConfig(
        schedule="rise_fall", lr=5e-4, min_lr=3e-5, max_steps=110, warmup_steps=10, rise_fall_power=1.0
    )
    assert lr_factor(9, linear) == pytest.approx(1.0)
    assert lr_factor(14, linear) * 5e-4 == pytest.approx((5e-4 + 3e-5) / 2)
    assert lr_factor(109, linear) * 5e-4 == pytest.approx(3e-5)
