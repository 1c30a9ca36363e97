"""The diffusers host of two-stage quick-tune: hands backend/quicktune.py callables over a diffusers model.

The model is a small object with ``unet`` (UNet2DConditionModel), ``text_encoder`` (transformers CLIPTextModel),
``tokenizer``, ``scheduler`` (DDPM-like: ``alphas_cumprod``, ``config.prediction_type``), ``vae`` (None = pixel space,
images in [-1, 1]), ``family`` ("sd1"/"sd2"/"sdxl"/"toy") and, for SDXL, ``text_encoder_2``/``tokenizer_2``.

How the identifier's vectors reach the real text encoder: instead of adding a token to the tokenizer and resizing the
embedding matrix (diffusers' textual_inversion.py, which then copies every other row back after each step), the
prompt is tokenized around the identifier, ``n`` placeholder positions are left where it stood, and a forward hook
on the encoder's token-embedding layer puts the vectors into those rows during the call. The vocabulary, the
tokenizer and every weight stay bit-identical (nothing is ever written to them), gradients reach only the vectors,
and a cancelled run has nothing to undo. The identifier never goes through the tokenizer, so any word works; an
init word of several tokens gives a multi-vector embedding (one vector per token, as A1111 does), which ComfyUI's
``embedding:name`` and A1111 expand in order.
"""
from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...backend import quicktune as qt
from ...backend import files
from ...backend import tune
from ...backend.embedding import Embedding, save_embedding
from ...backend.files import write_safetensors
from ...backend.identifier import DEFAULT_IDENTIFIER, check_identifier, training_template
from ...backend.lora import LoRA, save_lora
from ...backend.preprocess import prepare_images
from ...backend.tune import resolve_mixed_precision
from .common import (PromptEncoder, TextSlot, cache_images, default_resolution, make_predict, schedule_of,
                     text_slots, word_ids)


log = logging.getLogger(__name__)

PAPER_INIT_WORD = "rare"  # the two-stage paper initialises "(rare)" from the word "rare"
UNET_FORMAT = "boothkit.unet"


# ----------------------------------------------------------------------------------------------------------------
# quick-tune on a diffusers model


@dataclass
class QuickTuneResult:
    """What :func:`quick_tune` learned. The input model is unchanged; use :func:`tuned` / :func:`encode_prompt`
    to sample with the result, :meth:`save` to write the files."""
    embedding: Embedding
    lora: LoRA | None
    unet_state: dict[str, torch.Tensor] | None
    stage1: tune.TuneResult | None
    stage2: tune.TuneResult | None
    prompts: list[str]
    training: dict = field(default_factory=dict)
    prediction_type: str = "epsilon"

    @property
    def status(self) -> str:
        for r in (self.stage1, self.stage2):
            if r is not None and r.status != tune.DONE:
                return r.status
        return tune.DONE

    @property
    def message(self) -> str:
        return "; ".join(r.message for r in (self.stage1, self.stage2) if r is not None and r.message)

    def paths(self, out_dir, name: str | None = None, overwrite: bool = False) -> dict[str, Path]:
        kinds = ["embedding"] + (["lora"] if self.lora is not None else []) + \
            (["unet"] if self.unet_state is not None else [])
        return files.output_paths(out_dir, name or self.embedding.identifier, kinds, overwrite)

    def save(self, out_dir, name: str | None = None, overwrite: bool = False) -> dict[str, Path]:
        """Write ``<name>.safetensors`` (the embedding), ``<name>_lora.safetensors`` (LoRA mode) or
        ``<name>_unet.safetensors`` (full mode: the fine-tuned denoiser, diffusers keys)."""
        paths = self.paths(out_dir, name, overwrite)
        training = dict(self.training, name=paths["embedding"].stem)
        e = self.embedding
        save_embedding(paths["embedding"], e, training, self.prediction_type, overwrite=overwrite)
        if "lora" in paths:
            save_lora(paths["lora"], self.lora, e.family, e.identifier, training, self.prediction_type,
                      overwrite=overwrite)
        if "unet" in paths:
            meta = {"format": UNET_FORMAT, "version": "1", "method": "quicktune", "family": e.family,
                    "identifier": e.identifier, "layout": "diffusers",
                    "training": json.dumps(training, sort_keys=True, default=str)}
            write_safetensors(paths["unet"], self.unet_state, meta)
        return paths


