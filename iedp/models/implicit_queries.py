"""The trainable half of IEDP's implicit branch: learnable queries that read the frozen CLIP image features and
become *implicit text embeddings* for the UNet's cross-attention (DESIGN §1.2).

For each layer, with V = LN(f_pro(F_vis)):

    Q_s = Q + SA(LN(Q))
    Q_c = Q_s + CA(LN(Q_s), V)
    Q'  = Q_c + FFN(LN(Q_c))
"""

from __future__ import annotations

import torch
from torch import nn


class QueryDecoderLayer(nn.Module):
    """One pre-norm transformer-decoder layer: self-attention among the queries, cross-attention to the visual
    tokens, feed-forward; each a residual update. Attention is ``nn.MultiheadAttention`` (fused SDPA inside)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_visual = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(
        self, queries: torch.Tensor, visual: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """queries (B, N, D), visual (B, P, D) -> (queries (B, N, D), cross-attention (B, N, P) or None).

        The weights (averaged over heads) are only formed when asked for; otherwise attention stays fused.
        """
        x = self.norm_self(queries)
        queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        x, v = self.norm_cross(queries), self.norm_visual(visual)
        update, weights = self.cross_attn(x, v, v, need_weights=need_weights)
        queries = queries + update
        queries = queries + self.ffn(self.norm_ffn(queries))
        return queries, weights


class ImplicitQueries(nn.Module):
    """Learnable queries over frozen CLIP image tokens: F_vis (B, P, D_vis) -> F_imp (B, N, D).

    The default N = 77 is CLIP's text context length: the implicit tokens then have the same count as the explicit
    branch's token sequence (the text encoder's last hidden states), so IEDP runs both branches as one 2B UNet
    call, and the UNet sees contexts of the length it was pre-trained on.

    Args:
        visual_dim: width of the CLIP vision tower's hidden states (1024 for ViT-L/14).
        dim: the UNet's ``cross_attention_dim`` (768 for SD v1.5).
        num_queries: N, implicit tokens produced.
        num_layers: decoder layers (the paper describes one).
        num_heads: attention heads; ``dim`` must be divisible by it.
    """

    def __init__(
        self, visual_dim: int, dim: int, num_queries: int = 77, num_layers: int = 1, num_heads: int = 8
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.implicit_heads: {num_heads} does not divide the context width {dim}")
        # f_pro: a small feed-forward projector from CLIP's visual width to the UNet's context width.
        self.projector = nn.Sequential(nn.Linear(visual_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.queries = nn.Parameter(torch.empty(num_queries, dim))
        nn.init.normal_(self.queries, std=0.02)  # as learnable query tokens usually start (DETR, BLIP-2)
        self.layers = nn.ModuleList(QueryDecoderLayer(dim, num_heads) for _ in range(num_layers))

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """visual (B, P, D_vis): every token of CLIP's last layer -> implicit text embeddings (B, N, D)."""
        return self._run(visual, need_weights=False)[0]

    def cross_attention(self, visual: torch.Tensor) -> torch.Tensor:
        """(B, N, P): where the last layer's queries look among the visual tokens (heads averaged)."""
        return self._run(visual, need_weights=True)[1]

    def _run(self, visual: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        B = visual.shape[0]
        visual = self.projector(visual.to(self.queries.dtype))  # (B, P, D)
        queries = self.queries.expand(B, -1, -1)  # (B, N, D)
        weights = None
        for layer in self.layers:
            queries, weights = layer(queries, visual, need_weights=need_weights)
        return queries, weights
