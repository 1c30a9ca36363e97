"""The frozen base every method trains on: its parts frozen and moved to the device, the attention kernel, and
gradient checkpointing. Shared by `boothkit train instantbooth` and `boothkit train e4t`."""
from __future__ import annotations

from typing import Iterable

import torch

ATTENTION = ("auto", "sdpa", "eager", "xformers")


def attention_kind(kind: str, device) -> str:
    """``auto`` resolved for ``device``: explicit softmax(QKᵀ)V on CPU, PyTorch's fused SDPA elsewhere.

    Why: training backpropagates through every attention of the frozen denoiser, and on CPU the fused kernel's
    backward is slow in bf16: `boothkit bench train` (toy world, 1 thread) runs the bf16 trainer 1.39-1.44x faster
    with the explicit form than with the fused kernel."""
    if kind not in ATTENTION:
        raise ValueError(f"attention is {kind!r}; expected one of {', '.join(ATTENTION)}")
    if kind == "auto":
        return "eager" if torch.device(device).type == "cpu" else "sdpa"
    return kind


def use_attention(unet, kind: str, adapters: Iterable = ()) -> None:
    """Set the denoiser's attention processors (and the InstantBooth adapters' kernel) to a resolved ``kind``."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if kind == "xformers":
        unet.enable_xformers_memory_efficient_attention()  # raises a clear error if xformers is not installed
    else:
        unet.set_attn_processor(AttnProcessor() if kind == "eager" else AttnProcessor2_0())
    for adapter in adapters:
        adapter.eager_attention = kind == "eager"


def freeze_base(model, vision, device, *, attention: str = "auto", gradient_checkpointing: bool = False,
                adapters: Iterable = ()) -> str:
    """Freeze the base model's parts and the vision backbone on ``device``, pick the attention kernel, switch on
    gradient checkpointing if asked. Returns the attention kind in use."""
    kind = attention_kind(attention, device)
    for part in model.parts() + [vision]:
        part.requires_grad_(False).eval().to(device)
    use_attention(model.unet, kind, adapters)
    if gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        model.unet.train()  # diffusers checkpoints only in training mode; the UNet has no dropout/BN to change
    return kind
