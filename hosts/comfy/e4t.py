"""The ComfyUI host of E4T (the E4T paper): the E4T Tune node's work on ComfyUI's MODEL / CLIP / CLIP_VISION / VAE. The
method is backend/e4t.py (objective, tune, concept vectors); this file hands it ComfyUI callables and reuses the
quick-tune host for everything the two share: the text encoders and prompt encoding, the DDPM view of the UNet,
training on inference-mode weights without changing them, images, progress, and applying the result to clones
through ComfyUI's own weight patching (the offsets as ``.diff`` patches through LoraLoader's key mapping, the
embedding as a "set" patch on the identifier's token row)."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ...backend import e4t as e4t_backend
from ...backend import tune
from ...backend.e4t import E4T
from ...backend.embedding import Embedding, embedding_metadata
from ...backend.lora import BASE_MODEL_VERSIONS, LoRATensors
from ...backend.identifier import DEFAULT_TEMPLATE, check_identifier
from ...backend.preprocess import with_mirrors
from . import common
from .common import model_name

log = logging.getLogger(__name__)


def load(path: str | Path, model=None) -> E4T:
    """The E4T file at ``path``; with ``model``, a file pre-trained for another family is refused here, naming the
    file. The file's name goes with it (``source``) for later messages."""
    from ...backend.e4t import load_e4t

    e4t = load_e4t(path, family=None if model is None else common.model_family(model)).eval()
    e4t.source = Path(path).name
    return e4t


def encoder_blocks(dm) -> list[torch.nn.Module]:
    """The modules whose outputs end each resolution level of ComfyUI's UNet encoder (its downsamplers, then the last
    input block) and the middle block: the same outputs as diffusers' down blocks and mid block. The last layer of
    each block, because ComfyUI runs a block's layers one by one (forward_timestep_embed), never the block itself."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample

    ends = [i for i, b in enumerate(dm.input_blocks) if any(isinstance(layer, Downsample) for layer in b)]
    return [dm.input_blocks[i][-1] for i in ends + [len(dm.input_blocks) - 1]] + [dm.middle_block[-1]]


def offset_modules(model, targets) -> dict[str, torch.nn.Module]:
    """The E4T targets (diffusers module paths) -> ComfyUI's UNet modules, through ComfyUI's own key map."""
    import comfy.utils

    to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    dm = model.get_model_object("diffusion_model")
    return {n: dm.get_submodule(to_ldm[f"{n}.weight"][: -len(".weight")]) for n in targets if f"{n}.weight" in to_ldm}


def layer_weight(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ComfyUI layer's weight and bias for the input ``x`` as its own forward computes them (``cast_bias_weight``):
    moved to x's device and dtype, with the layer's weight functions applied — in low-VRAM mode the patches of a LoRA
    loaded before, which the stored weight does not hold, and in training the copies of inference tensors. A layer
    that is not one of ComfyUI's cast layers hands its own weight, copied if it is an inference tensor (autograd
    saves it for the offsets' gradient)."""
    if not hasattr(module, "weight_function"):
        return common.trainable_copy(module.weight).to(x), None if module.bias is None else module.bias.to(x)
    import comfy.ops

    return tuple(comfy.ops.cast_bias_weight(module, x)[:2])


def effective_weights(model, modules) -> dict[str, torch.Tensor]:
    """Each module's weight as the model computes with it (patches applied, in its compute dtype): the W of the
    weight diffs W ∘ Δ, the same W the tune saw."""
    dtype = getattr(model.model, "manual_cast_dtype", None)
    return {n: layer_weight(m, torch.empty(0, device=model.load_device, dtype=dtype or m.weight.dtype))[0]
            for n, m in modules.items()}


