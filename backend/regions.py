"""Regions of an image for several concepts in one image: a concept's adapter term acts only on the latent tokens
inside its region. A region is given as a mask ([H, W] in [0, 1], 1 inside) or as a box of fractions of the image
(x0, y0, x1, y1); every transformer block sees it at its own token grid, averaged over the pixels each token covers
(area resampling), so a soft mask stays soft and a box edge that cuts a token weighs it by its overlap.

Region compositing (the other way to keep concepts apart, the one ComfyUI's masked conditioning uses) weighs each
region's noise prediction by its mask at the latent's size: ``composite_weights``."""
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


def token_mask(mask: torch.Tensor, tokens: int, height: int, width: int) -> torch.Tensor:
    """The region at a transformer block with ``tokens`` tokens in a UNet run on a [height, width] latent ([tokens],
    row-major over the block's grid, as diffusers' and ComfyUI's transformers flatten it)."""
    return at_size(mask, *block_grid(tokens, height, width)).flatten()


def block_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The token grid of a block with ``tokens`` tokens in a UNet run on a [height, width] latent: each level halves
    both sides, rounding up (a stride-2 convolution with padding 1), so the grid is exact for any latent size."""
    h, w = height, width
    while h * w > tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != tokens:
        raise ValueError(f"a transformer block of {tokens} tokens is no level of a {height}x{width} latent")
    return h, w


def at_size(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The mask resampled to ``height`` x ``width`` by area (each cell: the share of it the region covers)."""
    if tuple(mask.shape) == (height, width):
        return mask
    return F.interpolate(mask[None, None], size=(height, width), mode="area")[0, 0]


def composite_weights(masks: Sequence[torch.Tensor], height: int, width: int
                      ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Weights of the regions' noise predictions at ``height`` x ``width``: ε = Σ_k w_k ε_k + w_bg ε_background.
    Where regions overlap (Σ m_k > 1) they share the pixel in proportion (w_k = m_k / Σ m); elsewhere w_k = m_k and
    the background prompt fills the rest (w_bg = 1 − Σ m_k; None where the regions cover every pixel)."""
    ms = [at_size(check_mask(m), height, width) for m in masks]
    total = torch.stack(ms).sum(0)
    if bool((total > 1).any()):
        ms = [m / total.clamp(min=1) for m in ms]
        total = total.clamp(max=1)
    rest = 1 - total
    return ms, (rest if bool((rest > 0).any()) else None)
