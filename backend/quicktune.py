"""Two-stage quick-tune (seed 002): textual inversion of the identifier, then DreamBooth-style denoiser fine-tuning.

Stage 1 optimises only the identifier's *input* token vectors (initialised from a real word, ~100 steps) through the
frozen text encoder and denoiser. Stage 2 freezes those vectors and the text encoder and fine-tunes the denoiser
(a LoRA by default, or every weight) for 200-400 steps on the same prompt, without prior preservation by default.

Everything here is host-independent: a host hands in callables and tensors —

* ``encode(vectors, prompt_ids) -> cond``: the conditioning of prompts ``prompt_ids`` (indices into the host's prompt
  list) with the identifier's token rows replaced by ``vectors`` (one [n, width] tensor per text encoder), and
  differentiable with respect to ``vectors``. ``cond`` is a tensor or a dict/tuple of tensors, batch first.
* ``predict(x_t, t, cond) -> model output`` of the denoiser;
* a :class:`NoiseSchedule` (ᾱ_t and the prediction type) and a :class:`TrainingSet` of x0 computed once by the host
  (VAE latents, or pixels for a pixel-space model);

and gets back vectors and :class:`TuneResult`\\ s. :func:`tune_loop` is the general optimisation loop (progress,
cancel within one step, NaN guard that keeps the last good state) that other methods (E4T) reuse.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DONE, CANCELLED, NAN = "done", "cancelled", "nan"

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
            optimizer.step()
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
# configuration


@dataclass
class StageConfig:
    steps: int
    lr: float
    batch_size: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None


@dataclass
class QuickTuneConfig:
    """Both stages' settings. :meth:`sd` is the paper's setting for Stable Diffusion, :meth:`toy` the toy world's:

    ==================  ==========================================  ==========================================
    defaults            ``sd()`` (SD1.x/SD2.x/SDXL)                 ``toy()`` (32x32 pixel-space toy base)
    ==================  ==========================================  ==========================================
    stage 1             100 steps, lr 5e-3 (paper), batch 4         100 steps, lr 1e-3, batch 4
    stage 2, LoRA       300 steps, lr 1e-4, batch 1, rank 4         200 steps, lr 1e-3, batch 4, rank 8
    stage 2, full       300 steps, lr 5e-6 (paper), batch 1         200 steps, lr 1e-4, batch 4
    mixed precision     auto: bf16 on CUDA with bf16, else none      none (bf16 gains ~7% there on CPU)
    ==================  ==========================================  ==========================================

    ``mode`` "lora" (default) trains a LoRA of ``rank``/``alpha`` (plus 3x3 convs at ``conv_rank`` if > 0); "full"
    fine-tunes every denoiser weight (on a copy; the input model is never changed). ``prior_weight`` applies only
    when class images are given (the paper's default uses none)."""
    stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=100, lr=5e-3, batch_size=4))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(steps=300, lr=1e-4, batch_size=1,
                                                                    weight_decay=1e-2, max_grad_norm=1.0))
    mode: str = "lora"
    rank: int = 4
    alpha: float | None = None
    conv_rank: int = 0
    conv_alpha: float | None = None
    prior_weight: float = 1.0
    mixed_precision: str = "auto"  # "auto": bf16 where the device runs it fast (CUDA with bf16), else "no"
    gradient_checkpointing: bool = False
    flip: bool = False  # also train on mirrored images (latents of the mirrored images are cached too)

    MODES = ("lora", "full")

    def __post_init__(self):
        if self.mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {self.mode!r}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {self.mixed_precision!r}")
        for name, s in (("stage1", self.stage1), ("stage2", self.stage2)):
            if s.steps < 0 or s.lr <= 0 or s.batch_size <= 0:
                raise ValueError(f"{name}: steps >= 0, lr > 0 and batch_size > 0 expected, got {s}")
        if self.rank <= 0 or self.conv_rank < 0:
            raise ValueError(f"LoRA rank must be > 0 and conv_rank >= 0, got {self.rank}, {self.conv_rank}")

    @classmethod
    def sd(cls, **overrides) -> QuickTuneConfig:
        """Stable Diffusion: stage 1 100 steps at 5e-3 (paper), stage 2 300 steps (paper: 200-400); LoRA at 1e-4,
        full fine-tune at the paper's 5e-6."""
        cfg = cls(**overrides)
        if cfg.mode == "full" and "stage2" not in overrides:
            cfg.stage2 = StageConfig(steps=300, lr=5e-6, batch_size=1, weight_decay=1e-2, max_grad_norm=1.0)
        return cfg

    @classmethod
    def toy(cls, **overrides) -> QuickTuneConfig:
        """The toy world (32x32 pixel-space base, 64-wide CLIP): the paper's step counts (100 + 200), a batch of 4
        and a rank-8 LoRA on the attention layers at 1e-3 (a tiny model learns from fewer, larger updates). Stage 1
        at 1e-3, not the paper's 5e-3: on the development identities (8 contexts each) the embedding learnt at 5e-3
        cost the pair 32 % of the base's alignment on the context words (0.68 x, identity 0.789), at 1e-3 11 %
        (0.89 x, identity 0.811; `boothkit eval --dev --methods quicktune --subjects 8 --contexts 8 --samples 1`).
        About a minute on two CPU threads (stage-1 and stage-2 steps measured at 0.18 s and 0.28 s on two threads of
        an otherwise idle server CPU)."""
        base = dict(stage1=StageConfig(steps=100, lr=1e-3, batch_size=4),
                    stage2=StageConfig(steps=200, lr=1e-3, batch_size=4, weight_decay=1e-2, max_grad_norm=1.0),
                    rank=8, mixed_precision="no")
        base.update(overrides)
        cfg = cls(**base)
        if cfg.mode == "full" and "stage2" not in overrides:
            cfg.stage2 = StageConfig(steps=200, lr=1e-4, batch_size=4, weight_decay=1e-2, max_grad_norm=1.0)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


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


