"""Where ``model.method=vpd`` must behave as VPD's code (wl-zhao/VPD) does, down to its quirks (issue 11)."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from iedp.config import Config, DataConfig, ModelConfig, TrainConfig, load_config
from iedp.data.transforms import DepthTrainTransform, cut_depth
from iedp.engine.data import build_dataset
from iedp.engine.inference import segment
from iedp.engine.optim import build_optimizer, lr_factor
from iedp.engine.train import sync_batchnorm
from iedp.models.backbone import DiffusionBackbone
from iedp.models.build import build_model
from iedp.models.heads.depth_head import DepthHead
from iedp.weights import load_stable_diffusion, tiny_weights_dir


@pytest.fixture(scope="module")
def tiny_sd():
    return load_stable_diffusion(str(tiny_weights_dir()))


@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_unet_features_are_read_where_vpd_reads_them(tiny_sd, layers_per_block):
    """After the second layer of up_blocks 0-2 (resnet, then attention where the block has one: ldm output_blocks
    1, 4, 7) and at the last up block's output. With SD's two layers per block (three per up block) the second
    layer is not the upsampler's input."""
    unet, vae = tiny_sd
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**unet.config, "layers_per_block": layers_per_block}).eval()
    expected_modules = [
        unet.up_blocks[0].resnets[1],  # UpBlock2D: no attention
        unet.up_blocks[1].attentions[1],
        unet.up_blocks[2].attentions[1],
        unet.up_blocks[3],
    ]
    taken = []
    handles = [
        m.register_forward_hook(lambda _m, _a, out: taken.append(out[0] if isinstance(out, tuple) else out))
        for m in expected_modules
    ]
    backbone = DiffusionBackbone(unet, vae)
    latents = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 3, unet.config.cross_attention_dim)
    with torch.no_grad():
        features = backbone(latents, context).features
    for handle in handles:
        handle.remove()
    assert list(features) == [8, 16, 32, 64]  # fine to coarse
    for stride, reference in zip([64, 32, 16, 8], taken, strict=True):
        torch.testing.assert_close(features[stride], reference, rtol=0, atol=0)
        assert features[stride].shape[1] == backbone.out_channels[stride]


def _seg_model():
    torch.manual_seed(0)
    config = ModelConfig(task="seg", method="vpd", classes="synthetic", neck_channels=16, head_channels=16)
    return build_model(config, with_text=False)


def _depth_model():
    torch.manual_seed(0)
    config = ModelConfig(
        task="depth",
        method="vpd",
        classes="synthetic_scenes",
        depth_fuse_channels=32,
        depth_head_channels=16,
    )
    return build_model(config, with_text=False)


@pytest.fixture(scope="module")
def seg_model():
    model = _seg_model()
    # a new trainable non-UNet module (as the implicit query module): head lr, the task's usual decay rules
    model.extra_module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    return model


@pytest.fixture(scope="module")
def depth_model():
    model = _depth_model()
    model.extra_module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    return model


