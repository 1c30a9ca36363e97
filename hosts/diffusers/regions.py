"""Several concepts in one image by region compositing of the noise prediction (issue #29), the mechanism of
ComfyUI's masked conditioning: at every step each region k gets its own guided prediction ε_k, from its own prompt
(its concept's identifier) with only its own concept's weights or hooks on, and

    ε = Σ_k m_k ε_k + (1 − Σ_k m_k) ε_background

with each mask at the latent's size (backend/regions.py ``composite_weights``: overlaps shared in proportion).

Exact: region k's ε is computed with nothing of another concept (no other LoRA, offsets, adapters or token). Leaks:
ε_k sees the whole canvas (its UNet's attention and convolutions read the pixels of the other regions); soft mask
edges and latent cells cut by a box mix two predictions."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from ...backend.regions import check_mask, composite_weights
from .loading import SDModel
from .sampling import denoise, guidance_context, guided, latent_size


@dataclass
class Region:
    """One concept's part of the image. ``cond``: its prompt's conditioning [B or 1, T, ctx] (the concept bound to its
    identifier); ``mask``: [H, W] in [0, 1], any size of the image's aspect; ``applied()``: a context manager that
    yields the denoiser with the concept's weights or hooks on (None: the model's own UNet)."""
    cond: torch.Tensor
    mask: torch.Tensor
    applied: Callable[[], AbstractContextManager] | None = None


@torch.no_grad()
def sample_regions(model: SDModel, regions: Sequence[Region], uncond: torch.Tensor,
                   background: torch.Tensor | None = None, seed: int = 0, steps: int = 25, guidance: float = 5.0,
                   progress=None, height: int | None = None, width: int | None = None,
                   batch: int | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] whose region k follows ``regions[k]``; ``background`` (the conditioning of the prompt
    without any concept) fills what no region covers. An empty region is never computed, so it changes nothing, and
    one region over the whole image is :func:`sampling.sample` with that concept, bit for bit."""
    rows, cols = latent_size(model, height, width)
    live = [r for r in regions if bool(check_mask(r.mask).any())]
    batch = batch or max([r.cond.shape[0] for r in regions] + [1 if background is None else background.shape[0]])
    weights, rest = composite_weights([r.mask for r in live], rows, cols) if live else ([], torch.ones(rows, cols))
    parts = [(w, guidance_context(model, r.cond.expand(batch, -1, -1), uncond), r.applied)
             for w, r in zip(weights, live)]
    if rest is not None:
        if background is None:
            raise ValueError("the regions leave part of the image uncovered; give the background's conditioning")
        parts.append((rest, guidance_context(model, background.expand(batch, -1, -1), uncond), None))

    def eps(x, t):
        out = None
        for w, context, applied in parts:
            with (applied() if applied is not None else nullcontext(model.unet)) as unet:
                term = w.to(x) * guided(unet, x, t, context, guidance)
            out = term if out is None else out + term
        return out
    return denoise(model, eps, batch, seed, steps, progress, height, width)
