"""`boothkit generate --concept ...`: several concepts in one image, each in its own region (issue #29).

  --concept KIND=PATH[,identifier=WORD][,box=X0:Y0:X1:Y1 | ,mask=FILE.png][,prompt=TEXT]      (repeatable)

KIND  images     InstantBooth, zero-shot: a folder of photos (NAME_mask.png beside), or one image
      quicktune  quick-tune's NAME.safetensors (the embedding), with NAME_lora.safetensors beside when it exists
      e4t        a tuned E4T concept, NAME_e4t.safetensors
identifier  the word the concept is bound to (default: its file's); every concept needs its own (sks, zwx, vvk)
box         the region as fractions of the image, left:top:right:bottom (default: the whole image)
mask        the region as a grey PNG (white inside), resampled to the image by area
prompt      the region's own prompt (composite mode; last, so it may hold commas); default --prompt

--regions-mode composite (default): at every step each region's noise prediction comes from its own prompt with only
its own concept's weights or adapters on, weighted by its mask (the rest: --prompt without any concept). residual
(InstantBooth only): one pass of --prompt, which names every identifier, each concept's token at its identifier and
its adapter term only inside its region."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KINDS = ("images", "quicktune", "e4t")
KEYS = ("identifier", "box", "mask", "prompt")


@dataclass
class ConceptSpec:
    kind: str
    path: Path
    identifier: str | None = None
    box: tuple[float, float, float, float] | None = None
    mask: Path | None = None
    prompt: str | None = None
    lora: Path | None = field(default=None)  # quicktune: NAME_lora.safetensors beside, when present


def parse_concept(text: str) -> ConceptSpec:
    """One --concept value; a ValueError names what is wrong (argparse makes it one line, exit 2)."""
    head, _, rest = text.partition(",")
    kind, eq, path = head.partition("=")
    if not eq or kind not in KINDS or not path:
        raise ValueError(f"{text!r}: expected KIND=PATH first, KIND one of {', '.join(KINDS)}")
    spec = ConceptSpec(kind, Path(path))
    while rest:
        key, eq, value = rest.partition("=")
        key = key.strip()
        if not eq or key not in KEYS:
            raise ValueError(f"{text!r}: unknown setting {key!r}; expected one of {', '.join(KEYS)} (KEY=VALUE)")
        if key == "prompt":  # the rest of the value, commas included
            spec.prompt, rest = value, ""
            continue
        value, _, rest = value.partition(",")
        if key == "identifier":
            if not re.fullmatch(r"[A-Za-z][\w\-]*", value):
                raise ValueError(f"{text!r}: identifier {value!r} must be one word")
            spec.identifier = value
        elif key == "box":
            from ..backend.regions import box_mask

            try:
                spec.box = tuple(float(v) for v in value.split(":"))
            except ValueError:
                raise ValueError(f"{text!r}: box {value!r} is not four numbers x0:y0:x1:y1") from None
            if len(spec.box) != 4:
                raise ValueError(f"{text!r}: box {value!r} is not four numbers x0:y0:x1:y1")
            box_mask(spec.box, 1, 1)  # fractions within [0, 1], x0 < x1, y0 < y1
        else:
            spec.mask = Path(value)
    if spec.box is not None and spec.mask is not None:
        raise ValueError(f"{text!r}: give the region as a box or as a mask, not both")
    for what, p in (("file", spec.path), ("mask", spec.mask)):
        if p is not None and not p.exists():
            raise ValueError(f"{text!r}: no such {what} {p}")
    if spec.kind == "quicktune":
        beside = spec.path.with_name(spec.path.stem + "_lora.safetensors")
        spec.lora = beside if beside.is_file() else None
    return spec


def repeated(words: list[str]) -> list[str]:
    """The words given more than once (an identifier two concepts would share)."""
    return sorted({w for w in words if words.count(w) > 1})


def check_specs(specs: list[ConceptSpec], mode: str) -> None:
    twice = repeated([s.identifier for s in specs if s.identifier])
    if twice:
        raise ValueError(f"identifier {twice[0]!r} is given to two concepts; give each its own (e.g. sks, zwx, vvk)")
    if mode == "residual":
        other = [s.kind for s in specs if s.kind != "images"]
        if other:
            raise ValueError(f"--regions-mode residual limits InstantBooth's adapters (images=...) within one pass; "
                             f"{other[0]} concepts are weights and go through composite (the default)")
        if any(s.prompt for s in specs):
            raise ValueError("--regions-mode residual samples one prompt (--prompt); prompt= goes with composite")


def region_of(spec: ConceptSpec, height: int, width: int) -> torch.Tensor:
    from ..backend.imageio import read_image
    from ..backend.regions import at_size, box_mask, check_mask

    if spec.mask is not None:
        return at_size(check_mask(read_image(spec.mask, "L")[0]), height, width)
    return box_mask(spec.box or (0, 0, 1, 1), height, width)


@dataclass
class Loaded:
    """A concept ready to sample: its identifier, the nouns it goes before, ``condition(cond, prompt)`` for an
    encoded prompt (InstantBooth's α·f_c; None: the prompt is encoded with ``embedding``), its weights or hooks."""
    identifier: str
    nouns: list
    embedding: object = None
    condition: object = None
    applied: object = None  # () -> context manager yielding the denoiser
    hooks: object = None  # InstantBooth: (region) -> InstantBoothHooks, attached


def load(spec: ConceptSpec, model, args, device, shared: dict) -> Loaded:
    """The concept of one spec on ``model`` (its identifier the spec's, else its file's)."""
    import dataclasses

    from .concept_files import class_noun_of, lora_context

    if spec.kind == "images":
        from ..backend.imageio import read_images_and_masks
        from ..hosts.diffusers.instantbooth import condition_with_concept, encode_images, sampling_hooks

        ib, vision = shared["instantbooth"](), shared["vision"]()
        images, masks = read_images_and_masks(spec.path)
        concept = ib.encode(*encode_images(vision, images, masks, ib))
        concept = dataclasses.replace(concept, identifier=spec.identifier or concept.identifier)
        alpha = ib.config.alpha if args.alpha is None else args.alpha
        beta = ib.config.beta if args.beta is None else args.beta
        enabled = ib.config.layout.select(skip_levels=args.skip_levels)

        def hooks(region=None):
            return sampling_hooks(model, ib, concept.f_p, beta, enabled, region, args.start_percent, args.end_percent)
        composite = hooks()
        composite.remove()  # on only while its own region's prediction is computed
        return Loaded(concept.identifier, ib.config.subject_nouns(),
                      condition=lambda cond, prompt: condition_with_concept(cond, model.tokenizer, prompt, concept,
                                                                            alpha),
                      applied=composite.attached, hooks=hooks)
    if spec.kind == "quicktune":
        from ..backend.embedding import load_embedding
        from ..hosts.diffusers.common import text_slots

        e = load_embedding(spec.path, family=model.family, widths={s.key: s.width for s in text_slots(model)})
        applied = None
        if spec.lora is not None:
            applied, _ = lora_context(spec.lora, model, args.lora_strength)
        else:
            log.info("%s: no %s beside it; the embedding alone", spec.path, spec.path.stem + "_lora.safetensors")
        e = dataclasses.replace(e, identifier=spec.identifier or e.identifier)
        return Loaded(e.identifier, class_noun_of(e.metadata), embedding=e, applied=applied)
    from ..hosts.diffusers.e4t import load_concept, offsets_applied

    c = load_concept(spec.path, model)
    e = dataclasses.replace(c.embedding, identifier=spec.identifier or c.identifier)
    return Loaded(e.identifier, [c.class_word], embedding=e, applied=lambda: offsets_applied(model, c.offsets))


def generate_concepts(model, args, guidance: float, device) -> torch.Tensor:
    """The image of ``args.concept`` (parsed specs) on ``model``: composite or residual (``args.regions_mode``)."""
    from functools import lru_cache

    from ..backend.instantbooth import load_instantbooth
    from ..hosts.diffusers.common import default_resolution, encode_prompt
    from ..hosts.diffusers.instantbooth import encode_prompt as encode_plain
    from ..hosts.diffusers.regions import Region, sample_regions
    from ..hosts.diffusers.sampling import sample
    from .concept_files import checked_prompt, default_instantbooth, subject_nouns
    from .models import load_vision

    if model.family == "sdxl":
        raise ValueError("several concepts in one image sample with the plain SD1.x/SD2.x/toy sampler; not SDXL yet")
    height = args.height or default_resolution(model)
    width = args.width or default_resolution(model)
    # loaded once, by the first images concept
    shared = {"instantbooth": lru_cache(None)(lambda: load_instantbooth(
        args.instantbooth or default_instantbooth(), family=model.family, ctx_dim=model.ctx_dim).eval().to(device)),
        "vision": lru_cache(None)(lambda: load_vision(args.clip_vision).to(device))}
    specs = args.concept
    concepts = [load(s, model, args, device, shared) for s in specs]
    idents = [c.identifier for c in concepts]
    twice = repeated(idents)  # the files' own identifiers, known only now
    if twice:
        raise ValueError(f"two concepts are bound to the identifier {twice[0]!r} (their files'); give one of them "
                         f"another with identifier=WORD, e.g. identifier=zwx")
    regions = [region_of(s, height, width) for s in specs]
    n = args.num_images
    with torch.no_grad():
        uncond = encode_plain(model.text_encoder, model.tokenizer, args.negative_prompt)
        if args.regions_mode == "residual":
            missing = [i for i in idents if not re.search(rf"(?<!\w){re.escape(i)}(?!\w)", args.prompt, re.I)]
            if missing:
                raise ValueError(f"--regions-mode residual samples one prompt: write every identifier in --prompt "
                                 f"(missing {', '.join(missing)}), e.g. 'a photo of a {idents[0]} cat with a "
                                 f"{idents[-1]} robot'")
            cond = encode_plain(model.text_encoder, model.tokenizer, args.prompt)
            for c in concepts:
                cond = c.condition(cond, args.prompt)
            log.info("prompt: %s  (%d concepts, residual)", args.prompt, len(concepts))
            hooks = [c.hooks(r) for c, r in zip(concepts, regions)]
            try:
                return sample(model, cond.expand(n, -1, -1), uncond, args.seed, args.steps, guidance,
                              height=height, width=width)
            finally:
                for h in hooks:
                    h.remove()
        parts = []
        for spec, c, region in zip(specs, concepts, regions):
            nouns = subject_nouns(model, c.nouns)
            prompt = checked_prompt(model, args, c.identifier, nouns, spec.prompt or args.prompt)
            log.info("region %s: %s", spec.box or spec.mask or "whole image", prompt)
            cond = c.condition(encode_plain(model.text_encoder, model.tokenizer, prompt), prompt) \
                if c.condition else encode_prompt(model, prompt, c.embedding)
            parts.append(Region(cond, region, c.applied))
        background = encode_plain(model.text_encoder, model.tokenizer, args.prompt)
    return sample_regions(model, parts, uncond, background, args.seed, args.steps, guidance, height=height,
                          width=width, batch=n)