def _init_word(slots: Sequence[TextSlot], init_word: str | None, class_noun: str) -> tuple[str, list[list[int]]]:
    if init_word is None:
        # the paper's "rare" where the tokenizer knows it as one token, else the class noun
        for word in (PAPER_INIT_WORD, class_noun):
            ids = [word_ids(s.tokenizer, word) for s in slots]
            if all(len(i) == 1 for i in ids):
                return word, ids
        init_word = class_noun
    ids = [word_ids(s.tokenizer, init_word) for s in slots]
    if any(len(i) == 0 for i in ids):
        raise ValueError(f"init word {init_word!r} gives no tokens; use a real word such as 'rare' or the class noun")
    if len({len(i) for i in ids}) != 1:
        raise ValueError(f"init word {init_word!r} is {[len(i) for i in ids]} tokens for the two text encoders; "
                         f"choose a word both tokenize alike")
    if len(ids[0]) > 1:
        log.info("init word %r is %d tokens: the embedding gets %d vectors, one per token", init_word, len(ids[0]),
                 len(ids[0]))
    return init_word, ids


@contextmanager
def _gradient_checkpointing(unet, enabled: bool):
    was = getattr(unet, "is_gradient_checkpointing", False)
    if enabled and not was:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if enabled and not was:
            unet.disable_gradient_checkpointing()


