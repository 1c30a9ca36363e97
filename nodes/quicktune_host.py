"""The ComfyUI host of two-stage quick-tune (seed 002): what the nodes in quicktune.py do, written against ComfyUI's
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
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..backend import quicktune as qt
from ..backend.embedding import Embedding, embedding_metadata, keys_for, save_embedding
from ..backend.identifier import DEFAULT_IDENTIFIER
from ..backend.lora import UNET_PREFIX, LoRA, LoRATensors, kohya_name, lora_tensors
from ..backend.identifier import DEFAULT_TEMPLATE, check_identifier
from ..backend.preprocess import prepare_images
from ..backend.quicktune import resolve_mixed_precision
from .instantbooth_host import model_family, model_name, model_text_width

log = logging.getLogger(__name__)

# ComfyUI's ModelType -> the backend's prediction type; other model types (EDM, flow, ...) are not SD UNets
PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}
METHOD = "quicktune"
NAME_FIELDS = ("ss_output_name", "modelspec.title")  # metadata that names the file (kohya, SAI model spec)


# ----------------------------------------------------------------------------------------------------------------------
# the model and its text encoders


def check_model(model) -> tuple[str, str]:
    """(family, prediction type) of a MODEL quick-tune can train: a Stable Diffusion text-to-image UNet."""
    family = model_family(model)
    dm = model.get_model_object("diffusion_model")
    if family is None or not hasattr(dm, "input_blocks"):
        raise ValueError(f"Quick-Tune trains Stable Diffusion UNets (SD1.x, SD2.x, SDXL); the model is "
                         f"{model_name(model)} (text width {model_text_width(model)})")
    model_type = getattr(getattr(model.model, "model_type", None), "name", None)
    if model_type not in PREDICTION_TYPES:
        raise ValueError(f"Quick-Tune trains epsilon- or v-prediction models; {model_name(model)} is {model_type}")
    latent_channels = getattr(getattr(model.model, "latent_format", None), "latent_channels", dm.in_channels)
    if dm.in_channels != latent_channels:
        raise ValueError(f"the model's UNet takes {dm.in_channels} input channels for {latent_channels}-channel "
                         f"latents (an inpainting or instruct model); Quick-Tune trains text-to-image models")
    return family, PREDICTION_TYPES[model_type]


@dataclass
class TextEncoderSlot:
    """One text encoder of a CLIP: its key in embedding files, its key in ComfyUI's token dicts, its token-embedding
    layer and that layer's weight's state-dict key in the CLIP's patcher."""
    key: str  # emb_params | clip_l | clip_g
    comfy_key: str  # l | g | h
    layer: torch.nn.Module
    weight_key: str

    @property
    def width(self) -> int:
        return int(self.layer.weight.shape[1])


def text_slots(clip, family: str, model=None) -> list[TextEncoderSlot]:
    """The CLIP's text encoders in embedding-file order (SDXL: CLIP-L, CLIP-G), checked against the family and, with
    ``model``, against its cross-attention width."""
    tokenizer_keys = list(clip.tokenize("a").keys())
    keys = keys_for(family)
    if family == "sdxl":
        pairs = list(zip(keys, ("l", "g")))  # clip_l, clip_g
    elif len(tokenizer_keys) == 1:
        pairs = [(keys[0], tokenizer_keys[0])]
    else:
        pairs = []
    csm = clip.cond_stage_model
    paths = {id(m): name for name, m in csm.named_modules()}
    slots = []
    for key, comfy_key in pairs:
        encoder = getattr(csm, f"clip_{comfy_key}", None)
        if comfy_key not in tokenizer_keys or encoder is None:
            slots = []
            break
        layer = encoder.transformer.get_input_embeddings()
        slots.append(TextEncoderSlot(key, comfy_key, layer, f"{paths[id(layer)]}.weight"))
    if not slots:
        raise ValueError(f"the CLIP has text encoders {sorted(tokenizer_keys)}, which is not the text encoder of a "
                         f"{family} model: connect the CLIP that was loaded with the checkpoint")
    width = model_text_width(model) if model is not None else None
    if width is not None and sum(s.width for s in slots) != width:
        raise ValueError(f"the CLIP's text encoders are {[s.width for s in slots]} wide, but the model's "
                         f"cross-attention takes {width}: connect the CLIP that was loaded with the checkpoint")
    return slots


