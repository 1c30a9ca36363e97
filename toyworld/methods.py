"""The personalization methods as the toy-world evaluation and demo run them. Each method takes one subject (a few
reference images with masks) and returns ``generate(prompts, plain_prompts, seed) -> images``; the time spent before
it returns is the method's personalization time."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ..backend.quicktune import QuickTuneConfig, StageConfig

log = logging.getLogger(__name__)


@dataclass
class ToyEnv:
    base: object  # hosts.loading.SDModel (pixel space)
    vision: object  # toy CLIP vision backbone
    instantbooth: object | None  # the shipped InstantBooth file, once trained
    e4t: object | None  # the shipped pre-trained E4T file, once trained
    identifier: str
    sample_steps: int = 25
    guidance: float = 4.0

    @classmethod
    def load(cls, sample_steps: int = 25) -> "ToyEnv":
        from ..backend.e4t import load_e4t
        from ..backend.instantbooth import load_instantbooth
        from .base import load_sd_model
        from .scorers import load_clip_vision
        from . import domain, store

        base = load_sd_model()
        ib = None
        try:
            ib = load_instantbooth(store.verified("instantbooth.safetensors"), family="toy",
                                   ctx_dim=base.ctx_dim).eval()
        except store.WeightsError as e:
            log.info("no trained InstantBooth for the toy world yet (%s)", e)
        e4t = None
        try:
            e4t = load_e4t(store.verified("e4t.safetensors"), family="toy")
        except store.WeightsError as e:
            log.info("no pre-trained E4T for the toy world yet (%s)", e)
        from .base import DEFAULT_GUIDANCE

        return cls(base, load_clip_vision()[0].eval(), ib, e4t, domain.IDENTIFIER, sample_steps, DEFAULT_GUIDANCE)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        from ..hosts.diffusers.instantbooth import encode_prompt

        return torch.cat([encode_prompt(self.base.text_encoder, self.base.tokenizer, p) for p in prompts])

    def sample(self, cond: torch.Tensor, seed: int, unet=None) -> torch.Tensor:
        import dataclasses

        from ..hosts.diffusers.sampling import sample

        model = self.base if unet is None else dataclasses.replace(self.base, unet=unet)
        return sample(model, cond, self.encode([""]), seed=seed, steps=self.sample_steps, guidance=self.guidance)


@dataclass
class Personalized:
    """One subject as a method made it: ``encode(prompts, identifier)`` -> the conditioning of prompts that carry
    ``identifier`` (any rare word: the concept is bound to it when the prompt is encoded), and ``applied(region)`` -> a
    context manager yielding the denoiser to sample with, the concept's weights or hooks on (``region``: InstantBooth's
    adapter term limited to it; the tuned methods' weights act everywhere and refuse one). ``plain``: the base model,
    which samples the prompts without the identifier."""
    encode: Callable[[list[str], str], torch.Tensor]
    applied: Callable[..., AbstractContextManager]
    plain: bool = False
    # InstantBooth: α·f_c put at the identifier's rows of prompts already encoded (several concepts in one prompt)
    inject: Callable[[torch.Tensor, list[str], str], torch.Tensor] | None = None

    def generate(self, env: ToyEnv):
        def generate(prompts, plain_prompts, seed):
            with torch.no_grad():
                cond = self.encode(plain_prompts if self.plain else prompts, env.identifier)
            with self.applied() as unet:
                return env.sample(cond, seed, unet=unet)
        return generate


def _everywhere(context):
    """``applied`` of a concept whose weights cannot be limited to a region."""
    def applied(region=None):
        if region is not None:
            raise ValueError("this method's weights act on the whole image; limit it to a region by compositing")
        return context()
    return applied


def generating(make):
    """A method as the single-subject evaluation and the demo call it: ``(env, subject, seed) -> generate(prompts,
    plain_prompts, seed)``."""
    def method(env: ToyEnv, subject, seed: int):
        return make(env, subject, seed).generate(env)
    return method


def base_model(env: ToyEnv, subject, seed: int) -> Personalized:
    """No personalization: the class prompt alone (what the base model does without seeing the subject)."""
    return Personalized(lambda prompts, identifier: env.encode(prompts),
                        _everywhere(lambda: nullcontext(env.base.unet)), plain=True)


def instantbooth_concept(token: bool = True, adapters: bool = True):
    """Zero-shot: encode the reference images once, then sample with α·f_c at the identifier and the adapters.
    ``token=False`` keeps the identifier's own text encoding (no concept token; ours: the adapters alone);
    ``adapters=False`` is the paper's "w/o adapter" ablation at inference (β = 0: the concept token alone)."""
    def method(env: ToyEnv, subject, seed: int) -> Personalized:
        from ..hosts.diffusers.instantbooth import condition_with_concept, encode_images, sampling_hooks

        ib = env.instantbooth
        if ib is None:
            raise ValueError("the toy world has no trained InstantBooth file yet; train it (README, 'Toy world')")
        with torch.no_grad():
            concept = ib.encode(*encode_images(env.vision, subject.images, subject.masks, ib),
                                class_noun=subject.noun)
        beta = ib.config.beta if adapters else 0.0

        def inject(cond, prompts, identifier):
            if not token:
                return cond
            c = dataclasses.replace(concept, identifier=identifier)
            return torch.cat([condition_with_concept(cond[i:i + 1], env.base.tokenizer, p, c, ib.config.alpha)
                              for i, p in enumerate(prompts)])

        @contextmanager
        def applied(region=None):
            with sampling_hooks(env.base, ib, concept.f_p, beta, region=region):
                yield env.base.unet
        return Personalized(lambda prompts, identifier: inject(env.encode(prompts), prompts, identifier), applied,
                            inject=inject)
    return method


