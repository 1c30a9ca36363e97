"""The model arguments every command takes: ``--model`` (a diffusers folder, a single-file checkpoint with
``--config``, or ``toy``) and ``--clip-vision`` (a CLIP vision folder, or ``toy``/none). The word ``toy`` is resolved
here, so the diffusers host knows nothing of the toy world."""
from __future__ import annotations

from pathlib import Path

import torch

TOY = "toy"


def load_model(name: str | Path, config: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """An :class:`~boothkit.hosts.diffusers.loading.SDModel`: the toy world's base for ``toy``, else from disk."""
    if str(name) == TOY:
        from ..toyworld.base import load_sd_model

        return load_sd_model(dtype=dtype)
    from ..hosts.diffusers.loading import load_sd

    return load_sd(name, dtype=dtype, config=config)


def load_vision(name: str | Path | None, dtype: torch.dtype = torch.float32):
    """A CLIP vision model: the toy world's for ``None``/``toy``, else a transformers folder."""
    if name is None or str(name) == TOY:
        from ..toyworld.scorers import load_clip_vision

        return load_clip_vision()[0].eval()
    from ..hosts.diffusers.loading import load_clip_vision

    return load_clip_vision(name, dtype=dtype)