def learn_embedding(init_vectors: Sequence[torch.Tensor], encode: Encode, predict: Predict, schedule: NoiseSchedule,
                    images: TrainingSet, num_prompts: int, config: StageConfig,
                    on_progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None,
                    seed: int | None = 0, mixed_precision: str = "no") -> tuple[list[torch.Tensor], TuneResult]:
    """Stage 1: optimise only the identifier's input vectors (textual inversion), everything else frozen.

    The caller freezes the text encoder and denoiser (see :func:`frozen`); gradients reach only the new vectors.
    Each step encodes only the distinct prompts of the batch. Returns the vectors (detached) and the result."""
    if num_prompts <= 0:
        raise ValueError("stage 1 needs at least one training prompt")
    vectors = [v.detach().clone().float().requires_grad_(True) for v in init_vectors]
    device = images.mean.device
    index_gen, noise_gen = _generators(device, seed)
    sampler = BatchSampler(len(images), config.batch_size, index_gen)

    def loss_fn(step: int) -> torch.Tensor:
        idx = sampler.next()
        prompt_ids = torch.randint(num_prompts, (len(idx),), generator=index_gen)
        distinct, inverse = torch.unique(prompt_ids, return_inverse=True)
        cond = take(encode(vectors, distinct), inverse)
        return denoising_loss(predict, schedule, images.x0(idx.to(device), noise_gen), cond,
                              images.mask(idx.to(device)), noise_gen).mean()

    result = tune_loop(vectors, loss_fn, config.steps, config.lr, on_progress, should_cancel,
                       weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                       mixed_precision=mixed_precision)
    return [v.detach() for v in vectors], result


@dataclass
class PriorPreservation:
    """DreamBooth's prior-preservation term: class images (x0 computed once) and the encoded class prompt(s)."""
    images: TrainingSet
    cond: Any  # batch dim = number of class prompts
    weight: float = 1.0


def finetune_denoiser(params: Iterable[torch.Tensor], predict: Predict, schedule: NoiseSchedule, images: TrainingSet,
                      cond_cache: Any, config: StageConfig, prior: PriorPreservation | None = None,
                      on_progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None,
                      seed: int | None = 1, mixed_precision: str = "no") -> TuneResult:
    """Stage 2: fine-tune denoiser parameters ``params`` (a LoRA's, or the weights of a copy) on the cached prompt
    encodings ``cond_cache`` (batch dim = number of prompts); the text encoder is not run at all."""
    num_prompts = _batch_len(cond_cache)
    device = images.mean.device
    index_gen, noise_gen = _generators(device, seed)
    sampler = BatchSampler(len(images), config.batch_size, index_gen)
    prior_sampler = BatchSampler(len(prior.images), config.batch_size, index_gen) if prior is not None else None
    num_class_prompts = _batch_len(prior.cond) if prior is not None else 0

    def loss_fn(step: int) -> torch.Tensor:
        idx = sampler.next()
        cond = take(cond_cache, torch.randint(num_prompts, (len(idx),), generator=index_gen))
        x0, masks = images.x0(idx.to(device), noise_gen), images.mask(idx.to(device))
        if prior is None:
            return denoising_loss(predict, schedule, x0, cond, masks, noise_gen).mean()
        # one forward over instance + class images, as DreamBooth does
        cidx = prior_sampler.next()
        cx0 = prior.images.x0(cidx.to(device), noise_gen)
        ccond = take(prior.cond, torch.randint(num_class_prompts, (len(cidx),), generator=index_gen))
        if masks is not None:
            masks = torch.cat([masks, torch.ones_like(cx0[:, :1])])
        per = denoising_loss(predict, schedule, torch.cat([x0, cx0]), concat([cond, ccond]), masks, noise_gen)
        return per[: len(idx)].mean() + prior.weight * per[len(idx):].mean()

    return tune_loop(params, loss_fn, config.steps, config.lr, on_progress, should_cancel,
                     weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                     mixed_precision=mixed_precision)


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


