"""The task model: guidance -> adapter -> diffusion backbone -> neck/head, for the methods of :mod:`iedp.methods`.

Implicit tokens: learnable queries reading the frozen CLIP image tokens (``model.implicit=queries``, the paper) or
CLIP's frozen image embedding (``pooled``). Explicit tokens: the label prompt's CLIP text token sequence.
For depth there are no class-map tokens: the context is the guidance tokens alone (for ``vpd`` the token of the
ground-truth scene, or the mean scene token when the scene is unknown).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from iedp.config import ModelConfig
from iedp.methods import METHODS
from iedp.models.adapter import TextAdapter
from iedp.models.backbone import DiffusionBackbone
from iedp.models.guidance import ExplicitGuidance, ImplicitGuidance
from iedp.models.implicit_queries import ImplicitQueries
from iedp.models.tasks import TASKS

logger = logging.getLogger(__name__)


class IEDPModel(nn.Module):
    """Segmentation or depth model on a diffusion backbone with implicit / explicit language guidance.

    Args:
        config: the model section of the run config (task, method, head sizes...).
        backbone: the diffusion backbone (VAE + UNet), built with ``num_class_tokens`` = C for segmentation.
        implicit: the frozen CLIP vision tower of the implicit branch; with ``config.implicit == "queries"`` its
            tokens feed a trainable :class:`ImplicitQueries` built here (for the methods that use the branch).
        explicit: the frozen CLIP text branch, or None where no step needs it (inference of vpd/implicit/iedp).
        class_tokens: (C, D) class tokens (seg) or scene tokens (depth), in the UNet's context width D.
        class_names: the C names, in order.
    """

    def __init__(
        self,
        config: ModelConfig,
        backbone: DiffusionBackbone,
        implicit: ImplicitGuidance,
        explicit: ExplicitGuidance | None,
        class_tokens: torch.Tensor,
        class_names: list[str],
    ) -> None:
        super().__init__()
        width = backbone.unet.config.cross_attention_dim
        if class_tokens.shape != (len(class_names), width):
            raise ValueError(
                f"class tokens have shape {tuple(class_tokens.shape)}, expected ({len(class_names)}, {width}) "
                "(one per class name, in the UNet's cross_attention_dim)"
            )
        self.config = config
        self.task = config.task
        self.method = config.method
        self.class_names = list(class_names)
        self.backbone = backbone
        self.implicit = implicit
        self.explicit = explicit
        self.adapter = TextAdapter(width, config.adapter_gamma_init)
        uses_implicit = "implicit" in METHODS[self.method].train_branches
        self.implicit_queries = (
            ImplicitQueries(
                implicit.out_dim,
                width,
                config.implicit_queries,
                config.implicit_layers,
                config.implicit_heads,
            )
            if uses_implicit and config.implicit == "queries"
            else None
        )
        self.register_buffer("class_tokens", class_tokens.float().clone())
        self.strides = sorted(backbone.out_channels)
        in_channels = [backbone.out_channels[s] for s in self.strides]
        self.task_spec = TASKS[self.task]
        head_parts = self.task_spec.build_head(config, self.strides, in_channels, len(class_names))
        for name, part in head_parts.items():
            self.add_module(name, part)
        self.head_parts = tuple(head_parts)  # applied in this order to the feature pyramid

    @property
    def unet(self) -> nn.Module:
        return self.backbone.unet

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def frozen_modules(self) -> list[nn.Module]:
        parts = [self.backbone.vae, self.implicit]
        return parts + ([self.explicit] if self.explicit is not None else [])

    # -- context -------------------------------------------------------------------------------------------------
    def guidance_tokens(self, branch: str, images: torch.Tensor, batch: dict) -> torch.Tensor | None:
        """(B, T, D) guidance tokens of one branch, or None (VPD segmentation: class tokens only); VPD's branch
        takes what the task's table entry gives it."""
        if branch == "implicit":
            visual = self.implicit(images)  # frozen CLIP: (B, T, D_vis) tokens, or (B, 1, D) image_embeds
            return visual if self.implicit_queries is None else self.implicit_queries(visual)
        if branch == "explicit":
            if self.explicit is None:
                raise RuntimeError(
                    "the explicit branch needs the CLIP text tower, which this model was built without"
                )
            if "prompt" not in batch:
                raise ValueError("the explicit branch needs label prompts (batch['prompt'])")
            return self.explicit(list(batch["prompt"])).to(images.device)
        return self.task_spec.vpd_guidance(self.class_tokens, batch, images.shape[0], images.device)

    @torch.no_grad()
    def implicit_attention(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, g, g): where each implicit query looks among CLIP's g × g image patches (the last decoder
        layer's cross-attention, heads averaged; the class token's share is left out, so rows sum to <= 1)."""
        if self.implicit_queries is None:
            raise ValueError("implicit attention needs the learnable queries (model.implicit=queries)")
        weights = self.implicit_queries.cross_attention(self.implicit(images))  # (B, N, 1 + g²)
        B, N, T = weights.shape
        grid = int((T - 1) ** 0.5)
        return weights[..., 1:].reshape(B, N, grid, grid)

    def context(self, guidance: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """adapter([class tokens; guidance tokens]) -> (B, C + T, D); the class-token part only where the task's
        class tokens lead the context (not depth's scene tokens)."""
        parts = [self.class_tokens.expand(batch_size, -1, -1)] if self.task_spec.class_tokens_lead else []
        if guidance is not None:
            parts.append(guidance.to(self.class_tokens.dtype))
        return self.adapter(torch.cat(parts, dim=1))

    # -- decoding ------------------------------------------------------------------------------------------------
    def apply_head(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """Backbone features -> seg logits (B, K, h, w) or depth in metres (B, 1, h, w) at the head's size."""
        prediction = [features[s] for s in self.strides]
        for name in self.head_parts:
            prediction = getattr(self, name)(prediction)
        return prediction

    @staticmethod
    def resize(prediction: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The head's output at the input size (bilinear), as the losses and metrics compare it."""
        if prediction.shape[-2:] == size:
            return prediction
        return F.interpolate(prediction, size=size, mode="bilinear", align_corners=False)

    def run_branches(self, branches: tuple[str, ...], batch: dict) -> dict[str, torch.Tensor]:
        """Predictions of each branch; branches whose contexts have the same length share one UNet call (2B)."""
        images = batch["image"]
        B = images.shape[0]
        # training latents encoded once ahead (data.cache_latents), or now
        latents = batch["latents"].to(images.device) if "latents" in batch else self.backbone.encode(images)
        contexts = [self.context(self.guidance_tokens(b, images, batch), B) for b in branches]
        size = tuple(images.shape[-2:])
        if len(contexts) > 1 and len({c.shape for c in contexts}) == 1:
            features = self.backbone(latents.repeat(len(contexts), 1, 1, 1), torch.cat(contexts)).features
            # split before resizing: the split's backward then joins the head's small outputs, not a full-size
            # copy of both branches' logits (0.6 GB in fp32 for ADE20K's 150 classes at 512², batch 2 per branch)
            predictions = self.apply_head(features).split(B)
        else:
            predictions = [self.apply_head(self.backbone(latents, c).features) for c in contexts]
        return {b: self.resize(p, size) for b, p in zip(branches, predictions, strict=True)}

    # -- public API ----------------------------------------------------------------------------------------------
    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Training losses: ``loss`` (the total to minimise) and ``loss_<branch>`` for each branch."""
        branches = METHODS[self.method].train_branches
        predictions = self.run_branches(branches, batch)
        losses = {}
        for branch, prediction in predictions.items():
            losses[f"loss_{branch}"] = self.task_spec.loss(prediction, batch[self.task_spec.target])
        weights = {"explicit": self.config.explicit_weight if self.method == "iedp" else 1.0}
        losses["loss"] = sum(weights.get(b, 1.0) * losses[f"loss_{b}"] for b in branches)
        return losses

    def predict(self, batch: dict) -> torch.Tensor:
        """Inference with the method's inference context: seg logits (B, K, H, W) or depth (B, 1, H, W), metres."""
        branch = METHODS[self.method].infer_branch
        return self.run_branches((branch,), batch)[branch]

    def forward(self, batch: dict, mode: str = "loss") -> dict[str, torch.Tensor] | torch.Tensor:
        """One entry point so wrappers (DDP) see every call: ``mode`` is "loss" or "predict"."""
        if mode == "loss":
            return self.loss(batch)
        if mode == "predict":
            return self.predict(batch)
        raise ValueError(f"mode: {mode!r} is not one of loss, predict")