def _embedding_encoder(env: ToyEnv, embedding):
    """``encode`` of a learnt embedding: its vectors at whatever identifier the prompts carry. None: the identifier's
    own token, DreamBooth-style, which the denoiser learnt for ``env.identifier`` only (another word is not bound)."""
    def encode(prompts, identifier):
        from ..hosts.diffusers.common import encode_prompt

        e = None if embedding is None else dataclasses.replace(embedding, identifier=identifier)
        return torch.cat([encode_prompt(env.base, p, e) for p in prompts])
    return encode


def quicktune_config(**overrides) -> QuickTuneConfig:
    """Quick-tune's settings for the toy world (32x32 pixel-space base, 64-wide CLIP): the paper's step counts (100 +
    200), a batch of 4 and a rank-8 LoRA on the attention layers at 1e-3 (a tiny model learns from fewer, larger
    updates); a full fine-tune at 1e-4; no mixed precision (bf16 gains ~7% there on CPU). Stage 1 at 1e-3, not the
    paper's 5e-3: on the development identities (8 contexts each) the embedding learnt at 5e-3 cost the pair 32 % of
    the base's alignment on the context words (0.68 x, identity 0.789), at 1e-3 11 % (0.89 x, identity 0.811;
    `boothkit eval --dev --methods quicktune --subjects 8 --contexts 8 --samples 1`). About a minute on two CPU
    threads (stage-1 and stage-2 steps measured at 0.18 s and 0.28 s on two threads of an otherwise idle server
    CPU)."""
    base = dict(stage1=StageConfig(steps=100, lr=1e-3, batch_size=4),
                stage2=StageConfig(steps=200, lr=1e-3, batch_size=4, weight_decay=1e-2, max_grad_norm=1.0),
                rank=8, mixed_precision="no")
    base.update(overrides)
    cfg = QuickTuneConfig(**base)
    if cfg.mode == "full" and "stage2" not in overrides:
        cfg.stage2 = StageConfig(steps=200, lr=1e-4, batch_size=4, weight_decay=1e-2, max_grad_norm=1.0)
    return cfg