@torch.no_grad()
def class_tokens(clip_vision, pixels: torch.Tensor, masks: torch.Tensor | None, e4t: E4T) -> torch.Tensor:
    """The class token of each of the E4T file's CLIP layers [B, L, D], the subject cropped by its mask as in
    training. ComfyUI's "all" intermediate output of layer i is transformers' hidden_states[i + 1]."""
    import comfy.clip_vision
    import comfy.model_management as mm

    from ...backend.preprocess import prepare_concept_images

    c = e4t.config
    crops = prepare_concept_images(pixels, masks, clip_vision.image_size, 0.1, 0.0, normalize=False)
    mm.load_model_gpu(clip_vision.patcher)
    pv = comfy.clip_vision.clip_preprocess(crops.movedim(1, -1).clamp(0, 1).to(clip_vision.load_device),
                                           size=clip_vision.image_size, mean=clip_vision.image_mean,
                                           std=clip_vision.image_std, crop=False).float()
    out = clip_vision.model(pixel_values=pv, intermediate_output="all")
    hidden = out[1]  # [B, layers, T, D]
    if hidden.shape[-1] != c.vision_dim or max(c.vision_layers) > hidden.shape[1]:
        raise ValueError(f"the CLIP vision model has {hidden.shape[1]} layers of width {hidden.shape[-1]}, but the E4T "
                         f"file was trained with width {c.vision_dim} and layers {c.vision_layers}: load the CLIP "
                         f"vision model it was pre-trained with")
    return torch.stack([hidden[:, i - 1, 0] for i in c.vision_layers], dim=1).float()


def per_prompt(encoder: common.PromptEncoder):
    """backend ``encode`` with one vector per batch item ([B, 1, width] per text encoder): ComfyUI's CLIP takes one
    embedding tensor per token list, so each item is encoded on its own."""
    def encode(vectors, prompt_ids):
        outs = [encoder([v[b] for v in vectors], prompt_ids[b: b + 1]) for b in range(len(prompt_ids))]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return encode


class Progress(common.Progress):
    """E4T Tune's progress from its first second: the preparation phases (each a tick of the bar and a line of text,
    Cancel checked between them) and then each step (loss in the text)."""

    PHASES = ("encoding the photo", "CLIP vision features", "loading the models", "starting the tune")

    def __init__(self, steps: int):
        super().__init__(steps + len(self.PHASES), stage1_steps=0)
        self.steps = steps

    def phase(self, name: str) -> None:
        import comfy.model_management

        i = self.PHASES.index(name)
        self.last = f"E4T: {name} ({i + 1}/{len(self.PHASES)})"
        self.bar.update_absolute(i + 1, self.steps + len(self.PHASES))
        common.send_text(self.last)
        comfy.model_management.throw_exception_if_processing_interrupted()

    def text(self, done: int, total: int, loss: float) -> str:
        return f"E4T step {done}/{total}, loss {loss:.4f}"

    def __call__(self, done: int, total: int, loss: float) -> None:
        import comfy.model_management

        self.last = self.text(done, total, loss)
        self.bar.update_absolute(done + len(self.PHASES), total + len(self.PHASES))
        common.send_text(self.last)
        comfy.model_management.throw_exception_if_processing_interrupted()


@dataclass
class TunedConcept:
    """What E4T Tune hands to Save Concept (ComfyUI type BOOTHKIT_E4T_CONCEPT): the tuned offsets with the photo's
    scales fixed, the embedding, and what the compact file records (backend.e4t.save_e4t_concept)."""
    config: object  # backend.e4t.E4TConfig
    offsets: torch.nn.Module  # backend.e4t.WeightOffsets, on the CPU
    embedding: Embedding
    class_word: str
    training: dict

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        if self.config is None:
            raise ValueError(f"this E4T concept was loaded from {self.training.get('file', 'a file')} (Load E4T "
                             f"Concept): it is saved already; Save Concept takes E4T Tune's concept")
        return e4t_backend.save_e4t_concept(path, self.config, self.offsets, self.embedding, self.class_word,
                                            self.training, overwrite=overwrite)


@dataclass
class E4TOutput:
    model: object
    clip: object
    embedding: Embedding
    lora: LoRATensors
    report: str
    result: tune.TuneResult | None
    concept: TunedConcept | None = None


def stock_export(lora: LoRATensors) -> LoRATensors:
    """The weight diffs as the stock-loader file holds them: fp16 (half of fp32; 2 bytes per weight the offsets
    touch, ~0.5 GB for SD1.5's targets)."""
    return LoRATensors({k: v.to(torch.float16) if v.is_floating_point() and v.element_size() > 2 else v
                        for k, v in lora.tensors.items()}, dict(lora.metadata))