def _lr_and_decay(model, task):
    optimizer, _ = build_optimizer(
        model, model.unet, TrainConfig(lr=1.0, weight_decay=0.5, unet_lr_mult=0.1), task
    )
    settings = {
        id(p): (g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(settings) == len(trainable) == sum(len(g["params"]) for g in optimizer.param_groups)
    return settings


def test_segmentation_groups_are_mmcv_custom_keys(seg_model):
    """VPD: custom_keys {unet: lr×0.1, norm: decay×0}, longest key first, ties alphabetical ("norm" < "unet"),
    matched against ldm names, where only the transformer blocks' norms are called norm."""
    model = seg_model
    got = _lr_and_decay(model, "seg")
    unet = model.unet
    transformer = unet.up_blocks[1].attentions[0]
    resnet = unet.up_blocks[1].resnets[0]
    batchnorm = next(m for m in model.head.modules() if isinstance(m, nn.BatchNorm2d))
    # UNet transformer norms (ldm ...transformer_blocks.0.norm1, SpatialTransformer.norm): "norm" wins
    for p in (transformer.norm.weight, transformer.transformer_blocks[0].norm1.bias):
        assert got[id(p)] == (1.0, 0.0)
    # the rest of the UNet, ResNet GroupNorms (ldm in_layers.0) and biases included: "unet"
    for p in (resnet.norm1.weight, resnet.conv1.bias, resnet.conv1.weight, transformer.proj_in.weight):
        assert got[id(p)] == (pytest.approx(0.1), 0.5)
    # heads: no key (mmcv's ConvModule names its BatchNorm "bn"), so full lr and decay on everything
    for p in (batchnorm.weight, batchnorm.bias, model.adapter.gamma, model.neck.parameters().__next__()):
        assert got[id(p)] == (1.0, 0.5)
    # a new module: head lr; its norm layers get no decay ("norm"), its linear layers do
    linear, norm = model.extra_module
    assert got[id(linear.weight)] == got[id(linear.bias)] == (1.0, 0.5)
    assert got[id(norm.weight)] == got[id(norm.bias)] == (1.0, 0.0)


def test_depth_groups_are_ldm_optimizer_constructor(depth_model):
    """VPD depth: UNet lr×0.01 (here unet_lr_mult), no decay on 1-D tensors and biases, anywhere."""
    model = depth_model
    got = _lr_and_decay(model, "depth")
    unet = model.unet
    transformer = unet.up_blocks[1].attentions[0]
    assert got[id(transformer.norm.weight)] == got[id(unet.conv_in.bias)] == (pytest.approx(0.1), 0.0)
    assert got[id(unet.conv_in.weight)] == got[id(transformer.proj_in.weight)] == (pytest.approx(0.1), 0.5)
    linear, norm = model.extra_module
    assert got[id(linear.weight)] == (1.0, 0.5)
    assert got[id(linear.bias)] == got[id(norm.weight)] == got[id(model.adapter.gamma)] == (1.0, 0.0)
    conv = next(m for m in model.head.modules() if isinstance(m, nn.Conv2d))
    assert got[id(conv.weight)] == (1.0, 0.5) and got[id(conv.bias)] == (1.0, 0.0)


def test_groups_are_logged(seg_model, caplog):
    with caplog.at_level(logging.INFO, logger="iedp.engine.optim"):
        build_optimizer(seg_model, seg_model.unet, TrainConfig(lr=1.0, weight_decay=0.5), "seg")
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "unet_attention_norm" in line and "lr 1" in line and "weight decay 0" in line for line in lines
    )


def test_syncbn_only_for_segmentation():
    seg, depth = _seg_model(), _depth_model()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync_batchnorm(seg, "seg", 2, "cuda").modules())
    depth = sync_batchnorm(depth, "depth", 2, "cuda")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in depth.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in depth.head.modules())


def test_depth_schedule_is_vpds_power_rise_and_fall():
    """VPD depth/train.py with max_lr 5e-4, min_lr 3e-5 and a 10-step half: the s-th batch (from 1) gets
    min + (max - min)·(s/10)^0.9 while s < 10, then max(min, max - (max - min)·(s/10 - 1)^0.9)."""
    config = TrainConfig(schedule="rise_fall", lr=5e-4, min_lr=3e-5, warmup_steps=10, max_steps=25)
    expected = {  # step (0-based) -> lr, by hand: 0.1^0.9 = 0.125892541, 0.5^0.9 = 0.535886731
        0: 3e-5 + 4.7e-4 * 0.125892541,
        4: 3e-5 + 4.7e-4 * 0.535886731,
        9: 5e-4,
        14: 5e-4 - 4.7e-4 * 0.535886731,
        19: 3e-5,
        24: 3e-5,  # held at min_lr after two halves
    }
    for step, lr in expected.items():
        assert lr_factor(step, config) * 5e-4 == pytest.approx(lr, rel=1e-7), step


