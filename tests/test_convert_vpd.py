"""``iedp convert-vpd``: VPD's checkpoints, rebuilt at tiny widths with VPD's exact key names, then converted.

The stand-ins below follow VPD's module structure (wl-zhao/VPD ``segmentation/models/vpd_seg.py`` with mmseg's FPN
and FPNHead, ``depth/models_depth/model.py``), so their ``state_dict`` names are VPD's and their ``forward`` is VPD's
computation; the diffusion parts are the tiny preset's UNet and VAE encoder written in the original (LDM) layout.
"""

from __future__ import annotations

import argparse
import hashlib
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

import iedp.convert_vpd as convert_module
from iedp.classes import load_class_names
from iedp.cli import main
from iedp.convert_vpd import convert_vpd, read_vpd_state
from iedp.errors import InputError
from iedp.model_files import load_model
from iedp.weights import make_tiny

# -- diffusers -> LDM key layout (the inverse of diffusers' single-file conversion, written out independently) ---

_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_LDM_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _ldm_unet_key(unet: UNet2DConditionModel, key: str) -> str:
    """openaimodel.UNetModel numbers its blocks flat: input_blocks / middle_block / output_blocks."""
    per_level = unet.config.layers_per_block + 1
    match = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key
    )
    if match:
        side, level, kind, layer, rest = match.groups()
        level, layer = int(level), int(layer)
        if kind == "resnets":
            name, tail = rest.split(".", 1)
            rest = f"{_LDM_RESNET[name]}.{tail}"
        if side == "down":
            if kind == "downsamplers":
                return f"input_blocks.{(level + 1) * per_level}.0.op.{rest.removeprefix('conv.')}"
            return f"input_blocks.{1 + level * per_level + layer}.{0 if kind == 'resnets' else 1}.{rest}"
        if kind == "upsamplers":
            position = 2 if getattr(unet.up_blocks[level], "attentions", None) else 1
            return f"output_blocks.{level * per_level + per_level - 1}.{position}.{rest}"
        return f"output_blocks.{level * per_level + layer}.{0 if kind == 'resnets' else 1}.{rest}"
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if match:
        kind, index, rest = match.groups()
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        name, tail = rest.split(".", 1)
        return f"middle_block.{2 * int(index)}.{_LDM_RESNET[name]}.{tail}"
    module, tail = key.rsplit(".", 1)
    return f"{_LDM_UNET_TOP[module]}.{tail}"


def ldm_unet_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    return {_ldm_unet_key(unet, key): value.clone() for key, value in unet.state_dict().items()}


def ldm_vae_encoder_state(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """ldm AutoencoderKL without its decoder (VPD deletes it): encoder, quant_conv, post_quant_conv."""
    renames = (
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.",
            r"encoder.down.\1.block.\2.nin_shortcut.",
        ),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"encoder\.mid_block\.resnets\.(\d+)\.", lambda m: f"encoder.mid.block_{int(m.group(1)) + 1}."),
        (r"encoder\.mid_block\.attentions\.0\.group_norm\.", "encoder.mid.attn_1.norm."),
        (r"encoder\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"encoder.mid.attn_1.\1."),
        (r"encoder\.mid_block\.attentions\.0\.to_out\.0\.", "encoder.mid.attn_1.proj_out."),
        (r"encoder\.conv_norm_out\.", "encoder.norm_out."),
    )
    state = {}
    for key, value in vae.state_dict().items():
        if key.startswith("decoder."):
            continue
        for pattern, replacement in renames:
            key, count = re.subn(pattern, replacement, key)
            if count:
                break
        if ".attn_1." in key and "norm" not in key and value.ndim == 2:
            value = value[:, :, None, None]  # the LDM VAE's attention projections are 1x1 convs
        state[key] = value.clone()
    return state


# -- VPD's modules at tiny widths ------------------------------------------------------------------------------


