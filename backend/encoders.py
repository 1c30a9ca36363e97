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


class PixelEncoder(nn.Module):
    """Ours, beyond the paper (InstantBoothConfig.pixel_features): each backbone patch's own pixels, mapped into the
    text space and added to that patch's token of f_p. A frozen backbone can drop colour and texture that identify a
    subject; the pixels keep them. The map starts at zero, so a file trained without it gives the same f_p."""

    def __init__(self, image_size: int, tokens_per_image: int, ctx_dim: int):
        super().__init__()
        grid = round((tokens_per_image - 1) ** 0.5)  # the tokens are the class token, then grid × grid patches
        if grid * grid != tokens_per_image - 1 or image_size % grid:
            raise ValueError(f"pixel features need a square patch grid: {tokens_per_image - 1} patch tokens do not "
                             f"tile {image_size} px images")
        self.patch = image_size // grid
        self.fc = nn.Linear(3 * self.patch * self.patch, ctx_dim)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The backbone's input [N, 3, S, S] (or [B, N, 3, S, S]) -> [N*T, ctx_dim] (or [B, N*T, ctx_dim]): zero at
        each image's class token, the mapped patch pixels at its patch tokens (row-major, as the backbone's)."""
        lead, (c, s, _) = pixels.shape[:-3], pixels.shape[-3:]
        p = self.patch
        patches = pixels.reshape(-1, c, s // p, p, s // p, p).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
        out = self.fc(patches.to(self.fc.weight.dtype))  # [N', grid², ctx]
        out = torch.cat([out.new_zeros(out.shape[0], 1, out.shape[-1]), out], dim=1)  # the class token gets nothing
        return out.reshape(*lead[:-1], -1, out.shape[-1])
