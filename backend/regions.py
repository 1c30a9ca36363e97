"""Regions of an image for several concepts in one image: a concept's adapter term acts only on the latent tokens
inside its region. A region is given as a mask ([H, W] in [0, 1], 1 inside) or as a box of fractions of the image
(x0, y0, x1, y1); every transformer block sees it at its own token grid, averaged over the pixels each token covers
(area resampling), so a soft mask stays soft and a box edge that cuts a token weighs it by its overlap."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def box_mask(box: Sequence[float], height: int, width: int) -> torch.Tensor:
    """[height, width] mask of a box given as fractions (x0, y0, x1, y1) of the image, 0 <= x0 < x1 <= 1."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"region box {tuple(box)} must be fractions x0 < x1, y0 < y1 within [0, 1]")
    # exact coverage of each pixel by the box, so that boxes meeting at an edge share no weight
    def cover(n: int, lo: float, hi: float) -> torch.Tensor:
        edges = torch.arange(n, dtype=torch.float32)
        return (torch.clamp(edges + 1, max=hi * n) - torch.clamp(edges, min=lo * n)).clamp(0, 1)

    return cover(height, y0, y1)[:, None] * cover(width, x0, x1)[None, :]


def check_mask(mask: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask, dtype=torch.float32)
    if mask.ndim != 2 or min(mask.shape) < 1:
        raise ValueError(f"a region mask is [H, W], got shape {tuple(mask.shape)}")
    if not bool(torch.isfinite(mask).all()) or float(mask.min()) < 0 or float(mask.max()) > 1:
        raise ValueError("a region mask holds values in [0, 1] (1 inside the region)")
    return mask


def token_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """The region at a transformer block with ``tokens`` latent tokens ([tokens], row-major over the block's grid,
    as diffusers' and ComfyUI's transformers flatten it); the grid keeps the mask's aspect ratio."""
    h, w = mask.shape
    gh = max(1, round(math.sqrt(tokens * h / w)))
    gw = tokens // gh
    if gh * gw != tokens:
        raise ValueError(f"a block of {tokens} tokens is not a grid of the region's aspect {h}x{w}")
    return F.interpolate(mask[None, None], size=(gh, gw), mode="area").flatten()