class ConvModule(nn.Module):
    """mmcv's ConvModule as mmseg builds it: ``conv`` (no bias under a norm), optional ``bn`` + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = self.conv(x)
        return F.relu(self.bn(x)) if hasattr(self, "bn") else x


class MMSegFPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3) for _ in in_channels)

    def forward(self, features):
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:])
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=True)]


class MMSegFPNHead(nn.Module):
    def __init__(self, in_channels: int, channels: int, num_classes: int, levels: int = 4) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for level in range(levels):
            layers = []
            for k in range(max(1, level)):
                layers.append(ConvModule(in_channels if k == 0 else channels, channels, 3, norm=True))
                if level > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features):
        out = self.scale_heads[0](features[0])
        for head, x in zip(self.scale_heads[1:], features[1:], strict=True):
            out = out + F.interpolate(head(x), size=out.shape[2:], mode="bilinear", align_corners=False)
        return self.conv_seg(out)


class TextAdapter(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))


class VPDSegParts(nn.Module):
    """VPDSeg's own modules and tensors (the UNet, VAE encoder and schedule buffers are added as LDM keys)."""

    def __init__(self, width: int, num_classes: int, pyramid: list[int], neck: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("class_embeddings", torch.randn(num_classes, width))
        self.gamma = nn.Parameter(torch.rand(width))
        self.text_adapter = TextAdapter(width)
        self.neck = MMSegFPN(pyramid, neck)
        self.decode_head = MMSegFPNHead(neck, channels, num_classes)


class VPDDepthEncoderParts(nn.Module):
    def __init__(self, width: int, num_scenes: int, prior: list[int], out_dim: int) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(
            nn.Conv2d(prior[0], prior[0], 3, stride=2, padding=1),
            nn.GroupNorm(16, prior[0]),
            nn.ReLU(),
            nn.Conv2d(prior[0], prior[0], 3, stride=2, padding=1),
        )
        self.layer2 = nn.Sequential(nn.Conv2d(prior[1], prior[1], 3, stride=2, padding=1))
        self.out_layer = nn.Sequential(
            nn.Conv2d(sum(prior), out_dim, 1), nn.GroupNorm(16, out_dim), nn.ReLU()
        )
        self.text_adapter = TextAdapter(width)
        self.register_buffer("class_embeddings", torch.randn(num_scenes, width))
        self.gamma = nn.Parameter(torch.rand(width))


class VPDDepthDecoder(nn.Module):
    def __init__(self, in_channels: int, filters: int, out_channels: int) -> None:
        super().__init__()
        layers = []
        for i in range(3):
            layers += [
                nn.ConvTranspose2d(in_channels if i == 0 else filters, filters, 2, stride=2, bias=False),
                nn.BatchNorm2d(filters),
                nn.ReLU(),
            ]
        self.deconv_layers = nn.Sequential(*layers)
        # mmcv's build_conv_layer keeps Conv2d's default bias, in front of a BN.
        self.conv_layers = nn.Sequential(
            nn.Conv2d(filters, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()
        )


class VPDDepthParts(nn.Module):
    def __init__(self, width, num_scenes, prior, fuse, filters, channels, max_depth=10.0) -> None:
        super().__init__()
        self.max_depth = max_depth
        self.encoder = VPDDepthEncoderParts(width, num_scenes, prior, fuse)
        self.decoder = VPDDepthDecoder(fuse, filters, channels)
        self.last_layer_depth = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 1, 3, padding=1)
        )

    def forward(self, features):
        """VPD's depth head on the UNet pyramid, fine to coarse."""
        f0, f1, f2, f3 = features
        coarse = torch.cat([f2, F.interpolate(f3, scale_factor=2)], dim=1)
        x = torch.cat([self.encoder.layer1(f0), self.encoder.layer2(f1), coarse], dim=1)
        x = self.decoder.conv_layers(self.decoder.deconv_layers(self.encoder.out_layer(x)))
        for _ in range(2):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.last_layer_depth(x)) * self.max_depth


# -- fixtures ---------------------------------------------------------------------------------------------------


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every tensor random and distinct (BN statistics included), so a wrong pairing cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(noise + 0.5 if "running_var" in name else (noise - 0.5) * 0.2 + tensor)
    return module.eval()


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    """A tiny SD + CLIP folder with SD v1.5's two layers per block (so the LDM block numbering is SD's), and a
    fine-tuned-looking copy of its UNet and VAE."""
    folder = make_tiny(tmp_path_factory.mktemp("weights"), layers_per_block=2)
    unet = _randomise(UNet2DConditionModel.from_pretrained(folder / "unet"), seed=1)
    vae = _randomise(AutoencoderKL.from_pretrained(folder / "vae"), seed=2)
    return folder, unet, vae


def _pyramid_widths(unet: UNet2DConditionModel) -> list[int]:
    """UNet feature widths at strides 8, 16, 32, 64 (up blocks 3..0: the down blocks' widths in order)."""
    return list(unet.config.block_out_channels)