def quicktune_concept(embedding: bool = True, denoiser: bool = True, photos: int | None = None, **overrides):
    """Two-stage quick-tune with the toy defaults (100 + 200 steps); the embedding stage alone is
    textual inversion, the denoiser stage alone DreamBooth-style fine-tuning. ``photos`` keeps only the subject's
    first photos (1: what E4T gets). ``overrides`` go to :func:`quicktune_config`."""
    def method(env: ToyEnv, subject, seed: int):
        from ..hosts.diffusers.quicktune import quick_tune, tuned

        result = quick_tune(env.base, subject.images[:photos], subject.noun, masks=subject.masks[:photos],
                            identifier=env.identifier, stage1=embedding, stage2=denoiser, seed=seed,
                            config=quicktune_config(**overrides))
        return Personalized(_embedding_encoder(env, result.embedding if embedding else None),
                            _everywhere(lambda: tuned(env.base, result)))
    return method


def e4t_concept(steps: int, pretrained: bool = True):
    """E4T (the E4T paper) from the subject's first image alone: the pre-trained encoder's prediction, then ``steps``
    tuning steps of the encoder and the weight offsets. ``pretrained=False`` is the ablation: the same tune from an
    untrained E4T of the shipped file's shape (prediction 0, Δ = 0), to show what the pre-training adds."""
    def method(env: ToyEnv, subject, seed: int):
        from ..backend.e4t import E4T
        from ..hosts.diffusers.e4t import e4t_tune

        if env.e4t is None:
            raise ValueError("the toy world has no pre-trained E4T file yet; train it (README, 'Toy world')")
        start = env.e4t
        if not pretrained:
            torch.manual_seed(seed)  # Δ's random V factors
            start = E4T(env.e4t.config)
        concept = e4t_tune(env.base, env.vision, start, subject.images[0], subject.masks[0], subject.noun,
                           steps=steps, seed=seed)
        return Personalized(_embedding_encoder(env, concept.embedding), _everywhere(lambda: concept.applied(env.base)))
    return method


def quicktune(embedding: bool = True, denoiser: bool = True, photos: int | None = None, **overrides):
    """:func:`quicktune_concept` as a single-subject method."""
    return generating(quicktune_concept(embedding, denoiser, photos, **overrides))


def e4t(steps: int, pretrained: bool = True):
    """:func:`e4t_concept` as a single-subject method."""
    return generating(e4t_concept(steps, pretrained))


# each method's concept maker (several concepts in one image compose these: toyworld/pairs.py)
CONCEPTS = {
    "base": base_model,
    "instantbooth": instantbooth_concept(),
    "instantbooth-token": instantbooth_concept(adapters=False),  # the paper's "w/o adapter": the concept token alone
    "instantbooth-adapters": instantbooth_concept(token=False),  # ours: the adapters alone, no concept token
    "quicktune": quicktune_concept(),
    "quicktune-stage1": quicktune_concept(denoiser=False),
    "quicktune-stage2": quicktune_concept(embedding=False),
    "quicktune-1photo": quicktune_concept(photos=1),  # the one photo E4T tunes on: the like-for-like comparison
    # a shorter budget so that `boothkit demo` stays within a minute on 2 CPU cores
    "quicktune-demo": quicktune_concept(stage1=StageConfig(steps=20, lr=5e-3, batch_size=4),
                                        stage2=StageConfig(steps=80, lr=1e-3, batch_size=4, weight_decay=1e-2,
                                                           max_grad_norm=1.0)),
    "e4t-0": e4t_concept(0),
    "e4t-5": e4t_concept(5),
    "e4t-15": e4t_concept(15),
    "e4t-15-untrained": e4t_concept(15, pretrained=False),
    # beyond the paper's 5-15 steps: how many steps the tune needs where 15 are not enough
    "e4t-30": e4t_concept(30),
    "e4t-60": e4t_concept(60),
}
METHODS = {name: generating(make) for name, make in CONCEPTS.items()}
instantbooth = METHODS["instantbooth"]  # the single-subject method toyworld/ib_checks.py runs
DEFAULT_METHODS = ["base", "instantbooth", "quicktune-stage1", "quicktune-stage2", "quicktune", "quicktune-1photo",
                   "e4t-0", "e4t-5", "e4t-15", "e4t-15-untrained"]
