"""Two-stage quick-tune: textual inversion of the identifier, then DreamBooth-style denoiser fine-tuning.

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
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from .tune import (BatchSampler, DONE, Encode, NoiseSchedule, Predict, Progress, TrainingSet, TuneResult, _batch_len,
                   _generators, concat, denoising_loss, encode_all, take, tune_loop)



log = logging.getLogger(__name__)


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
    """Both stages' settings. :meth:`sd` is the paper's setting for Stable Diffusion (the toy world's is
    ``toyworld.methods.quicktune_config``):

    ==================  ==========================================
    defaults            ``sd()`` (SD1.x/SD2.x/SDXL)
    ==================  ==========================================
    stage 1             100 steps, lr 5e-3 (paper), batch 4
    stage 2, LoRA       300 steps, lr 1e-4, batch 1, rank 4
    stage 2, full       300 steps, lr 5e-6 (paper), batch 1
    mixed precision     auto: bf16 on CUDA with bf16, else none
    ==================  ==========================================

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

    def to_dict(self) -> dict:
        return asdict(self)


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


def training_record(config: QuickTuneConfig, out: TwoStageResult, *, run_stage1: bool, run_stage2: bool,
                    class_noun: str, init_word: str, prompts: Sequence[str], num_images: int, num_class_images: int,
                    resolution: int, seed: int, mixed_precision: str, masked: bool, started: float,
                    **host_fields) -> dict:
    """A run's settings and outcome, the ``training`` metadata of the files it writes; every host records the same
    keys (``host_fields`` adds the host's own, e.g. the base model's name)."""
    r1, r2 = out.stage1, out.stage2
    return {
        "method": "quicktune", "stages": [s for s, on in (("embedding", run_stage1), ("denoiser", run_stage2)) if on],
        "class_noun": class_noun, "prompts": list(prompts), "init_word": init_word, "num_images": num_images,
        "num_class_images": num_class_images, "resolution": resolution, "seed": seed,
        "mixed_precision": mixed_precision, "gradient_checkpointing": config.gradient_checkpointing,
        "mode": config.mode, "rank": config.rank, "alpha": config.rank if config.alpha is None else config.alpha,
        "conv_rank": config.conv_rank, "flip": config.flip, "masked_loss": masked,
        "stage1_steps": config.stage1.steps if run_stage1 else 0, "stage1_lr": config.stage1.lr,
        "stage1_batch_size": config.stage1.batch_size, "stage1_steps_done": r1.steps if r1 else 0,
        "stage2_steps": config.stage2.steps if run_stage2 else 0, "stage2_lr": config.stage2.lr,
        "stage2_batch_size": config.stage2.batch_size, "stage2_steps_done": r2.steps if r2 else 0,
        "status": out.status, "started_at": int(started), "finished_at": int(time.time()), **host_fields,
    }