def weight_diffs(model, offsets, family: str, identifier: str) -> LoRATensors:
    """The offsets as exact weight changes W ∘ Δ of ``model``'s weights (``.diff`` tensors under kohya names).
    ``model`` must be the loaded one (``load_models_gpu``)."""
    modules = offset_modules(model, offsets.names)
    missing = [n for n in offsets.names if n not in modules]
    if missing:
        raise ValueError(f"the model has no layer for the E4T offsets {missing[:3]}: the concept is for another "
                         f"architecture")
    return e4t_backend.weight_diff_file(offsets, effective_weights(model, modules), family, identifier,
                                        BASE_MODEL_VERSIONS.get(family, family))


def apply_offsets(model, offsets, family: str, identifier: str) -> tuple[object, LoRATensors]:
    """A clone of ``model`` with the offsets as exact weight changes (``.diff`` patches, through LoraLoader's key
    map), and those weight diffs. ``model`` must be the loaded one (``load_models_gpu``)."""
    lora = weight_diffs(model, offsets, family, identifier)
    return common.apply_lora(model, lora), lora


def concept_weight_diffs(model, concept: TunedConcept) -> LoRATensors:
    """E4T Tune's concept as the weight diffs of ``model`` (for a hook: Concept Hook)."""
    family, _ = common.check_model(model)
    import comfy.model_management as mm

    mm.load_models_gpu([model])  # the diffs are W ∘ Δ of this model's own weights
    with torch.inference_mode(False):
        return weight_diffs(model, concept.offsets, family, concept.embedding.identifier)


def load_concept(path: str | Path, model, clip) -> tuple[object, object, str, TunedConcept]:
    """Copies of MODEL and CLIP with a compact E4T concept applied (its offsets as weight patches, its embedding on the
    identifier's token row), a one-line report, and the concept itself (for Concept Hook: one region of an image;
    it has no pre-training config, so Save Concept refuses it). The file is refused, naming it, when it was tuned on
    another family or text-encoder width."""
    family, _ = common.check_model(model)
    slots = common.text_slots(clip, family, model)
    data = e4t_backend.load_e4t_concept(path, family=family, widths={s.key: s.width for s in slots})
    identifier_ids = common.token_ids(clip, slots, data.identifier, "identifier")
    import comfy.model_management as mm

    # the diffs are W ∘ Δ of this model's weights: load it, so its layers hold its own weights (another clone of
    # the same UNet, loaded last, leaves its patches in them)
    mm.load_models_gpu([model])
    with torch.inference_mode(False):
        model_out, _ = apply_offsets(model, data.offsets, family, data.identifier)
        vectors = [data.embedding.vectors[s.key].float() for s in slots]
        clip_out = common.apply_embedding(clip, slots, identifier_ids, vectors)
    report = f"E4T concept '{Path(path).name}': prompt with '{data.identifier} {data.class_word}'"
    return model_out, clip_out, report, TunedConcept(None, data.offsets, data.embedding, data.class_word,
                                                     {"file": Path(path).name})