EXAMPLES = {"identifier": "sks", "init word": "the class noun"}  # what a one-token word could be, for messages


def token_ids(clip, slots: Sequence[TextEncoderSlot], word: str, what: str) -> list[int]:
    """The one token id of ``word`` in each text encoder's vocabulary; a clear error when it is more or none."""
    tokens = clip.tokenize(word, return_word_ids=True)
    out = []
    for slot in slots:
        ids = [t for t, _w, word_id in tokens[slot.comfy_key][0] if word_id != 0]
        if len(ids) != 1 or not isinstance(ids[0], int):
            found = "no tokens" if not ids else f"{len(ids)} tokens"
            raise ValueError(f"{what} {word!r} is {found} for the text encoder CLIP-{slot.comfy_key.upper()}; "
                             f"the vector stands in one token's place, so the {what} must be a single "
                             f"token (e.g. {EXAMPLES.get(what, 'cat, dog or person')})")
        out.append(ids[0])
    return out


def noise_schedule(model, prediction_type: str) -> qt.NoiseSchedule:
    """ᾱ_t of the MODEL's own sampling object (ComfyUI keeps σ_t = sqrt((1 - ᾱ_t) / ᾱ_t))."""
    sigmas = model.get_model_object("model_sampling").sigmas.detach().double().cpu()
    return qt.NoiseSchedule((1.0 / (1.0 + sigmas ** 2)).float(), prediction_type)


def make_predict(model) -> qt.Predict:
    """``predict(x_t, t, cond)``: the UNet on DDPM inputs. ComfyUI's sampler reaches the same call through
    ``apply_model`` (x_t = x_σ / sqrt(σ² + 1), t = the table index of σ); cond is {"context", and "y" for SDXL}."""
    base = model.model
    dm = model.get_model_object("diffusion_model")
    dtype = base.manual_cast_dtype or base.get_dtype()
    device = model.load_device

    def predict(x, t, cond):
        y = cond.get("y")
        out = dm(x.to(device, dtype), t.to(device).float(), context=cond["context"].to(device, dtype),
                 y=None if y is None else y.to(device, dtype), transformer_options={})
        return out.float()
    return predict


@contextmanager
def saved_copies() -> Iterator[None]:
    """Copy every tensor autograd saves, when it saves it: ComfyUI's CLIP layers add their residuals in place."""
    with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t):
        yield


class PromptEncoder:
    """The backend's ``encode(vectors, prompt_ids)``: each prompt's ComfyUI token list with the identifier's tokens
    replaced by the vectors (the way ComfyUI feeds embeddings), encoded by the CLIP's own text encoders with its own
    options (clip skip), as CLIPTextEncode would; SDXL also gets the UNet's ``y`` from the pooled output."""

    def __init__(self, clip, slots: Sequence[TextEncoderSlot], prompts: Sequence[str], identifier: str,
                 identifier_ids: Sequence[int], model=None, resolution: int = 512):
        self.clip, self.slots, self.identifier_ids = clip, list(slots), list(identifier_ids)
        self.tokens = [clip.tokenize(p) for p in prompts]
        for prompt, tokens in zip(prompts, self.tokens):
            for slot, ident in zip(self.slots, self.identifier_ids):
                if not any(tok[0] == ident for chunk in tokens[slot.comfy_key] for tok in chunk):
                    raise ValueError(f"training prompt {prompt!r} does not contain the identifier {identifier!r}")
        self.base, self.resolution = (model.model if model is not None else None), resolution

    @property
    def num_prompts(self) -> int:
        return len(self.tokens)

    def tokens_with(self, vectors: Sequence[torch.Tensor], i: int) -> dict:
        out = dict(self.tokens[i])
        for slot, ident, vec in zip(self.slots, self.identifier_ids, vectors):
            out[slot.comfy_key] = [[(vec, *tok[1:]) if tok[0] == ident else tok for tok in chunk]
                                   for chunk in self.tokens[i][slot.comfy_key]]
        return out

    def __call__(self, vectors: Sequence[torch.Tensor], prompt_ids: torch.Tensor) -> dict:
        csm = self.clip.cond_stage_model
        conds, ys = [], []
        with saved_copies():
            for i in prompt_ids.tolist():
                csm.reset_clip_options()  # what CLIP.encode_from_tokens does before every encoding
                if self.clip.layer_idx is not None:
                    csm.set_clip_options({"layer": self.clip.layer_idx})
                cond, pooled = csm.encode_token_weights(self.tokens_with(vectors, i))[:2]
                conds.append(cond)
                y = None
                if self.base is not None:
                    r = self.resolution
                    y = self.base.encode_adm(pooled_output=pooled, width=r, height=r, target_width=r,
                                             target_height=r, crop_w=0, crop_h=0)
                ys.append(y)
        csm.reset_clip_options()
        out = {"context": torch.cat(conds)}
        if all(y is not None for y in ys):
            out["y"] = torch.cat(ys)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# training on ComfyUI's weights without changing them