def quick_tune(model, images, class_noun: str, *, identifier: str = DEFAULT_IDENTIFIER, init_word: str | None = None,
               masks=None, prompts: Sequence[str] | None = None, config: qt.QuickTuneConfig | None = None,
               class_images=None, class_prompts: Sequence[str] | None = None, stage1: bool = True,
               stage2: bool = True, resolution: int | None = None, on_progress: tune.Progress | None = None,
               should_cancel: Callable[[], bool] | None = None, seed: int = 0) -> QuickTuneResult:
    """Two-stage quick-tune of one subject on a diffusers model (the toy base included).

    ``images``: [3, H, W] tensors in [0, 1] (or a [N, 3, H, W] batch); ``masks`` optional [1, H, W] in [0, 1].
    ``prompts``: templates with ``{identifier}`` and ``{class_noun}`` (default: the paper's "a photo of {identifier}
    {class_noun}"; for the toy world "a photo of a {identifier} {class_noun}", its captions' style).
    ``stage1=False`` is DreamBooth-style (the identifier's own token vectors, frozen); ``stage2=False`` is textual
    inversion alone. ``class_images`` switch on prior preservation (weight
    ``config.prior_weight``) with ``class_prompts`` (default: the templates without the identifier).
    The model is never changed: stage 1 writes nothing to it, stage 2 trains a LoRA attached by hooks (or a copy of
    the UNet in full mode); requires_grad flags and gradient checkpointing are restored on exit."""
    if not stage1 and not stage2:
        raise ValueError("nothing to do: both stages are switched off")
    check_identifier(identifier, class_noun)
    config = config or qt.QuickTuneConfig.sd()
    started = time.time()
    device = model.unet.device
    mixed = resolve_mixed_precision(config.mixed_precision, device)
    resolution = resolution or default_resolution(model)
    slots = text_slots(model)

    templates = list(prompts) if prompts else [training_template(model.family)]
    texts = [t.format(identifier=identifier, class_noun=class_noun) for t in templates]
    if stage1:
        init_word, fill = _init_word(slots, init_word, class_noun)
    else:
        # DreamBooth-style: the identifier is written as itself; its own token rows, frozen
        init_word, fill = identifier, [word_ids(s.tokenizer, identifier) for s in slots]
        if len({len(f) for f in fill}) != 1:
            raise ValueError(f"identifier {identifier!r} tokenizes differently for the two text encoders")
    init_vectors = [s.text_encoder.get_input_embeddings().weight[torch.tensor(f, device=s.text_encoder.device)]
                    .detach().float().clone() for s, f in zip(slots, fill)]

    pixels, pmasks = prepare_images(images, resolution, masks)
    encoder = PromptEncoder.spliced(model, texts, identifier, fill, resolution)
    schedule = schedule_of(model)

    holder = {"unet": model.unet}
    predict = make_predict(holder)
    text_encoders = [s.text_encoder for s in slots]
    lora = None
    full_copy = None

    @contextmanager
    def stage2_params():
        nonlocal lora, full_copy
        if config.mode == "lora":
            lora = LoRA.for_model(model.unet, rank=config.rank, alpha=config.alpha, conv_rank=config.conv_rank,
                                  conv_alpha=config.conv_alpha)
            with lora.attach(model.unet):
                yield list(lora.parameters())
        else:
            full_copy = copy.deepcopy(model.unet).float()
            full_copy.requires_grad_(True)
            holder["unet"] = full_copy
            try:
                with _gradient_checkpointing(full_copy, config.gradient_checkpointing):
                    yield list(full_copy.parameters())
            finally:
                holder["unet"] = model.unet

    prior = None
    if class_images is not None:
        cpx, _ = prepare_images(class_images, resolution)
        ctexts = list(class_prompts) if class_prompts else \
            [re.sub(r"\s+", " ", t.replace("{identifier}", "")).strip().format(class_noun=class_noun)
             for t in templates]
        class_encoder = PromptEncoder.plain(model, ctexts, resolution)

        def prior():
            cond = tune.encode_all(class_encoder, [None] * len(slots), class_encoder.num_prompts, device)
            return qt.PriorPreservation(cache_images(model, cpx, None, config.flip), cond, config.prior_weight)

    with tune.frozen(model.unet, *text_encoders), _gradient_checkpointing(model.unet, config.gradient_checkpointing):
        data = cache_images(model, pixels, pmasks, config.flip)
        out = qt.two_stage(init_vectors, encoder, predict, schedule, data, encoder.num_prompts, config,
                           stage2_params if stage2 else None, run_stage1=stage1, prior=prior,
                           on_progress=on_progress, should_cancel=should_cancel, seed=seed, mixed_precision=mixed)

    embedding = Embedding({s.key: v.cpu() for s, v in zip(slots, out.vectors)}, model.family, identifier,
                          init_word if stage1 else "")
    r1, r2 = out.stage1, out.stage2
    training = qt.training_record(
        config, out, run_stage1=stage1, run_stage2=stage2, class_noun=class_noun, init_word=init_word,
        prompts=templates, num_images=len(pixels), num_class_images=0 if class_images is None else len(class_images),
        resolution=resolution, seed=seed, mixed_precision=mixed, masked=masks is not None, started=started,
        base_model=getattr(model, "name", ""))
    unet_state = None
    if full_copy is not None and r2 is not None:
        unet_state = {k: v.detach().cpu() for k, v in full_copy.state_dict().items()}
    return QuickTuneResult(embedding, lora if (stage2 and r2 is not None) else None, unet_state, r1, r2, texts,
                           training, schedule.prediction_type)


@contextmanager
def tuned(model, result: QuickTuneResult | None = None, lora: LoRA | None = None,
          unet_state: dict[str, torch.Tensor] | None = None, multiplier: float = 1.0):
    """Yield the denoiser to sample with: ``model.unet`` with the LoRA attached (removed on exit), a fine-tuned copy
    (full mode), or ``model.unet`` itself when there is nothing to apply (textual inversion alone)."""
    lora = lora or (result.lora if result is not None else None)
    unet_state = unet_state or (result.unet_state if result is not None else None)
    if unet_state is not None:
        unet = copy.deepcopy(model.unet)
        unet.load_state_dict(unet_state)
        yield unet.eval()
        return
    if lora is None:
        yield model.unet
        return
    old = lora.multiplier
    lora.multiplier = multiplier
    try:
        with lora.to(model.unet.device).attach(model.unet):
            yield model.unet
    finally:
        lora.multiplier = old