def e4t_tune(model, clip, clip_vision, vae, e4t: E4T, image, class_noun: str, identifier: str = "sks",
             mask=None, steps: int = 15, lr: float = 0.0, resolution: int = 512, seed: int = 0,
             gradient_checkpointing: bool = False) -> E4TOutput:
    """Tune a copy of ``e4t`` on one image for ``steps`` steps (0: the encoder's prediction alone; ``lr`` 0: the
    file's rate) and return clones of MODEL and CLIP with the tuned offsets and embedding applied; the inputs are
    never changed. Raises on bad input; ComfyUI's Cancel raises within one step. ``gradient_checkpointing`` trades
    time for memory (``common.checkpointed``); the result is the same."""
    import comfy.model_management as mm

    c = e4t.config
    class_noun = (class_noun or "").strip() or c.class_word
    identifier = check_identifier((identifier or "").strip(), class_noun)
    family, prediction_type = common.check_model(model)
    source = getattr(e4t, "source", "the E4T file")
    if family != c.family:
        raise ValueError(f"E4T file '{source}' was pre-trained for base family '{c.family}', but the model is "
                         f"{model_name(model)} ('{family}'): load an E4T file made for {family}")
    slots = common.text_slots(clip, family, model)
    if [s.width for s in slots] != list(c.word_dims):
        raise ValueError(f"the CLIP's text encoders are {[s.width for s in slots]} wide; the E4T file predicts "
                         f"{c.word_dims}: connect the CLIP of the model the file was pre-trained for")
    identifier_ids = common.token_ids(clip, slots, identifier, "identifier")
    class_ids = common.token_ids(clip, slots, class_noun, "class noun")
    if steps < 0:
        raise ValueError(f"steps must be 0 or more, got {steps}")
    device = model.load_device
    prompt = DEFAULT_TEMPLATE.format(identifier=identifier, class_noun=class_noun)
    progress = Progress(steps)
    with torch.inference_mode(False), common.interruptible(model.get_model_object("diffusion_model")):
        count = len(common.image_list(image))
        if count > 1:
            log.info("E4T tunes on one image; using the first of %d", count)
        pixels, pmasks, note = common.prepare(image[:1], None if mask is None else mask[:1], resolution)
        if c.tune_flip:
            pixels, pmasks = with_mirrors(pixels, pmasks)
        progress.phase("encoding the photo")
        data = common.encode_images(vae, model, pixels, pmasks, device)
        progress.phase("CLIP vision features")
        tokens = class_tokens(clip_vision, pixels, pmasks, e4t).to(device)
        progress.phase("loading the models")
        mm.load_models_gpu([model, clip.patcher])
        dm = model.get_model_object("diffusion_model")
        tuned = copy.deepcopy(e4t).to(device).float().train()
        tuned.offsets.weight_of = layer_weight  # the weights as ComfyUI's forward computes them (low-VRAM patches)
        modules = offset_modules(model, c.targets)
        encoder = common.PromptEncoder(clip, slots, [prompt], identifier, identifier_ids, model, resolution)
        encode = per_prompt(encoder)
        predict = common.make_predict(model)
        features = e4t_backend.denoiser_features(predict, encoder_blocks(dm))
        schedule = common.noise_schedule(model, prediction_type)
        class_vectors = [s.layer.weight[i].detach().float().clone().to(device) for s, i in zip(slots, class_ids)]
        batch = e4t_backend.Batch(data.mean, tokens, class_vectors, torch.zeros(len(pixels), dtype=torch.long),
                                  data.masks)
        progress.phase("starting the tune")
        result = None
        with common.frozen(dm, clip.cond_stage_model), common.trainable(dm, clip.cond_stage_model), \
                common.checkpointed(dm, gradient_checkpointing):
            if steps > 0:
                result = e4t_backend.tune(tuned, batch, features, encode, predict, schedule, modules, steps,
                                          lr if lr > 0 else None, seed, progress)
            vectors = e4t_backend.fix_concept(tuned, batch, features, encode, schedule, modules, seed)
        # as the CLIP will hold them (its token table may be fp16), so the clone and the saved embedding agree
        vectors = [v.to(s.layer.weight.dtype).float() for s, v in zip(slots, vectors)]
        training = {"method": "e4t", "host": "comfyui", "base_model": model_name(model), "class_noun": class_noun,
                    "steps": steps, "steps_done": result.steps if result else 0, "seed": seed,
                    "lr": lr if lr > 0 else c.tune_lr, "resolution": resolution,
                    "gradient_checkpointing": gradient_checkpointing}
        embedding = Embedding({s.key: v.detach().cpu().reshape(1, -1) for s, v in zip(slots, vectors)}, family,
                              identifier, class_noun)
        embedding.metadata = embedding_metadata(embedding, training, prediction_type)
        model_out, lora = apply_offsets(model, tuned.offsets, family, identifier)
        clip_out = common.apply_embedding(clip, slots, identifier_ids, vectors)
        offsets = copy.deepcopy(tuned.offsets).cpu()
        offsets.weight_of = None
        if offsets.scales is not None:  # a plain list: .cpu() does not move it
            offsets.scales = [s.detach().cpu() for s in offsets.scales]
        concept = TunedConcept(c, offsets, embedding, class_noun, training)
    status = result.status if result else tune.DONE
    losses = f", loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result and result.losses else ""
    report = (f"E4T {'finished' if status == tune.DONE else f'stopped ({status})'}: "
              f"{result.steps if result else 0}/{steps} steps{losses}" + (f"; note: {note}" if note else "") +
              (f"; {result.message}" if result and result.message else ""))
    common.send_text(report)
    return E4TOutput(model_out, clip_out, embedding, stock_export(lora), report, result, concept)