def trainable_copy(weight: torch.Tensor) -> torch.Tensor:
    """A weight autograd can save: a normal copy of an inference tensor (ComfyUI loads weights under inference mode),
    the weight itself otherwise."""
    return weight.clone() if weight.is_inference() else weight


@contextmanager
def trainable(*roots: torch.nn.Module) -> Iterator[None]:
    """Inside, every ComfyUI layer whose weight or bias is an inference tensor hands its forward a normal copy (a
    ComfyUI ``weight_function``), so autograd can save it; each layer's own function list is put back on exit."""
    saved = []
    try:
        for root in roots:
            for m in root.modules():
                if not hasattr(m, "weight_function"):
                    continue
                for attr, param in (("weight_function", getattr(m, "weight", None)),
                                    ("bias_function", getattr(m, "bias", None))):
                    if isinstance(param, torch.Tensor) and param.is_inference():
                        saved.append((m, attr, m.__dict__.get(attr)))
                        # a new list: never the class default
                        setattr(m, attr, list(getattr(m, attr)) + [trainable_copy])
        yield
    finally:
        for m, attr, old in reversed(saved):
            if old is None:
                delattr(m, attr)  # back to the class attribute
            else:
                setattr(m, attr, old)


@contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """backend ``frozen`` entered and left in inference mode: ComfyUI's weights are inference tensors, whose
    requires_grad may be set back to True only there."""
    stack = ExitStack()
    with torch.inference_mode():
        stack.enter_context(qt.frozen(*modules))
    try:
        yield
    finally:
        with torch.inference_mode():
            stack.close()


def _checkpointed_forward(forward):
    def run(args, kwargs):
        return forward(*args, **kwargs)

    def checkpointed(*args, **kwargs):
        # dict arguments (transformer_options) as they are now: the UNet updates them between blocks, and the
        # recomputation in the backward pass must see what this forward saw
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(run, args, kwargs, use_reentrant=False)
    return checkpointed


