"""The ComfyUI host of two-stage quick-tune: what the nodes in quicktune.py do, written against ComfyUI's
objects (a ModelPatcher MODEL, a CLIP, a VAE, IMAGE/MASK tensors). The method itself is backend/quicktune.py
(``two_stage``); this file only hands it ComfyUI callables — encode, predict, the noise schedule, cached x0 — and
turns the result into patched clones and files. Nothing from ComfyUI is imported at module level, so the helpers
that need no ComfyUI are tested without it.

How training reaches ComfyUI's models without changing them:

- Both models are loaded as KSampler would load them (their own weight patches, e.g. LoRAs, applied). Nothing is
  written to any weight: stage 1 feeds the identifier's vectors into the prompt's token list, where ComfyUI itself
  accepts embedding tensors (that is how ``embedding:name`` works), and stage 2 adds the LoRA's output with forward
  hooks (backend/lora.py). Hooks, flags and helpers are removed in ``finally`` blocks, so a cancel leaves the input
  MODEL and CLIP exactly as they were.
- ComfyUI runs nodes under ``torch.inference_mode()``, so the loaded weights are inference tensors, which autograd may
  not save for backward. While training, each such layer gets a ComfyUI ``weight_function`` that hands its forward a
  normal copy of the weight (ComfyUI's own mechanism for per-forward weights: LoRA in low-VRAM mode, TrainLoraNode).
- ComfyUI's CLIP adds residuals in place (``x += ...``), which autograd refuses when the tensor was saved for
  backward; during the stage-1 text encoding, saved tensors are copied when saved (``saved_tensors_hooks``).

The result goes to clones: the MODEL gets the LoRA through ComfyUI's LoRA loader (``comfy.lora.load_lora`` with
``model_lora_keys_unet``, then ``add_patches``, as LoraLoader does), the CLIP a "set" patch on the identifier's row of
each token-embedding table (SDXL: CLIP-L and CLIP-G). The same vectors go into a textual-inversion embedding that
stock ComfyUI loads as ``embedding:name``, and the LoRA into a kohya-format file stock LoraLoader and A1111 load.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.utils.checkpoint

from ...backend import quicktune as qt
from ...backend import files
from ...backend import tune
from ...backend.embedding import Embedding, embedding_metadata, save_embedding
from ...backend.identifier import DEFAULT_IDENTIFIER
from ...backend.lora import LoRA, LoRATensors, lora_tensors
from ...backend.identifier import DEFAULT_TEMPLATE, check_identifier
from ...backend.tune import resolve_mixed_precision
from .common import model_name
from .common import (Progress, PromptEncoder, apply_embedding, apply_lora, check_model, checkpointed,
                     diffusers_names, encode_images, frozen, make_predict, noise_schedule, prepare, send_text,
                     text_slots, token_ids, trainable)


log = logging.getLogger(__name__)
NAME_FIELDS = ("ss_output_name", "modelspec.title")  # metadata that names the file (kohya, SAI model spec)


# ----------------------------------------------------------------------------------------------------------------------
# the node's work


@dataclass
class QuickTuneOutput:
    """What Quick-Tune Concept returns: patched clones, the learned embedding and LoRA, and a report."""
    model: object
    clip: object
    embedding: Embedding
    lora: LoRATensors | None
    status: str
    report: str
    stage1: tune.TuneResult | None = None
    stage2: tune.TuneResult | None = None


def _stage_line(name: str, r: tune.TuneResult | None, steps: int) -> str:
    if r is None:
        return f"{name}: not run"
    losses = f", loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}" if r.losses else ""
    return f"{name}: {r.steps}/{steps} steps{losses}, {r.seconds:.1f} s"


def quick_tune(model, clip, vae, images, class_noun: str, identifier: str = DEFAULT_IDENTIFIER, init_word: str = "",
               masks=None, embedding_steps: int = 100, embedding_lr: float = 5e-3, denoiser_steps: int = 300,
               denoiser_lr: float = 1e-4, rank: int = 4, resolution: int = 512, seed: int = 0,
               gradient_checkpointing: bool = False) -> QuickTuneOutput:
    """Two-stage quick-tune of one subject on ComfyUI's MODEL/CLIP/VAE; the inputs are never changed.

    Stage 1 (``embedding_steps`` > 0) learns the identifier's input vector(s) from ``init_word`` (default: the class
    noun); stage 2 (``denoiser_steps`` > 0) trains a rank-``rank`` LoRA with the text encoder frozen. The training
    prompt is "a photo of {identifier} {class_noun}". Raises on bad input; a NaN loss stops training and returns the
    last good state with a message; ComfyUI's Cancel raises within one step. ``gradient_checkpointing`` trades time
    for memory (:func:`checkpointed`); the result is the same."""
    import comfy.model_management as mm

    started = time.time()
    class_noun = (class_noun or "").strip()
    if not class_noun:
        raise ValueError("class noun is empty: write what the subject is, e.g. 'cat', 'dog' or 'person'")
    identifier = check_identifier((identifier or "").strip(), class_noun)
    if embedding_steps <= 0 and denoiser_steps <= 0:
        raise ValueError("nothing to do: both embedding_steps and denoiser_steps are 0")
    for name, lr in (("embedding_lr", embedding_lr), ("denoiser_lr", denoiser_lr)):
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{name} must be a positive number, got {lr}")
    family, prediction_type = check_model(model)
    default = qt.QuickTuneConfig.sd()
    config = qt.QuickTuneConfig.sd(stage1=replace(default.stage1, steps=max(embedding_steps, 0), lr=embedding_lr),
                                   stage2=replace(default.stage2, steps=max(denoiser_steps, 0), lr=denoiser_lr),
                                   rank=rank, gradient_checkpointing=gradient_checkpointing)
    run_stage1, run_stage2 = embedding_steps > 0, denoiser_steps > 0
    slots = text_slots(clip, family, model)
    identifier_ids = token_ids(clip, slots, identifier, "identifier")
    init_word = (init_word or "").strip() or class_noun
    init_ids = token_ids(clip, slots, init_word, "init word") if run_stage1 else identifier_ids
    prompt = DEFAULT_TEMPLATE.format(identifier=identifier, class_noun=class_noun)
    device = model.load_device
    mixed = resolve_mixed_precision(config.mixed_precision, torch.device(device))

    # TrainLoraNode's pattern: ComfyUI runs nodes in inference mode; training needs it off
    with torch.inference_mode(False):
        pixels, pmasks, note = prepare(images, masks, resolution)
        if note:
            log.info("Quick-Tune: %s", note)
        mm.throw_exception_if_processing_interrupted()
        data = encode_images(vae, model, pixels, pmasks, device)
        mm.load_models_gpu([model, clip.patcher])  # as for sampling: the inputs' own weight patches applied
        dm = model.get_model_object("diffusion_model")
        init_vectors = [s.layer.weight[i].detach().float().clone().reshape(1, -1) for s, i in zip(slots, init_ids)]
        encoder = PromptEncoder(clip, slots, [prompt], identifier, identifier_ids, model, resolution)
        progress = Progress(config.stage1.steps * run_stage1 + config.stage2.steps * run_stage2,
                            config.stage1.steps if run_stage1 else 0)
        lora = None

        @contextmanager
        def stage2_params():
            nonlocal lora
            lora = LoRA.for_model(dm, rank=config.rank, alpha=config.alpha, device=device)
            with lora.attach(dm):
                yield list(lora.parameters())

        mm.throw_exception_if_processing_interrupted()
        with frozen(dm, clip.cond_stage_model), trainable(dm, clip.cond_stage_model), \
                checkpointed(dm, gradient_checkpointing):
            out = qt.two_stage(init_vectors, encoder, make_predict(model), noise_schedule(model, prediction_type),
                               data, encoder.num_prompts, config, stage2_params if run_stage2 else None,
                               run_stage1=run_stage1, on_progress=progress, seed=seed, mixed_precision=mixed)

        r1, r2 = out.stage1, out.stage2
        # in the dtype of each token table (fp16 in most checkpoints): the returned CLIP's row and the saved
        # embedding then hold the same numbers, so "sks" and "embedding:<name>" encode identically
        vectors = [v.to(s.layer.weight.dtype).float() for s, v in zip(slots, out.vectors)]
        training = qt.training_record(
            config, out, run_stage1=run_stage1, run_stage2=run_stage2, class_noun=class_noun,
            init_word=init_word if run_stage1 else "", prompts=[DEFAULT_TEMPLATE], num_images=len(pixels),
            num_class_images=0, resolution=resolution, seed=seed, mixed_precision=mixed, masked=masks is not None,
            started=started, host="comfyui", base_model=model_name(model), name=identifier)
        embedding = Embedding({s.key: v.detach().cpu() for s, v in zip(slots, vectors)}, family, identifier,
                              training["init_word"])
        embedding.metadata = embedding_metadata(embedding, training, prediction_type)
        lora_out = None
        model_out = model.clone()
        if lora is not None and r2 is not None:
            lora_out = lora_tensors(lora.cpu(), family, identifier, training, prediction_type,
                                    names=diffusers_names(model, lora))
            model_out = apply_lora(model, lora_out)
        # DreamBooth-style (no stage 1) keeps the identifier's own vectors: the CLIP needs no patch
        clip_out = apply_embedding(clip, slots, identifier_ids, vectors) if run_stage1 else clip.clone()

    lines = [_stage_line("stage 1 (embedding)", r1, config.stage1.steps if run_stage1 else 0),
             _stage_line("stage 2 (denoiser LoRA)", r2, config.stage2.steps if run_stage2 else 0)]
    if note:
        lines.append(f"note: {note}")
    for r in (r1, r2):
        if r is not None and r.status == tune.NAN:
            lines.append(f"stopped: {r.message}; the outputs hold that last good state"
                         + ("" if r is r2 or not run_stage2 else "; the denoiser was not tuned"))
    report = "Quick-Tune " + ("finished" if out.status == tune.DONE else f"stopped ({out.status})") + ": " + \
        "; ".join(lines)
    (log.warning if out.status != tune.DONE else log.info)("%s", report)
    send_text(report)
    return QuickTuneOutput(model_out, clip_out, embedding, lora_out, out.status, report, r1, r2)


def save_concept(embedding: Embedding | None, lora: LoRATensors | None, name: str, overwrite: bool,
                 embeddings_dir: str | Path, loras_dir: str | Path, e4t_concept=None,
                 concepts_dir: str | Path | None = None) -> list[Path]:
    """Write the embedding to ``<embeddings_dir>/<name>.safetensors`` (``embedding:<name>`` in ComfyUI, ``<name>`` in
    A1111), the LoRA to ``<loras_dir>/<name>_lora.safetensors`` and an E4T concept (hosts.comfy.e4t.TunedConcept)
    compactly to ``<concepts_dir>/<name>_e4t.safetensors``. The name is sanitised (no folders, no traversal);
    existing files are refused unless ``overwrite``, before anything is written."""
    if embedding is None and lora is None and e4t_concept is None:
        raise ValueError("Save Concept got nothing to save: connect the concept output of E4T Tune, or the "
                         "embedding and/or LoRA output of Quick-Tune Concept or E4T Tune")
    if embedding is not None and not isinstance(embedding, Embedding):
        raise TypeError(f"embedding must be a BoothKit embedding, got {type(embedding).__name__}")
    if lora is not None and not isinstance(lora, LoRATensors):
        raise TypeError(f"lora must be a BoothKit LoRA, got {type(lora).__name__}")
    stem = files.safe_name(name)
    targets = []
    if embedding is not None:
        path = files.output_paths(embeddings_dir, stem, ["embedding"], overwrite=True)["embedding"]
        targets.append((embedding, path))
    if lora is not None:
        targets.append((lora, files.output_paths(loras_dir, stem, ["lora"], overwrite=True)["lora"]))
    if e4t_concept is not None:
        targets.append((e4t_concept, files.output_paths(concepts_dir, stem, ["e4t"], overwrite=True)["e4t"]))
    existing = [str(p) for _, p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"Save Concept: {' and '.join(existing)} already exist(s); turn on 'overwrite' to "
                              f"replace, or choose another name (nothing was written)")
    written = []
    for value, path in targets:
        if not isinstance(value, (Embedding, LoRATensors)):  # the E4T concept writes its own compact file
            written.append(value.save(path, overwrite=True))
            log.info("Save Concept: wrote %s", path)
            continue
        # the file's name is chosen here, after training: kohya's name fields follow it (the inputs stay as they are,
        # ComfyUI may hand them to other nodes)
        meta = {**value.metadata, **{k: stem for k in NAME_FIELDS if k in value.metadata}}
        if isinstance(value, Embedding):
            written.append(save_embedding(path, replace(value, metadata=meta), overwrite=True))
        else:
            written.append(LoRATensors(value.tensors, meta).save(path, overwrite=True))
        log.info("Save Concept: wrote %s", path)
    return written