def test_multi_scale_flip_averages_softmax_of_each_view():
    """mmseg aug_test: softmax of every (scale, flip) view, then the mean; not the softmax of flip-averaged logits."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 5, padding=2)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        scores = segment(model, image, (64, 64), window=64, stride=64, multiple=64, scales=(1.0,), flip=True)
        views = [model(image).softmax(1), model(image.flip(-1)).flip(-1).softmax(1)]
        torch.testing.assert_close(scores, (views[0] + views[1]) / 2)
        averaged_logits = ((model(image) + model(image.flip(-1)).flip(-1)) / 2).softmax(1)
        assert (scores - averaged_logits).abs().max() > 1e-3
        # two scales and flips: four views, each softmaxed at the output size
        scores = segment(
            model, image, (64, 64), window=128, stride=128, multiple=64, scales=(1.0, 2.0), flip=True
        )
        big = F.interpolate(image, size=(128, 128), mode="bilinear", align_corners=False)
        down = lambda x: F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
        views += [down(model(big)).softmax(1), down(model(big.flip(-1))).flip(-1).softmax(1)]
        torch.testing.assert_close(scores, sum(views) / 4)


def test_depth_head_initialised_as_vpd():
    """VPDDepthEncoder's convs: trunc_normal(std 0.02); Decoder convs/deconvs and last_layer_depth: normal(std 1e-3);
    biases 0."""
    torch.manual_seed(0)
    head = DepthHead([32, 32, 64, 64], fuse_channels=64, deconv_channels=32, head_channels=32)
    fusion = [
        m
        for part in (head.reduce0, head.reduce1, head.fuse)
        for m in part.modules()
        if isinstance(m, nn.Conv2d)
    ]
    later = [
        m
        for part in (head.decoder, head.predict)
        for m in part.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    assert len(fusion) == 4 and len(later) == 3 + 1 + 2
    for conv in fusion:
        assert conv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    for conv in later:
        assert conv.weight.std().item() == pytest.approx(0.001, rel=0.15)
        assert conv.bias is None or torch.equal(conv.bias, torch.zeros_like(conv.bias))
    # the prediction starts near sigmoid(0) × max depth everywhere
    features = [torch.randn(1, c, s, s) for c, s in zip(head.in_channels, (8, 4, 2, 1), strict=True)]
    with torch.no_grad():
        depth = head.eval()(features)
    assert depth.shape == (1, 1, 64, 64)
    torch.testing.assert_close(depth, torch.full_like(depth, 5.0), atol=0.05, rtol=0)


def test_cut_depth_writes_millimetres_modulo_256_into_a_strip():
    """VPD (GLPDepth's augment_training_data) on a 480x640 frame: strip at int(alpha·W), int(max((W - alpha·W)·beta·0.75,
    1)) wide, with the depth in millimetres cast into the uint8 image (mod 256), all three channels."""
    image = np.full((480, 640, 3), 100.0, dtype=np.float32)
    depth = np.tile(
        np.array([2.0, 0.3, 0.256, 9.999], dtype=np.float32), (480, 160)
    )  # 2000, 300, 256, 9999 mm
    alpha, beta = np.random.default_rng(7).random(2)
    left = int(alpha * 640)
    width = int(max((640 - alpha * 640) * beta * 0.75, 1))
    out = cut_depth(image, depth, np.random.default_rng(7))
    expected = image.copy()
    wrapped = np.array([2000 % 256, 300 % 256, 0, 9999 % 256], dtype=np.float32)  # 208, 44, 0, 15
    expected[:, left : left + width] = np.tile(wrapped, 160)[left : left + width][None, :, None]
    np.testing.assert_array_equal(out, expected)
    assert width > 1 and left > 0 and (out != image).any()
    # numpy's own uint8 cast, as VPD's assignment does it
    vpd_image = image.astype(np.uint8)
    with np.errstate(invalid="ignore"):
        vpd_image[:, left : left + width, 0] = (depth[:, left : left + width] * 1000).round()
    np.testing.assert_array_equal(out[..., 0], vpd_image[..., 0])


def test_cutdepth_on_one_sample_in_four_from_the_recipes(tmp_path):
    plain = {
        "brightness_limit": 0.0,
        "contrast_limit": 0.0,
        "gamma_range": (1.0, 1.0),
        "hue_shift_limit": 0.0,
        "saturation_shift_limit": 0.0,
        "value_shift_limit": 0.0,
        "crop_size": (48, 64),
        "pad_multiple": 1,
    }
    image = np.full((48, 64, 3), 128.0, dtype=np.float32)
    depth = np.full((48, 64), 0.256, dtype=np.float32)  # 256 mm -> 0 in the strip
    cut = DepthTrainTransform(cutdepth_prob=0.25, **plain)
    hits = [bool((cut(image, depth, np.random.default_rng(i))[0] < -0.9).any()) for i in range(400)]
    assert hits == [np.random.default_rng(i).random() < 0.25 for i in range(400)]  # the sample's first draw
    assert 0.15 < np.mean(hits) < 0.35
    # the same sample and seed always decide the same way
    assert torch.equal(
        cut(image, depth, np.random.default_rng(3))[0], cut(image, depth, np.random.default_rng(3))[0]
    )
    # switched off, the augmentation stream is today's
    off, default = DepthTrainTransform(**plain), DepthTrainTransform(cutdepth_prob=0.0, **plain)
    assert torch.equal(
        off(image, depth, np.random.default_rng(1))[0], default(image, depth, np.random.default_rng(1))[0]
    )
    for name in ("vpd", "iedp", "implicit", "explicit"):
        assert load_config(f"nyu_{name}").data.cutdepth
    synthetic = Config(
        model=ModelConfig(task="depth", classes="synthetic_scenes"),
        data=DataConfig(dataset="synthetic", cutdepth=True, num_train=4),
    )
    assert build_dataset(synthetic, "train").depth_transform.cutdepth_prob == 0.25
