"""The personalization methods as the toy-world evaluation and demo run them. Each method takes one subject (a few
reference images with masks) and returns ``generate(prompts, plain_prompts, seed) -> images``; the time spent before
it returns is the method's personalization time."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class ToyEnv:
    base: object  # hosts.loading.SDModel (pixel space)
    vision: object  # toy CLIP vision backbone
    instantbooth: object | None  # the shipped InstantBooth file, once trained
    identifier: str
    sample_steps: int = 25
    guidance: float = 4.0

    @classmethod
    def load(cls, sample_steps: int = 25) -> "ToyEnv":
        from ..backend.formats import load_instantbooth
        from ..hosts.loading import load_clip_vision, load_sd
        from . import domain, store

        base = load_sd("toy")
        ib = None
        try:
            ib = load_instantbooth(store.verified("instantbooth.safetensors"), family="toy",
                                   ctx_dim=base.ctx_dim).eval()
        except store.WeightsError as e:
            log.info("no trained InstantBooth for the toy world yet (%s)", e)
        from .base import DEFAULT_GUIDANCE

        return cls(base, load_clip_vision("toy"), ib, domain.IDENTIFIER, sample_steps, DEFAULT_GUIDANCE)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        from ..hosts.diffusers_host import encode_prompt

        return torch.cat([encode_prompt(self.base.text_encoder, self.base.tokenizer, p) for p in prompts])

    def sample(self, cond: torch.Tensor, seed: int) -> torch.Tensor:
        from ..hosts.sampling import sample

        return sample(self.base, cond, self.encode([""]), seed=seed, steps=self.sample_steps, guidance=self.guidance)


def base_model(env: ToyEnv, subject, seed: int):
    """No personalization: the class prompt alone (what the base model does without seeing the subject)."""
    def generate(prompts, plain_prompts, seed):
        return env.sample(env.encode(plain_prompts), seed)
    return generate


def instantbooth(env: ToyEnv, subject, seed: int):
    """Zero-shot: encode the reference images once, then sample with α·f_c at the identifier and the adapters."""
    from ..hosts.diffusers_host import InstantBoothHooks, condition_with_concept, encode_images

    ib = env.instantbooth
    if ib is None:
        raise ValueError("the toy world has no trained InstantBooth file yet; train it (README, 'Toy world')")
    with torch.no_grad():
        concept = ib.encode(*encode_images(env.vision, subject.images, subject.masks, ib),
                            class_noun=subject.noun)

    def generate(prompts, plain_prompts, seed):
        cond = torch.cat([condition_with_concept(env.encode([p]), env.base.tokenizer, p, concept, ib.config.alpha)
                          for p in prompts])
        with InstantBoothHooks(env.base.unet, ib, concept.f_p, ib.config.beta):
            return env.sample(cond, seed)
    return generate


METHODS = {
    "base": base_model,
    "instantbooth": instantbooth,
}
DEFAULT_METHODS = ["base", "instantbooth"]
