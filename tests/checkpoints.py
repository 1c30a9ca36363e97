"""Helpers for the resume tests: change a training checkpoint in a known way, read back what resuming must keep."""
import torch

from boothkit.backend.files import read_safetensors, write_safetensors


def tamper(path, shift: float = 0.5, adam_step: float = 100.0, ema: float | None = None) -> dict[str, torch.Tensor]:
    """Add ``shift`` to every trained (floating-point) weight, set Adam's step count to ``adam_step`` and (if given)
    every EMA value to ``ema``, in place. Returns the changed weights by parameter name."""
    tensors, meta = read_safetensors(path)
    for k in list(tensors):
        if not tensors[k].dtype.is_floating_point:  # buffers such as position ids stay as they are
            continue
        if k.startswith("weights."):
            tensors[k] = tensors[k] + shift
        elif k.startswith("ema.") and ema is not None:
            tensors[k] = torch.full_like(tensors[k], ema)
        elif k.startswith("optimizer.") and k.endswith(".step"):
            tensors[k] = torch.full_like(tensors[k], adam_step)
    write_safetensors(path, tensors, meta)
    return {k[len("weights."):]: v for k, v in tensors.items()
            if k.startswith("weights.") and v.dtype.is_floating_point}


def adam_steps(path) -> set[float]:
    """Adam's step counts stored in a checkpoint (one per parameter; all equal in a healthy run)."""
    tensors, _ = read_safetensors(path)
    return {float(v) for k, v in tensors.items() if k.startswith("optimizer.") and k.endswith(".step")}


def trained_weights(path) -> dict[str, torch.Tensor]:
    tensors, _ = read_safetensors(path)
    return {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