def vpd_seg_state(unet, vae) -> tuple[dict[str, torch.Tensor], VPDSegParts]:
    width = unet.config.cross_attention_dim
    c = len(load_class_names("ade20k"))
    w8, w16, w32, w64 = _pyramid_widths(unet)
    parts = _randomise(VPDSegParts(width, c, [w8, w16 + c, w32 + c, w64], neck=16, channels=8), seed=3)
    state = dict(parts.state_dict())
    state |= {f"unet.unet.diffusion_model.{k}": v for k, v in ldm_unet_state(unet).items()}
    state |= {f"encoder_vq.{k}": v for k, v in ldm_vae_encoder_state(vae).items()}
    state |= {
        f"sd_model.{name}": torch.rand(1000) for name in ("betas", "alphas_cumprod", "posterior_variance")
    }
    return state, parts


def vpd_depth_state(unet, vae) -> tuple[dict[str, torch.Tensor], VPDDepthParts]:
    width = unet.config.cross_attention_dim
    w8, w16, w32, w64 = _pyramid_widths(unet)
    scenes = len(load_class_names("nyu_scenes"))
    parts = _randomise(VPDDepthParts(width, scenes, [w8, w16, w32 + w64], fuse=48, filters=8, channels=16), 4)
    state = dict(parts.state_dict())
    unet_state = ldm_unet_state(unet)
    # VPD's depth model deletes the UNet's output layer ("out.*").
    state |= {
        f"encoder.unet.unet.diffusion_model.{k}": v for k, v in unet_state.items() if not k.startswith("out.")
    }
    state |= {f"encoder.encoder_vq.{k}": v for k, v in ldm_vae_encoder_state(vae).items()}
    return state, parts


def _fingerprints(tensors) -> set[str]:
    return {hashlib.sha1(t.detach().float().contiguous().numpy().tobytes()).hexdigest() for t in tensors}


def _assert_all_used(state: dict[str, torch.Tensor], model: nn.Module, skip: set[str]) -> None:
    """Every tensor of VPD's file reappears, bit for bit, among the converted model's tensors."""
    ours = _fingerprints(model.state_dict().values())
    unused = [k for k, v in state.items() if k not in skip and _fingerprints([v]).isdisjoint(ours)]
    assert not unused, f"tensors of VPD's file not in the converted model: {unused[:5]}"


# -- tests ------------------------------------------------------------------------------------------------------


def test_segmentation_checkpoint_converts_through_the_cli(tiny_parts, tmp_path):
    folder, unet, vae = tiny_parts
    state, parts = vpd_seg_state(unet, vae)
    path = tmp_path / "vpd_seg.pth"
    meta = {"CLASSES": ("wall", "building"), "config": "model = dict(type='VPDSeg')", "seed": 0}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)

    out = tmp_path / "converted"
    assert main(["convert-vpd", str(path), "--task", "seg", "--out", str(out), "--weights", str(folder)]) == 0
    model, config = load_model(out)
    assert (config.model.method, config.model.task, config.model.classes) == ("vpd", "seg", "ade20k")
    assert (config.model.neck_channels, config.model.head_channels) == (16, 8)
    assert config.model.weights == str(
        folder.resolve()
    )  # where the explicit oracle would find CLIP's text tower
    schedule = {k for k in state if k.startswith("sd_model.")}
    _assert_all_used(state, model, skip=schedule)
    assert torch.equal(model.class_tokens, state["class_embeddings"])

    # The UNet equals diffusers' own single-file conversion of the same LDM weights, and the model it came from.
    ldm = {f"model.diffusion_model.{k}": v for k, v in ldm_unet_state(unet).items()}
    reference = UNet2DConditionModel.from_single_file(ldm, config=str(folder), subfolder="unet").eval()
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, unet.config.cross_attention_dim)
    with torch.no_grad():
        converted = model.unet(latents, 1, encoder_hidden_states=context).sample
        torch.testing.assert_close(converted, reference(latents, 1, encoder_hidden_states=context).sample)
        torch.testing.assert_close(converted, unet(latents, 1, encoder_hidden_states=context).sample)
        images = torch.rand(1, 3, 64, 64) * 2 - 1
        torch.testing.assert_close(model.backbone.encode(images), vae.encode(images).latent_dist.mean)

        # Adapter, neck and head compute what VPD's modules compute.
        tokens = torch.randn(3, unet.config.cross_attention_dim)
        adapted = tokens + parts.gamma * parts.text_adapter.fc(tokens)
        torch.testing.assert_close(model.adapter(tokens), adapted)
        widths = model.neck.in_channels
        features = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(widths)]
        torch.testing.assert_close(model.head(model.neck(features)), parts.decode_head(parts.neck(features)))

        logits = model.predict({"image": images})
    assert logits.shape == (1, 150, 64, 64) and torch.isfinite(logits).all()


