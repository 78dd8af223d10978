"""Where ``model.method=vpd`` must behave as VPD's code (wl-zhao/VPD) does, down to its quirks (issue 11)."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from iedp.models.backbone import DiffusionBackbone
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