@contextmanager
def checkpointed(dm: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Gradient checkpointing of ComfyUI's UNet while inside (``enabled``): each layer of its input, middle and output
    blocks (ResBlock, SpatialTransformer, ...) keeps only its inputs for the backward pass and recomputes the rest
    there, as diffusers checkpoints each resnet and transformer. Same result, less memory, more time (TrainLoraNode
    does the same on the model's top-level layers). Set on the instances; their own forwards are put back on exit.
    Forwards set on the layers' sub-modules (E4T's offsets, the LoRA's hooks) run inside and are recomputed too, so
    they must stay in place through the backward pass, as they do."""
    if not enabled:
        yield
        return
    layers = [layer for block in [*dm.input_blocks, dm.middle_block, *dm.output_blocks] for layer in block]
    saved = []
    try:
        for layer in layers:
            saved.append((layer, layer.__dict__.get("forward")))
            layer.forward = _checkpointed_forward(layer.forward)
        yield
    finally:
        for layer, own in reversed(saved):
            if own is None:
                del layer.forward
            else:
                layer.forward = own


# ----------------------------------------------------------------------------------------------------------------------
# images


def image_list(images) -> list[torch.Tensor]:
    """ComfyUI IMAGE ([N, H, W, C] in 0..1, or a list of them) -> [3, H, W] tensors."""
    batches = images if isinstance(images, (list, tuple)) else [images]
    out = []
    for b in batches:
        if b is None:
            continue
        if not isinstance(b, torch.Tensor) or b.ndim not in (3, 4) or b.shape[-1] < 3:
            raise ValueError(f"images must be an IMAGE batch [N, H, W, 3], got "
                             f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
        b = b if b.ndim == 4 else b[None]
        out += [im[..., :3].movedim(-1, 0).float() for im in b]
    if not out:
        raise ValueError("Quick-Tune got no images: connect a batch of photos of the subject (4-6 is typical; "
                         "combine LoadImage outputs with an Image Batch node)")
    return out


def mask_list(masks, images: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """ComfyUI MASK ([N, H, W], [H, W]; 1 on the subject; one for all images or one each) -> [1, H, W] per image at
    its image's size."""
    if masks is None:
        return None
    m = masks.float()
    m = m[None] if m.ndim == 2 else m[:, 0] if m.ndim == 4 and m.shape[1] == 1 else m
    if m.ndim != 3:
        raise ValueError(f"mask must be [N, H, W], got shape {tuple(masks.shape)}")
    if m.shape[0] == 1 and len(images) > 1:
        m = m.expand(len(images), -1, -1)
    if m.shape[0] != len(images):
        raise ValueError(f"{m.shape[0]} masks for {len(images)} images: give one mask per image (or one for all)")
    out = []
    for i, (mi, im) in enumerate(zip(m, images)):
        mi = mi[None]
        if tuple(mi.shape[-2:]) != tuple(im.shape[-2:]):
            mi = F.interpolate(mi[None], size=im.shape[-2:], mode="bilinear", align_corners=False)[0]
        if not bool((mi > 0.5).any()):
            raise ValueError(f"mask {i} is empty (nothing above 0.5): the mask must be 1 on the subject. LoadImage "
                             f"gives an empty mask for an image without alpha; leave the mask unconnected to train "
                             f"on whole images.")
        out.append(mi)
    return out


def prepare(images, masks, resolution: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Square training pixels [N, 3, R, R] (+ masks [N, 1, R, R]) and a note when images had to be resized."""
    imgs = image_list(images)
    sizes = sorted({tuple(im.shape[1:]) for im in imgs})
    pixels, pmasks = prepare_images(imgs, resolution, mask_list(masks, imgs))
    note = ""
    if sizes != [(resolution, resolution)]:
        note = (f"resized {len(imgs)} image(s) of size {', '.join(f'{w}x{h}' for h, w in sizes)} to "
                f"{resolution}x{resolution} (shorter side, centre crop)")
    return pixels, pmasks, note


@torch.no_grad()
def encode_images(vae, model, pixels: torch.Tensor, masks: torch.Tensor | None, device, chunk: int = 4
                  ) -> qt.TrainingSet:
    """x0 of the training images, once: the VAE's latents (as VAEEncode gives them) in the model's latent space."""
    latents = torch.cat([vae.encode(c.movedim(1, -1)) for c in pixels.split(chunk)])
    x0 = model.model.process_latent_in(latents).float().to(device).clone()
    in_channels = model.get_model_object("diffusion_model").in_channels
    if x0.shape[1] != in_channels:
        raise ValueError(f"the VAE gives {x0.shape[1]}-channel latents but the model takes {in_channels}: connect "
                         f"the VAE that was loaded with the checkpoint")
    if masks is not None:
        masks = F.interpolate(masks.float().to(device), size=x0.shape[-2:], mode="area").clone()
    return qt.TrainingSet(x0, None, masks)


# ----------------------------------------------------------------------------------------------------------------------
# applying the result to clones


def diffusers_names(model, lora: LoRA) -> dict[str, str]:
    """LoRA layer names from ComfyUI module paths to the diffusers paths kohya's SD files use (what A1111 and other
    tools expect); a layer without a diffusers name keeps its ComfyUI name, which ComfyUI maps as well."""
    import comfy.utils

    config = model.model.model_config.unet_config
    to_diffusers = {comfy_key: key for key, comfy_key in comfy.utils.unet_to_diffusers(config).items()}
    dm = model.get_model_object("diffusion_model")
    names = {}
    for path, _ in dm.named_modules():
        name = kohya_name(UNET_PREFIX, path)
        target = to_diffusers.get(f"{path}.weight")
        if name in lora.pairs and target is not None:
            names[name] = kohya_name(UNET_PREFIX, target[: -len(".weight")])
    return names


def lora_layers(tensors) -> set[str]:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}


def apply_lora(model, lora: LoRATensors, strength: float = 1.0):
    """A clone of ``model`` with the LoRA as weight patches, through ComfyUI's own LoRA key mapping (LoraLoader's
    path); raises if any layer of the LoRA does not map onto the model."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    unmapped = sorted(layer for layer in lora_layers(lora.tensors) if layer not in key_map)
    if unmapped:
        raise ValueError(f"{len(unmapped)} LoRA layer(s) do not map onto this model: {unmapped[:3]}")
    patches = comfy.lora.load_lora(lora.tensors, key_map, log_missing=False)
    m = model.clone()
    added = m.add_patches(patches, strength)
    if len(added) != len(patches):
        raise ValueError(f"only {len(added)} of {len(patches)} LoRA patches reached the model's weights")
    return m


def apply_embedding(clip, slots: Sequence[TextEncoderSlot], identifier_ids: Sequence[int],
                    vectors: Sequence[torch.Tensor]):
    """A clone of ``clip`` whose identifier row of each token-embedding table is the learned vector: a "set" patch on
    that one row, so the rest of the vocabulary and the input CLIP stay as they are."""
    c = clip.clone()
    patches = {(s.weight_key, (0, tid, 1)): ("set", (v.detach().float().cpu().reshape(1, -1),))
               for s, tid, v in zip(slots, identifier_ids, vectors)}
    added = c.add_patches(patches)
    if len(added) != len(patches):
        raise ValueError(f"the CLIP has no token-embedding weight {[s.weight_key for s in slots]}")
    return c


# ----------------------------------------------------------------------------------------------------------------------
# progress and cancel


class Progress:
    """``on_progress`` for the backend: ComfyUI's progress bar (its hook also raises on Cancel in the server), a text
    line with stage and loss under the node, and an explicit interrupt check, so Cancel stops within one step."""

    def __init__(self, total: int, stage1_steps: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(max(total, 1))
        self.stage1_steps = stage1_steps
        self.last = ""

    def text(self, done: int, total: int, loss: float) -> str:
        if done <= self.stage1_steps:
            return f"stage 1 (embedding) step {done}/{self.stage1_steps}, loss {loss:.4f}"
        return f"stage 2 (denoiser) step {done - self.stage1_steps}/{total - self.stage1_steps}, loss {loss:.4f}"

    def __call__(self, done: int, total: int, loss: float) -> None:
        import comfy.model_management

        self.last = self.text(done, total, loss)
        self.bar.update_absolute(done, total)
        send_text(self.last)
        comfy.model_management.throw_exception_if_processing_interrupted()


def send_text(text: str) -> None:
    """The text under the running node (ComfyUI's progress-text message), when a server is running this node."""
    server = sys.modules.get("server")  # never imported here: only a running ComfyUI has a PromptServer
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    if context is not None and context.node_id is not None:
        instance.send_progress_text(text, context.node_id)


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
    stage1: qt.TuneResult | None = None
    stage2: qt.TuneResult | None = None


def training_record(model, config: qt.QuickTuneConfig, out: qt.TwoStageResult, run_stage1: bool, run_stage2: bool,
                    class_noun: str, init_word: str, identifier: str, num_images: int, resolution: int, seed: int,
                    mixed_precision: str, masked: bool, started: float) -> dict:
    """The run's settings and outcome, as the diffusers host records them (the files' ``training`` metadata)."""
    r1, r2 = out.stage1, out.stage2
    return {
        "method": METHOD, "host": "comfyui", "base_model": model_name(model),
        "stages": [s for s, on in (("embedding", run_stage1), ("denoiser", run_stage2)) if on],
        "class_noun": class_noun, "prompts": [DEFAULT_TEMPLATE], "init_word": init_word if run_stage1 else "",
        "num_images": num_images, "num_class_images": 0, "resolution": resolution, "seed": seed,
        "mixed_precision": mixed_precision, "gradient_checkpointing": config.gradient_checkpointing, "mode": "lora",
        "rank": config.rank,
        "alpha": config.rank if config.alpha is None else config.alpha, "conv_rank": 0, "flip": False,
        "masked_loss": masked,
        "stage1_steps": config.stage1.steps if run_stage1 else 0, "stage1_lr": config.stage1.lr,
        "stage1_batch_size": config.stage1.batch_size, "stage1_steps_done": r1.steps if r1 else 0,
        "stage2_steps": config.stage2.steps if run_stage2 else 0, "stage2_lr": config.stage2.lr,
        "stage2_batch_size": config.stage2.batch_size, "stage2_steps_done": r2.steps if r2 else 0,
        "status": out.status, "started_at": int(started), "finished_at": int(time.time()), "name": identifier,
    }


def _stage_line(name: str, r: qt.TuneResult | None, steps: int) -> str:
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
        training = training_record(model, config, out, run_stage1, run_stage2, class_noun, init_word, identifier,
                                   len(pixels), resolution, seed, mixed, masks is not None, started)
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
        if r is not None and r.status == qt.NAN:
            lines.append(f"stopped: {r.message}; the outputs hold that last good state"
                         + ("" if r is r2 or not run_stage2 else "; the denoiser was not tuned"))
    report = "Quick-Tune " + ("finished" if out.status == qt.DONE else f"stopped ({out.status})") + ": " + \
        "; ".join(lines)
    (log.warning if out.status != qt.DONE else log.info)("%s", report)
    send_text(report)
    return QuickTuneOutput(model_out, clip_out, embedding, lora_out, out.status, report, r1, r2)


def save_concept(embedding: Embedding | None, lora: LoRATensors | None, name: str, overwrite: bool,
                 embeddings_dir: str | Path, loras_dir: str | Path) -> list[Path]:
    """Write the embedding to ``<embeddings_dir>/<name>.safetensors`` (``embedding:<name>`` in ComfyUI, ``<name>`` in
    A1111) and the LoRA to ``<loras_dir>/<name>_lora.safetensors``. The name is sanitised (no folders, no traversal);
    existing files are refused unless ``overwrite``, before anything is written."""
    if embedding is None and lora is None:
        raise ValueError("Save Concept got nothing to save: connect the embedding and/or the LoRA output of "
                         "Quick-Tune Concept")
    if embedding is not None and not isinstance(embedding, Embedding):
        raise TypeError(f"embedding must be a BoothKit embedding, got {type(embedding).__name__}")
    if lora is not None and not isinstance(lora, LoRATensors):
        raise TypeError(f"lora must be a BoothKit LoRA, got {type(lora).__name__}")
    stem = qt.safe_name(name)
    targets = []
    if embedding is not None:
        targets.append((embedding, qt.output_paths(embeddings_dir, stem, ["embedding"], overwrite=True)["embedding"]))
    if lora is not None:
        targets.append((lora, qt.output_paths(loras_dir, stem, ["lora"], overwrite=True)["lora"]))
    existing = [str(p) for _, p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"Save Concept: {' and '.join(existing)} already exist(s); turn on 'overwrite' to "
                              f"replace, or choose another name (nothing was written)")
    written = []
    for value, path in targets:
        # the file's name is chosen here, after training: kohya's name fields follow it (the inputs stay as they are,
        # ComfyUI may hand them to other nodes)
        meta = {**value.metadata, **{k: stem for k in NAME_FIELDS if k in value.metadata}}
        if isinstance(value, Embedding):
            written.append(save_embedding(path, replace(value, metadata=meta), overwrite=True))
        else:
            written.append(LoRATensors(value.tensors, meta).save(path, overwrite=True))
        log.info("Save Concept: wrote %s", path)
    return written
