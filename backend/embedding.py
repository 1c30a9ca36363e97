"""Textual-inversion embedding files: the identifier's input token vectors learned in stage 1 of quick-tune.

The key layout is the one stock loaders read (kohya-ss/sd-scripts, A1111, ComfyUI's ``sd1_clip.load_embed``):
``emb_params`` [n, width] for one-encoder models (SD1.x, SD2.x, the toy world), ``clip_l`` [n, 768] and ``clip_g``
[n, 1280] for SDXL. ``n`` > 1 is a multi-vector embedding: in ComfyUI ``embedding:name`` and in A1111 ``name`` expand
to all n vectors in order. Nothing else goes into the tensors; what the file is goes into the metadata.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import FormatError, check_finite, check_version, read_safetensors, write_safetensors
from .lora import modelspec_metadata, ss_metadata

log = logging.getLogger(__name__)

EMBEDDING_FORMAT = "boothkit.embedding"
EMBEDDING_VERSION = 1

# base family -> the tensor key of each text encoder's vectors, in encoder order. Widths are never assumed: they
# come from the model (``load_embedding(widths=...)``); only a file without metadata is told apart by its width.
FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    "sd1": ("emb_params",),
    "sd2": ("emb_params",),
    "sdxl": ("clip_l", "clip_g"),
    "toy": ("emb_params",),
}


def keys_for(family: str) -> tuple[str, ...]:
    if family not in FAMILY_KEYS:
        raise ValueError(f"unknown base-model family {family!r}; expected one of {sorted(FAMILY_KEYS)}")
    return FAMILY_KEYS[family]


@dataclass
class Embedding:
    """The identifier's vectors, one [n, width] tensor per text encoder, keyed as in the file."""
    vectors: dict[str, torch.Tensor]
    family: str
    identifier: str
    init_word: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        want = keys_for(self.family)
        if set(self.vectors) != set(want):
            raise ValueError(f"a {self.family} embedding has the vectors {list(want)}, got {sorted(self.vectors)}")
        ns = set()
        for key in want:
            v = self.vectors[key]
            if v.ndim != 2 or v.shape[0] < 1:
                raise ValueError(f"embedding vectors '{key}' must be [num_vectors, width], got {tuple(v.shape)}")
            ns.add(v.shape[0])
        if len(ns) != 1:
            raise ValueError(f"every text encoder needs the same number of vectors, got "
                             f"{ {k: v.shape[0] for k, v in self.vectors.items()} }")

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def widths(self) -> dict[str, int]:
        return {k: int(v.shape[1]) for k, v in self.vectors.items()}


def embedding_metadata(embedding: Embedding, training: Mapping[str, object], prediction_type: str) -> dict[str, str]:
    e = embedding
    meta = {
        "format": EMBEDDING_FORMAT,
        "version": str(EMBEDDING_VERSION),
        "method": "quicktune",
        "family": e.family,
        "identifier": e.identifier,
        "init_word": e.init_word,
        "num_vectors": str(e.num_vectors),
        "widths": json.dumps(e.widths(), sort_keys=True),
        "training": json.dumps(dict(training), sort_keys=True, default=str),
        "ss_learning_rate": str(training.get("stage1_lr", "")),
        "ss_max_train_steps": str(training.get("stage1_steps", "")),
        "ss_steps": str(training.get("stage1_steps_done", training.get("stage1_steps", ""))),
        "ss_textual_inversion_token": e.identifier,
        "ss_textual_inversion_init_word": e.init_word,
        "ss_textual_inversion_num_vectors_per_token": str(e.num_vectors),
    }
    meta.update(ss_metadata(e.family, training, prediction_type))
    meta.update(modelspec_metadata(e.family, "textual-inversion", str(training.get("name", e.identifier)),
                                   training.get("resolution"), prediction_type))
    return meta


def save_embedding(path: str | Path, embedding: Embedding, training: Mapping[str, object] | None = None,
                   prediction_type: str = "epsilon", overwrite: bool = False) -> Path:
    """Write ``embedding``. Without ``training``, an embedding that already carries BoothKit metadata (set by the
    node that trained it, or read from a file) is written with that metadata unchanged."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in embedding.vectors.items()}
    if training is None and embedding.metadata.get("format") == EMBEDDING_FORMAT:
        meta = dict(embedding.metadata)
    else:
        meta = embedding_metadata(embedding, training or {}, prediction_type)
    return write_safetensors(path, tensors, meta)


def _guess_family(path, tensors: Mapping[str, torch.Tensor]) -> str:
    if set(tensors) == {"clip_l", "clip_g"}:
        return "sdxl"
    if set(tensors) == {"emb_params"}:
        width = tensors["emb_params"].shape[-1]
        return {768: "sd1", 1024: "sd2"}.get(width, "toy")
    raise FormatError(f"{path}: tensors {sorted(tensors)} are not a textual-inversion embedding; expected "
                      f"'emb_params' (SD1/SD2) or 'clip_l' + 'clip_g' (SDXL)")


def load_embedding(path: str | Path, family: str | None = None, widths: Mapping[str, int] | None = None) -> Embedding:
    """Read an embedding file and check it against the model it is for (``family``; ``widths`` of its encoders).

    BoothKit files are validated field by field; a stock embedding without our metadata (kohya/A1111 safetensors
    with ``emb_params`` or ``clip_l``/``clip_g``) is accepted for its vectors."""
    tensors, meta = read_safetensors(path)
    check_finite(path, tensors)
    fmt = meta.get("format")
    if fmt is None:
        found = _guess_family(path, tensors)
        log.info("%s: an embedding without BoothKit metadata; taking it as a %s embedding", path, found)
        identifier, init_word = Path(path).stem, ""
    elif fmt != EMBEDDING_FORMAT:
        raise FormatError(f"{path}: metadata field 'format' is {fmt!r}, expected '{EMBEDDING_FORMAT}' (this file is "
                          f"not an embedding)")
    else:
        check_version(path, meta, EMBEDDING_VERSION)
        found = meta.get("family")
        if found not in FAMILY_KEYS:
            raise FormatError(f"{path}: metadata field 'family' is {found!r}, expected one of {sorted(FAMILY_KEYS)}")
        identifier, init_word = meta.get("identifier", Path(path).stem), meta.get("init_word", "")
    if family is not None and family != found:
        raise FormatError(f"{path}: this embedding is for a '{found}' model, but the model is '{family}'; "
                          f"train or pick an embedding for {family}")
    want = keys_for(found)
    if set(tensors) != set(want):
        raise FormatError(f"{path}: tensors {sorted(tensors)}, expected {list(want)} for a {found} embedding")
    for key, width in (widths or {}).items():
        if key in tensors and tensors[key].shape[-1] != width:
            raise FormatError(f"{path}: tensor '{key}' is {tensors[key].shape[-1]} wide, but the model's text encoder "
                              f"is {width} wide; the embedding is for another base model")
    vectors = {k: (v if v.ndim == 2 else v.reshape(-1, v.shape[-1])).float() for k, v in tensors.items()}
    try:
        return Embedding(vectors, found, identifier, init_word, dict(meta))
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
