"""The diffusion backbone: frozen SD VAE encoder + trainable UNet, run once at t=1, read out as a feature pyramid.

Features come from forward hooks where VPD reads the decoder (after ldm ``output_blocks`` 1, 4, 7 and at the
final output): the second layer of each up block (its attention where the block has one, else its resnet) and the
output of the last up block, keyed by their stride in the image; class cross-attention maps come from
:class:`~iedp.models.attention.ClassAttentionProcessor` installed on the chosen layers by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from iedp.models.attention import AttentionStore, ClassAttentionProcessor

# Under model.vae_slicing the VAE encoder takes a batch in slices, which bounds its full-resolution activations
# (most of an inference's peak): one image at a time on a CPU, where slicing costs no time, and at most this many
# pixels (four 512² images) on an accelerator, where one image at a time leaves the chip idle (H200, bf16, batch 16
# at 512²: the encoder took 2.0× the whole batch's time). BENCHMARKS.md, "VAE slicing".
VAE_SLICE_PIXELS = 4 * 512 * 512


def vae_slice_size(images: torch.Tensor) -> int:
    """How many of ``images`` (B, 3, H, W) one VAE encoder call takes under ``model.vae_slicing``."""
    if images.device.type == "cpu":
        return 1
    return max(1, VAE_SLICE_PIXELS // (images.shape[-2] * images.shape[-1]))


def in_slices(
    encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int | None
) -> torch.Tensor:
    """``encode`` called on ``size`` images at a time (None: the whole batch at once), the outputs concatenated."""
    return torch.cat([encode(s) for s in images.split(size)]) if size else encode(images)


@dataclass
class BackboneOutput:
    """What the backbone reads out of one UNet pass, by stride in the image.

    ``features[stride]``: (B, C_s, H/stride, W/stride), strides 8, 16, 32, 64 for SD's four levels; at the map
    strides the class attention maps are already concatenated at the end (C_s = UNet channels + C), as the neck
    takes them. ``class_attention[stride]``: the same maps on their own, (B, C, H/stride, W/stride), at each map
    stride (empty when the backbone captures none).
    """

    features: dict[int, torch.Tensor]
    class_attention: dict[int, torch.Tensor] = field(default_factory=dict)


class DiffusionBackbone(nn.Module):
    """SD VAE + UNet as a multi-scale feature extractor.

    Args:
        unet: the (trainable) denoising UNet.
        vae: the (frozen) autoencoder; only its encoder runs.
        latent_scale: factor applied to the VAE posterior mean (VPD uses 1.0, SD's own is 0.18215).
        num_class_tokens: C, the leading context tokens whose attention maps are captured; 0 captures nothing.
        map_strides: image strides at which attention maps are captured and concatenated onto the features.
        timestep: the single diffusion timestep the UNet runs at.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        latent_scale: float = 1.0,
        num_class_tokens: int = 0,
        map_strides: tuple[int, ...] = (16, 32),
        timestep: int = 1,
    ) -> None:
        super().__init__()
        self.unet = unet
        # The noise-prediction output is never used: its layers would be parameters without gradients.
        unet.conv_norm_out.requires_grad_(False)
        unet.conv_out.requires_grad_(False)
        self.vae = vae.requires_grad_(False).eval()
        self.vae_slicing = True  # model.vae_slicing: see VAE_SLICE_PIXELS
        self.latent_scale = latent_scale
        # The VAE encoder's input memory format: None picks channels_last on a CPU, where oneDNN runs the
        # encoder's convolutions faster on it (BENCHMARKS.md, "Our defaults vs VPD's configuration"), and the
        # contiguous format elsewhere (channels_last was slower on an H100); True/False force one.
        self.encoder_channels_last: bool | None = None
        self._encode = self._posterior_mean
        self._run_unet = self._unet_pass
        self.timestep = timestep
        self.vae_stride = 2 ** (len(vae.config.block_out_channels) - 1)
        self.input_multiple = self.vae_stride * 2 ** (len(unet.config.block_out_channels) - 1)

        # Up block i works at latent stride 2**(n-1-i) with the i-th reversed block width.
        widths = list(reversed(unet.config.block_out_channels))
        n = len(unet.up_blocks)
        self.feature_strides = {i: self.vae_stride * 2 ** (n - 1 - i) for i in range(n)}
        self._features: dict[int, torch.Tensor] = {}
        self._hooks = [self._hook_up_block(i, block) for i, block in enumerate(unet.up_blocks)]

        self.store = AttentionStore(num_class_tokens)
        self.map_strides = tuple(map_strides) if num_class_tokens else ()
        self.previous_processors = unet.attn_processors
        if self.map_strides:
            unet.set_attn_processor(
                {
                    name: ClassAttentionProcessor(self.store) if name in self.capture_layers() else proc
                    for name, proc in self.previous_processors.items()
                }
            )
        self.out_channels = {
            stride: widths[i] + (num_class_tokens if stride in self.map_strides else 0)
            for i, stride in self.feature_strides.items()
        }

    def capture_layers(self) -> list[str]:
        """Names of the cross-attention processors in down and up blocks at ``map_strides``."""
        n = len(self.unet.down_blocks)
        wanted = {s // self.vae_stride for s in self.map_strides}  # latent strides
        prefixes = [f"down_blocks.{i}." for i in range(n) if 2**i in wanted]
        prefixes += [f"up_blocks.{i}." for i in range(n) if 2 ** (n - 1 - i) in wanted]
        return [
            name
            for name in self.unet.attn_processors
            if name.endswith("attn2.processor") and name.startswith(tuple(prefixes))
        ]

    def remove_capture(self) -> None:
        """Restore the processors found at construction and drop the feature hooks."""
        self.unet.set_attn_processor(self.previous_processors)
        for hook in self._hooks:
            hook.remove()

    @staticmethod
    def tap_module(block: nn.Module, is_last: bool) -> nn.Module:
        """The module whose output is a level's feature: the last up block itself; otherwise the block's second
        layer (VPD's ldm ``output_blocks`` 1, 4, 7: resnet then attention, so the attention where the block has
        one), or its last layer when it has fewer (``layers_per_block=1``)."""
        if is_last:
            return block
        layers = block.attentions if getattr(block, "attentions", None) else block.resnets
        return layers[min(1, len(layers) - 1)]

    def _hook_up_block(self, index: int, block: nn.Module) -> torch.utils.hooks.RemovableHandle:
        stride = self.feature_strides[index]

        def keep_output(_module, _args, output):
            if not self.store.recording:  # a gradient-checkpointing recomputation in the backward pass
                return
            if isinstance(output, tuple):  # Transformer2DModel called with return_dict=False
                output = output[0]
            self._features[stride] = getattr(output, "sample", output)

        module = self.tap_module(block, is_last=index == len(self.unet.up_blocks) - 1)
        return module.register_forward_hook(keep_output)

    def train(self, mode: bool = True) -> DiffusionBackbone:
        super().train(mode)
        self.vae.eval()  # frozen parts stay in eval mode
        return self

    def encoder_uses_channels_last(self, device: torch.device) -> bool:
        """Whether :meth:`encode` gives the VAE encoder channels_last input on ``device``."""
        if self.encoder_channels_last is None:
            return device.type == "cpu"
        return self.encoder_channels_last

    def _posterior_mean(self, images: torch.Tensor) -> torch.Tensor:
        if not self.encoder_uses_channels_last(images.device):
            return self.vae.encode(images).latent_dist.mean
        # Only the input is reordered (the convolutions follow its format; the weights stay as loaded), and the
        # UNet gets contiguous latents all the same.
        latents = self.vae.encode(images.contiguous(memory_format=torch.channels_last)).latent_dist.mean
        return latents.contiguous()

    def compile_encoder(self, **options) -> None:
        """torch.compile the frozen VAE encoder, the costliest stage of inference on a GPU (about 1.8× faster
        on an H100 in bf16); ``options`` go to ``torch.compile``. One slice is compiled (under ``vae_slicing``
        the slices are called in turn), and the modules themselves are untouched, so checkpoints keep their keys."""
        self._encode = torch.compile(self._posterior_mean, **options)

    def compile_unet(self, **options) -> None:
        """torch.compile the UNet pass together with its feature hooks and class-attention capture, as one graph:
        ``fullgraph=True`` makes a graph break an error rather than a silent slowdown. ``options`` go to
        ``torch.compile`` (e.g. ``mode``, ``backend``); the modules are untouched, so checkpoints keep their keys."""
        self._run_unet = torch.compile(self._unet_pass, fullgraph=True, **options)

    def _unet_pass(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> None:
        # The output (noise prediction) is unused: the hooks and the capture processor keep what is read out.
        self.unet(latents, timesteps, encoder_hidden_states=context)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8): the scaled posterior mean."""
        H, W = images.shape[-2:]
        if H % self.input_multiple or W % self.input_multiple:
            raise ValueError(f"input size {H}x{W} is not divisible by {self.input_multiple}")
        images = images.to(self.vae.dtype)
        size = vae_slice_size(images) if self.vae_slicing else None
        return in_slices(self._encode, images, size) * self.latent_scale

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> BackboneOutput:
        """latents (B, 4, h, w), context (B, T, D) with the C class tokens first -> features keyed by stride."""
        B, _, h, w = latents.shape
        self._features.clear()
        self.store.clear()
        timesteps = torch.full((B,), self.timestep, device=latents.device, dtype=torch.long)
        self.store.recording = True
        try:
            self._run_unet(latents.to(self.unet.dtype), timesteps, context.to(self.unet.dtype))
        finally:
            self.store.recording = False
        features, class_attention = {}, {}
        for stride in sorted(self.feature_strides.values()):
            feature = self._features[stride]
            if stride in self.map_strides:
                s = stride // self.vae_stride
                maps = self.store.mean((h // s) * (w // s))  # (B, h·w, C)
                # (B, C, h/s, w/s)
                maps = maps.transpose(1, 2).reshape(B, -1, h // s, w // s).to(feature.dtype)
                class_attention[stride] = maps
                feature = torch.cat([feature, maps], dim=1)
            features[stride] = feature
        self._features.clear()
        return BackboneOutput(features=features, class_attention=class_attention)