@dataclass
class TwoStageResult:
    vectors: list[torch.Tensor]
    stage1: TuneResult | None
    stage2: TuneResult | None

    @property
    def status(self) -> str:
        for r in (self.stage1, self.stage2):
            if r is not None and r.status != DONE:
                return r.status
        return DONE


def two_stage(init_vectors: Sequence[torch.Tensor], encode: Encode, predict: Predict, schedule: NoiseSchedule,
              images: TrainingSet, num_prompts: int, config: QuickTuneConfig,
              stage2_params: Callable[[], Any] | None, *, run_stage1: bool = True,
              prior: Callable[[], PriorPreservation] | None = None, on_progress: Progress | None = None,
              should_cancel: Callable[[], bool] | None = None, seed: int = 0,
              mixed_precision: str = "no") -> TwoStageResult:
    """Run stage 1 then stage 2; a host supplies the callables. ``stage2_params()`` is a context manager that makes
    the denoiser trainable for stage 2 (attaches a LoRA, or swaps in a copy) and yields its parameters; None skips
    stage 2. ``run_stage1=False`` keeps ``init_vectors`` (DreamBooth-style: the identifier's own token vectors).
    ``on_progress(done, total, loss)`` counts steps over both stages. A stage that stops (cancel, NaN) ends the run."""
    s1 = config.stage1.steps if run_stage1 else 0
    s2 = config.stage2.steps if stage2_params is not None else 0
    total = s1 + s2

    def progress(offset):
        return None if on_progress is None else (lambda done, _n, loss: on_progress(offset + done, total, loss))

    vectors = [v.detach().clone().float() for v in init_vectors]
    r1 = r2 = None
    if run_stage1:
        vectors, r1 = learn_embedding(vectors, encode, predict, schedule, images, num_prompts, config.stage1,
                                      progress(0), should_cancel, seed, mixed_precision)
        if not r1.ok:
            return TwoStageResult(vectors, r1, None)
    if stage2_params is not None:
        cache = encode_all(encode, vectors, num_prompts, images.mean.device)
        prior_term = prior() if prior is not None else None
        with ExitStack() as stack:
            # the LoRA's random init from the run's seed, not from whatever the process's global RNG holds (in
            # ComfyUI: the samplers that ran before), so that one seed gives one result. Only the tune's own GPU is
            # forked: by default fork_rng forks (and warns about) every visible one
            device = images.mean.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + 2)
                params = stack.enter_context(stage2_params())
            r2 = finetune_denoiser(params, predict, schedule, images, cache, config.stage2, prior_term,
                                   progress(s1), should_cancel, seed + 1, mixed_precision)
    return TwoStageResult(vectors, r1, r2)


# ----------------------------------------------------------------------------------------------------------------
# output names


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A file-name stem with no directory parts and nothing a shell or ComfyUI's ``embedding:`` syntax trips on:
    letters, digits, '.', '_', '-'; no leading dot; at most 100 characters. Raises if nothing usable is left."""
    base = Path(str(name).replace("\\", "/")).name  # drops any directory part, "../" included
    if base.lower().endswith(".safetensors"):
        base = base[: -len(".safetensors")]
    clean = _UNSAFE.sub("_", base).strip("._-")[:100]
    if not clean or set(clean) <= {".", "_", "-"}:
        raise ValueError(f"output name {name!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    if clean != name:
        log.info("output name %r sanitised to %r", name, clean)
    return clean


def output_paths(out_dir: str | Path, name: str, kinds: Sequence[str], overwrite: bool = False) -> dict[str, Path]:
    """Paths of the files a run writes: kind "embedding" -> ``<name>.safetensors`` (the name is what ComfyUI's
    ``embedding:<name>`` and A1111's prompt word use), others -> ``<name>_<kind>.safetensors``. Refuses existing
    files unless ``overwrite``; checked before training so a long run never ends in a refusal."""
    stem = safe_name(name)
    out_dir = Path(out_dir)
    paths = {k: out_dir / (f"{stem}.safetensors" if k == "embedding" else f"{stem}_{k}.safetensors") for k in kinds}
    for p in paths.values():
        if out_dir.resolve() not in p.resolve().parents:
            raise ValueError(f"output {p} would leave the output folder {out_dir}")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass --overwrite (overwrite=True) to replace it, or choose another "
                                  f"--name")
    return paths


def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    """"auto" -> bf16 on a CUDA device that supports it, else full precision (on CPU bf16 autocast is slower for the
    toy world's small convolutions than fp32)."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"
