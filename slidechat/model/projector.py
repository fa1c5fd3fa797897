"""Slide-token projector into the LLM embedding space (released layout: Linear -> GELU -> Linear)."""

from __future__ import annotations

from torch import Tensor, nn


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        # keys projector.model.0.* / projector.model.2.* as in released checkpoints
        self.model = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
