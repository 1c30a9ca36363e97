"""What a concept's files give `boothkit generate`, for one concept (generate.py) or several (concepts.py): the
shipped InstantBooth file, the checked prompt, the nouns an identifier goes before, the class noun a tune recorded,
and a LoRA or E4T weight-diff file as a context that applies it."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def default_instantbooth() -> Path:
    from ..toyworld.store import verified

    return verified("instantbooth.safetensors")


def checked_prompt(model, args, identifier: str | None, nouns, prompt: str | None = None) -> str:
    """The prompt (``args.prompt`` unless given) with the identifier, checked: a typo of the identifier where it goes
    is an error, other look-alikes and (on the toy world) words its captions never use are a one-line note each."""
    from ..backend.identifier import check_prompt_identifier

    known = ()
    toy = str(args.model) == "toy"
    if toy:
        from ..toyworld import domain

        known = domain.VOCAB
    prompt = args.prompt if prompt is None else prompt
    prompt, notes = (prompt, []) if identifier is None else check_prompt_identifier(prompt, identifier, nouns, known)
    if toy:
        unknown = domain.unknown_words(prompt, [identifier] if identifier else [])
        if unknown:
            notes.append(f"the toy world's captions never use {', '.join(map(repr, unknown))}: the toy model reads "
                         f"{'it' if len(unknown) == 1 else 'them'} as noise (it knows: {domain.vocabulary_summary()})")
    for note in notes:
        log.warning("note: %s", note)
    return prompt


def subject_nouns(model, extra=()):
    """The nouns the identifier goes before: every known category's, the file's class noun, the toy world's robots."""
    from ..backend.identifier import class_nouns_for

    return class_nouns_for(None, extra=list(extra) + (["robot", "droid"] if model.family == "toy" else []))


def class_noun_of(metadata) -> list[str]:
    """The class noun a tune recorded in a file's training metadata (quick-tune's), as a list of 0 or 1."""
    import json

    try:
        noun = json.loads(metadata.get("training", "{}")).get("class_noun")
    except (ValueError, AttributeError):
        return []
    return [noun] if isinstance(noun, str) and noun else []


def lora_context(path, model, strength: float):
    """(a context manager factory applying the file, the identifier its metadata names or None)."""
    from ..backend.e4t import WEIGHT_DIFF_FORMAT, load_weight_diff
    from ..backend.files import read_safetensors
    from ..backend.lora import load_lora
    from ..hosts.diffusers.e4t import weight_diffs_applied
    from ..hosts.diffusers.quicktune import tuned

    _, meta = read_safetensors(path)
    if meta.get("format") == WEIGHT_DIFF_FORMAT or (meta.get("format") is None and
                                                   meta.get("ss_network_args", "").find('"full"') >= 0):
        diffs, meta = load_weight_diff(path, family=model.family)
        return (lambda: weight_diffs_applied(model, diffs, strength, str(path))), meta.get("identifier")
    f = load_lora(path, family=model.family)
    f.lora.resolve(model.unet)  # a LoRA for another model fails here, naming its layers, before any sampling
    return (lambda: tuned(model, lora=f.lora, multiplier=strength)), f.identifier
