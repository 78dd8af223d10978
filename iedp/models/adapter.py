"""The residual text adapter shared by both guidance branches."""

from __future__ import annotations

import torch
from torch import nn


class TextAdapter(nn.Module):
    """tokens + γ ⊙ MLP(tokens), applied per token; γ starts tiny so training begins from the CLIP embeddings.

    Args:
        dim: token width D (768 for CLIP ViT-L/14).
        gamma_init: initial value of every entry of γ.
    """

    def __init__(self, dim: int, gamma_init: float = 1e-4) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), gamma_init))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (..., D) -> (..., D)."""
        return tokens + self.gamma * self.mlp(tokens)
