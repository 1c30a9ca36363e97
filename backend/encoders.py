"""The two image encoders of InstantBooth (paper, sec. 3.2): a frozen CLIP vision backbone followed by a trained
fully-connected head each. The backbone is run by the host; these heads only see its outputs."""
from __future__ import annotations

import torch
from torch import nn


class _Head(nn.Module):
    """A fully-connected map from the backbone's width into the text space (the file's ``*.fc.*`` tensors)."""

    def __init__(self, vision_dim: int, ctx_dim: int):
        super().__init__()
        self.fc = nn.Linear(vision_dim, ctx_dim)


class ConceptEncoder(_Head):
    """E_c's head: maps each image's global feature into the text space and averages over the N images,
    giving the compact concept embedding f_c that stands in for the identifier."""

    def forward(self, global_features: torch.Tensor) -> torch.Tensor:
        """[N, vision_dim] -> f_c [ctx_dim], or batched [B, N, vision_dim] -> [B, ctx_dim]."""
        if global_features.ndim not in (2, 3):
            raise ValueError(f"global features must be [N, D] or [B, N, D], got {tuple(global_features.shape)}")
        return self.fc(global_features).mean(dim=-2)


class PatchEncoder(_Head):
    """E_p's head: maps every token of every image (257 per image for ViT-L/14) into the text space and concatenates
    them over the N images, giving the rich patch feature f_p the adapters attend to."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, vision_dim] -> f_p [N*T, ctx_dim], or batched [B, N, T, vision_dim] -> [B, N*T, ctx_dim]."""
        if tokens.ndim not in (3, 4):
            raise ValueError(f"patch tokens must be [N, T, D] or [B, N, T, D], got {tuple(tokens.shape)}")
        return self.fc(tokens).flatten(-3, -2)
