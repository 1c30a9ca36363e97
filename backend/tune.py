"""The general tune loop and its parts, shared by two-stage quick-tune and E4T: the optimisation loop
(progress, cancel within one step, a NaN guard that keeps the last good state), the noise schedule, cached
training images, batches and the denoising loss. Host-independent: a host hands in callables and tensors."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .files import all_finite, nonfinite

log = logging.getLogger(__name__)


DONE, CANCELLED, NAN = "done", "cancelled", "nan"
# parameters up to this many elements (a LoRA, an embedding, E4T's encoder and offsets) are copied before each step,
# so a step that makes them non-finite is undone; a full fine-tune above it stops with nothing to write
SNAPSHOT_LIMIT = 50_000_000

Encode = Callable[[Sequence[torch.Tensor], torch.Tensor], Any]
Predict = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Progress = Callable[[int, int, float], None]


# ----------------------------------------------------------------------------------------------------------------
# the general tune loop


@dataclass
class TuneResult:
    """How a tune loop ended. ``steps`` optimizer steps were taken and kept; the parameters hold their state."""
    status: str = DONE  # DONE | CANCELLED | NAN
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == DONE


def tune_loop(params: Iterable[torch.Tensor | dict], loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float,
              on_progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None, *,
              weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
              max_grad_norm: float | None = None, mixed_precision: str = "no") -> TuneResult:
    """Optimise ``params`` (leaf tensors with requires_grad, or param groups ``{"params": [...], "lr": x}`` with their
    own rates) with AdamW on ``loss_fn(step)`` for ``steps`` steps.

    ``should_cancel()`` is asked before every step; a True stops before the next update (status CANCELLED).
    ``on_progress(done, steps, loss)`` is called after every step; an exception it raises (ComfyUI's interrupt)
    propagates with the parameters in their last completed state. NaN guard: the update is applied only after the
    loss and the gradient norm are found finite, so a non-finite loss or gradient stops the loop (status NAN) with
    the parameters (and optimizer state) exactly as the last good step left them. Both checks share the step's one
    device sync, which also reads the loss. ``mixed_precision`` "bf16" runs ``loss_fn`` under bfloat16 autocast
    (parameters stay fp32)."""
    params = list(params)
    plain = [p for p in params if not isinstance(p, dict)]
    groups = [dict(g, params=list(g["params"])) for g in params if isinstance(g, dict)]
    groups += [{"params": plain}] if plain else []
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("tune_loop needs at least one parameter to optimise")
    for p in params:
        if not (p.is_leaf and p.requires_grad and p.is_floating_point()):
            raise ValueError("tune_loop parameters must be floating-point leaf tensors with requires_grad=True")
    bad = nonfinite(dict(enumerate(params)))
    if bad:
        raise ValueError(f"tune_loop: {len(bad)} parameter tensor(s) hold NaN or infinity before the first step; "
                         f"the starting state (a loaded file?) is not finite")
    if steps < 0 or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"tune_loop needs steps >= 0 and a positive finite learning rate, got steps={steps}, lr={lr}")
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {mixed_precision!r}")
    device = params[0].device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mixed_precision == "bf16" else nullcontext())
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    clip = max_grad_norm if max_grad_norm else float("inf")
    result = TuneResult()
    start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(steps):
            if should_cancel is not None and should_cancel():
                result.status, result.message = CANCELLED, f"cancelled before step {step + 1} of {steps}"
                break
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(step)
            loss.backward()
            # the total norm is non-finite when any gradient is; with no clipping this only measures it
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            value, grad_norm = torch.stack([loss.detach().float(), norm.float().to(loss.device)]).tolist()
            if not (math.isfinite(value) and math.isfinite(grad_norm)):
                what = f"loss is {value}" if not math.isfinite(value) else f"gradient norm is {grad_norm}"
                result.status = NAN
                result.message = f"{what} at step {step + 1}; kept the state after step {step}"
                break
            # the guard checks the parameters too: a finite gradient can still step them to inf (a huge rate); the
            # step is taken on a copy's behalf only when the parameters are small enough to copy cheaply
            keep = ([p.detach().clone() for p in params] if sum(p.numel() for p in params) <= SNAPSHOT_LIMIT
                    else None)
            optimizer.step()
            if not all_finite(params):
                result.status = NAN
                if keep is not None:
                    with torch.no_grad():
                        for p, k in zip(params, keep):
                            p.copy_(k)
                    result.message = (f"parameters became non-finite at step {step + 1}; kept the state after step "
                                      f"{step}")
                else:
                    result.message = (f"parameters became non-finite at step {step + 1}; nothing finite is left to "
                                      f"keep (too large to copy every step): nothing is written")
                break
            result.steps += 1
            result.losses.append(value)
            if on_progress is not None:
                on_progress(step + 1, steps, value)
    optimizer.zero_grad(set_to_none=True)
    result.seconds = time.perf_counter() - start
    if result.status == NAN:
        log.warning("tune loop stopped: %s", result.message)
    return result


@contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Set requires_grad=False on every parameter of ``modules`` and restore each flag afterwards, so gradients
    reach only what a stage optimises and the modules come back exactly as they were."""
    saved, seen = [], set()
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            if id(p) not in seen:  # a parameter shared by two modules is saved once, with its original flag
                seen.add(id(p))
                saved.append((p, p.requires_grad))
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------------------------
# diffusion pieces, host-free


class NoiseSchedule:
    """The forward process of the denoiser: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε and its training target."""

    PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in self.PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected one of "
                             f"{self.PREDICTION_TYPES}")
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float32).flatten()
        if a.numel() < 2 or not bool(((a > 0) & (a <= 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D tensor of values in (0, 1]")
        self.alphas_cumprod, self.prediction_type = a, prediction_type
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def _coefs(self, t: torch.Tensor, like: torch.Tensor):
        table = self._on_device.get(like.device)
        if table is None:  # one copy per device, not one per step
            table = self._on_device[like.device] = self.alphas_cumprod.to(like.device)
        a = table[t].view(-1, *([1] * (like.ndim - 1)))
        return a.sqrt().to(like.dtype), (1 - a).sqrt().to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, n = self._coefs(t, x0)
        return s * x0 + n * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        s, n = self._coefs(t, x0)
        return s * noise - n * x0


@dataclass
class TrainingSet:
    """x0 of the training images, computed once by the host: VAE posterior means (and stds, for a fresh latent sample
    each step at the cost of one multiply-add) already scaled, or pixels in [-1, 1] for a pixel-space model.
    ``masks`` [N, 1, h, w] in [0, 1] at x0 resolution weight the loss (1 = subject)."""
    mean: torch.Tensor
    std: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def __post_init__(self):
        if self.mean.ndim != 4 or self.mean.shape[0] == 0:
            raise ValueError(f"training x0 must be [N>0, C, h, w], got {tuple(self.mean.shape)}")
        if self.std is not None and self.std.shape != self.mean.shape:
            raise ValueError(f"std {tuple(self.std.shape)} must match mean {tuple(self.mean.shape)}")
        if self.masks is not None:
            n, _, h, w = self.mean.shape
            if tuple(self.masks.shape) != (n, 1, h, w):
                raise ValueError(f"masks must be [N, 1, h, w] = {(n, 1, h, w)}, got {tuple(self.masks.shape)}")
            if bool((self.masks.flatten(1).sum(1) <= 0).any()):
                raise ValueError("a mask is empty (all zero): every training image needs some subject area")

    def __len__(self) -> int:
        return self.mean.shape[0]

    def x0(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean = self.mean[idx]
        if self.std is None:
            return mean
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + self.std[idx] * eps

    def mask(self, idx: torch.Tensor) -> torch.Tensor | None:
        return None if self.masks is None else self.masks[idx]


def take(cond: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a conditioning (a tensor or a dict/tuple/list of them, batch first)."""
    if isinstance(cond, torch.Tensor):
        return cond[idx.to(cond.device)]
    if isinstance(cond, dict):
        return {k: take(v, idx) for k, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(take(v, idx) for v in cond)
    raise TypeError(f"conditioning must be tensors (or dicts/tuples of them), got {type(cond).__name__}")


def concat(conds: Sequence[Any]) -> Any:
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(conds))
    if isinstance(first, dict):
        return {k: concat([c[k] for c in conds]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat([c[i] for c in conds]) for i in range(len(first)))
    raise TypeError(f"conditioning must be tensors (or dicts/tuples of them), got {type(first).__name__}")


def detach(cond: Any) -> Any:
    if isinstance(cond, torch.Tensor):
        return cond.detach()
    if isinstance(cond, dict):
        return {k: detach(v) for k, v in cond.items()}
    return type(cond)(detach(v) for v in cond)


def denoising_loss(predict: Predict, schedule: NoiseSchedule, x0: torch.Tensor, cond: Any,
                   masks: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample ||target - model(x_t, t, c)||² (the papers' eq. 1/2), mean over the (masked) elements: [B]."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    out = predict(schedule.add_noise(x0, noise, t), t, cond)
    err = (out.float() - schedule.target(x0, noise, t).float()) ** 2
    if masks is None:
        return err.flatten(1).mean(1)
    m = masks.to(err.dtype)
    return (err * m).flatten(1).sum(1) / (m.flatten(1).sum(1) * err.shape[1]).clamp_min(1e-8)


class BatchSampler:
    """Indices of training images: shuffled epochs, so every image is seen equally often."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None = None):
        if n <= 0:
            raise ValueError("no training images: quick-tune needs at least one image of the subject")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self._queue: list[int] = []

    def next(self) -> torch.Tensor:
        while len(self._queue) < self.batch_size:
            self._queue += torch.randperm(self.n, generator=self.generator).tolist()
        out, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size:]
        return torch.tensor(out)


# ----------------------------------------------------------------------------------------------------------------
# the two stages


def _generators(device: torch.device, seed: int | None):
    """(CPU generator for indices, device generator for noise/timesteps)."""
    if seed is None:
        return None, None
    cpu = torch.Generator().manual_seed(seed)
    dev = torch.Generator(device=device).manual_seed(seed + 1) if device.type != "cpu" else \
        torch.Generator().manual_seed(seed + 1)
    return cpu, dev


def _batch_len(cond: Any) -> int:
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    if isinstance(cond, dict):
        return _batch_len(next(iter(cond.values())))
    return _batch_len(cond[0])


def encode_all(encode: Encode, vectors: Sequence[torch.Tensor], num_prompts: int, device=None) -> Any:
    """Encode every training prompt once (stage 2's cache)."""
    with torch.no_grad():
        return detach(encode(list(vectors), torch.arange(num_prompts, device=device)))


def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    """"auto" -> bf16 on a CUDA device that supports it, else full precision (on CPU bf16 autocast is slower for the
    toy world's small convolutions than fp32)."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"
