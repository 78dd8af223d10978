"""Capture of class-token cross-attention maps through a diffusers attention processor.

Only the chosen cross-attention layers get :class:`ClassAttentionProcessor`; every other layer keeps diffusers'
fused default. The processor still computes its output with ``scaled_dot_product_attention`` and forms the
(small) query × context-token probabilities separately, so the UNet output is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class AttentionStore:
    """Sums of head-averaged class-token attention maps, keyed by the number of query tokens (one per resolution).

    The backbone clears it before each UNet call, lets it record only during that call (``recording``) and reads
    the per-resolution layer average afterwards. Outside the call nothing is added: with gradient checkpointing the
    backward pass runs the checkpointed blocks, and so the capture processors, a second time, and those maps must
    not be counted again.
    """

    def __init__(self, num_class_tokens: int) -> None:
        self.num_class_tokens = num_class_tokens
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.recording = False

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def add(self, maps: torch.Tensor) -> None:
        """maps: (B, HW, C) attention of the HW queries on the C class tokens, averaged over heads; ignored when
        the store is not recording (a recomputation in the backward pass)."""
        if not self.recording:
            return
        num_queries = maps.shape[1]
        if num_queries in self.sums:
            self.sums[num_queries] = self.sums[num_queries] + maps
            self.counts[num_queries] += 1
        else:
            self.sums[num_queries] = maps
            self.counts[num_queries] = 1

    def mean(self, num_queries: int) -> torch.Tensor:
        """Layer average of the maps with ``num_queries`` queries: (B, HW, C)."""
        if num_queries not in self.sums:
            raise RuntimeError(
                f"no attention maps with {num_queries} queries were captured; got {sorted(self.sums)}"
            )
        return self.sums[num_queries] / self.counts[num_queries]


class ClassAttentionProcessor:
    """Cross-attention processor that records the attention paid to the first ``store.num_class_tokens`` tokens."""

    def __init__(self, store: AttentionStore) -> None:
        self.store = store

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("ClassAttentionProcessor is for cross-attention layers (attn2) only")
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError(
                "ClassAttentionProcessor supports the SD transformer's cross-attention layers only"
            )
        residual = hidden_states
        B, N, _ = hidden_states.shape  # N = h·w queries
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(B, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        # (B, heads, N, head_dim) and (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

        # The probabilities over all T context tokens, kept for the class-token columns only: (B, N, C).
        C = self.store.num_class_tokens
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale  # (B, heads, N, T)
        probs = scores.float().softmax(dim=-1)[..., :C].mean(dim=1)
        self.store.add(probs.to(query.dtype))

        out = out.transpose(1, 2).reshape(B, N, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