def test_depth_checkpoint_converts_with_the_frozen_parts_from_weights(tiny_parts, tmp_path):
    folder, unet, vae = tiny_parts
    state, parts = vpd_depth_state(unet, vae)
    path = tmp_path / "vpd_depth.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)  # VPD depth's {"model": ...}

    model, config = load_model(convert_vpd(path, "depth", tmp_path / "converted", weights=str(folder)))
    assert (config.model.method, config.model.classes) == ("vpd", "nyu_scenes")
    assert (config.model.depth_fuse_channels, config.model.depth_head_channels) == (48, 16)
    folded = {"decoder.conv_layers.0.bias", "decoder.conv_layers.1.running_mean"}
    _assert_all_used(state, model, skip=folded)
    assert torch.equal(model.class_tokens, state["encoder.class_embeddings"])
    base = UNet2DConditionModel.from_pretrained(folder / "unet")  # VPD deleted the output layer: the base's
    assert torch.equal(model.unet.conv_out.weight, base.conv_out.weight)

    with torch.no_grad():
        w8, w16, w32, w64 = _pyramid_widths(unet)
        features = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate((w8, w16, w32, w64))]
        # VPD's conv bias before the BN is folded into the BN's running mean: the same depth.
        torch.testing.assert_close(model.head(features), parts(features))
        depth = model.predict({"image": torch.rand(2, 3, 64, 64) * 2 - 1, "scene_id": torch.tensor([3, -1])})
    assert depth.shape == (2, 1, 64, 64) and torch.isfinite(depth).all()


def test_unknown_and_missing_keys_are_listed(tiny_parts, tmp_path, monkeypatch):
    folder, unet, vae = tiny_parts
    state, _ = vpd_seg_state(unet, vae)
    path = tmp_path / "vpd.pth"

    torch.save({"state_dict": state | {"decode_head.conv_extra.weight": torch.zeros(1)}}, path)
    with pytest.raises(InputError, match=r"1 unknown keys: decode_head\.conv_extra\.weight"):
        convert_vpd(path, "seg", tmp_path / "out", weights=str(folder))

    dropped = ("neck.fpn_convs.1.conv.bias", "unet.unet.diffusion_model.input_blocks.1.0.in_layers.2.weight")
    torch.save({"state_dict": {k: v for k, v in state.items() if k not in dropped}}, path)
    with pytest.raises(InputError, match="2 missing keys") as error:
        convert_vpd(path, "seg", tmp_path / "out", weights=str(folder))
    assert "neck.fpn_convs.1.conv.bias" in str(error.value)
    assert "backbone.unet.down_blocks.0.resnets.0.conv1.weight" in str(error.value)

    # A segmentation file read as depth: nothing lines up, and the message says how much.
    torch.save({"state_dict": state}, path)

    def no_weights(*args, **kwargs):
        raise AssertionError("Stable Diffusion loaded for a file that is refused anyway")

    monkeypatch.setattr(
        convert_module, "load_stable_diffusion", no_weights
    )  # refused before the weights load
    with pytest.raises(
        InputError, match=r"missing encoder.class_embeddings.*looks like VPD's seg checkpoint"
    ):
        convert_vpd(path, "depth", tmp_path / "out", weights=str(folder))
    assert not (tmp_path / "out").exists()


def test_files_that_need_code_to_load_are_refused(tmp_path, capsys):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"gamma": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(InputError, match=r"refusing to load.*argparse\.Namespace") as error:
        read_vpd_state(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert (
        main(["convert-vpd", str(path), "--task", "seg", "--out", str(tmp_path / "o"), "--weights", "tiny"])
        == 2
    )
    assert capsys.readouterr().err.count("\n") == 1

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        read_vpd_state(tmp_path / "junk.pth")
    with pytest.raises(InputError, match="no such file"):
        read_vpd_state(tmp_path / "absent.pth")


def test_state_dict_wrappers_are_unwrapped(tmp_path):
    tensors = {"gamma": torch.ones(2), "neck.lateral_convs.0.conv.bias": torch.zeros(2)}
    for name, saved in {
        "bare": tensors,
        "mmseg": {"meta": {"iter": 80000}, "state_dict": tensors},
        "ddp": {"model": {f"module.{k}": v for k, v in tensors.items()}, "optimizer": {}},
        "encoder_decoder": {
            "state_dict": {f"backbone.{k}" if k == "gamma" else k: v for k, v in tensors.items()}
        },
    }.items():
        torch.save(saved, tmp_path / f"{name}.pth")
        assert read_vpd_state(tmp_path / f"{name}.pth").keys() == tensors.keys(), name
