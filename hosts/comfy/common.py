"""What every ComfyUI host module needs: the model's family and text encoders, the prompt encoder
that feeds vectors into the identifier's rows, the denoiser as a differentiable function, trainable / frozen /
checkpointed weights, images and masks from IMAGE/MASK tensors, LoRA and embedding patches on clones, progress.
Nothing from ComfyUI is imported at module level, so what needs no ComfyUI is tested without it."""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ...backend import tune
from ...backend.embedding import keys_for
from ...backend.lora import UNET_PREFIX, LoRA, LoRATensors, kohya_name
from ...backend.preprocess import prepare_images
from ...backend.instantbooth import FAMILIES


# ComfyUI's ModelType -> the backend's prediction type; other model types (EDM, flow, ...) are not SD UNets
PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}


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


def noise_schedule(model, prediction_type: str) -> tune.NoiseSchedule:
    """ᾱ_t of the MODEL's own sampling object (ComfyUI keeps σ_t = sqrt((1 - ᾱ_t) / ᾱ_t))."""
    sigmas = model.get_model_object("model_sampling").sigmas.detach().double().cpu()
    return tune.NoiseSchedule((1.0 / (1.0 + sigmas ** 2)).float(), prediction_type)


def make_predict(model) -> tune.Predict:
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
        stack.enter_context(tune.frozen(*modules))
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
                  ) -> tune.TrainingSet:
    """x0 of the training images, once: the VAE's latents (as VAEEncode gives them) in the model's latent space."""
    latents = torch.cat([vae.encode(c.movedim(1, -1)) for c in pixels.split(chunk)])
    x0 = model.model.process_latent_in(latents).float().to(device).clone()
    in_channels = model.get_model_object("diffusion_model").in_channels
    if x0.shape[1] != in_channels:
        raise ValueError(f"the VAE gives {x0.shape[1]}-channel latents but the model takes {in_channels}: connect "
                         f"the VAE that was loaded with the checkpoint")
    if masks is not None:
        masks = F.interpolate(masks.float().to(device), size=x0.shape[-2:], mode="area").clone()
    return tune.TrainingSet(x0, None, masks)


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


class LoraModel(dict):
    """ComfyUI's LORA_MODEL (the state dict its Load LoRA Model and Save LoRA nodes take) that also keeps the BoothKit
    file's metadata, so Save Concept writes the same file as before."""

    def __init__(self, lora: LoRATensors):
        super().__init__(lora.tensors)
        self.metadata = dict(lora.metadata)

    @property
    def tensors(self) -> dict:
        """LoRATensors' field: the tensors (the dict itself), so code written for LoRATensors reads it."""
        return self


def as_lora_model(lora: LoRATensors | None) -> LoraModel | None:
    return None if lora is None else LoraModel(lora)


def from_lora_model(value) -> LoRATensors | None:
    """The LoRATensors behind a LORA_MODEL link; a LORA_MODEL without BoothKit metadata (ComfyUI's Train LoRA) is
    refused with the node that saves it."""
    if value is None or isinstance(value, LoRATensors):
        return value
    if isinstance(value, LoraModel):
        return LoRATensors(dict(value), dict(value.metadata))
    raise TypeError(f"Save Concept saves the LoRA of Quick-Tune Concept or E4T Tune (with its metadata); got a "
                    f"{type(value).__name__} without BoothKit metadata: save ComfyUI's own LoRAs with Save LoRA")


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


@contextmanager
def interruptible(dm: torch.nn.Module) -> Iterator[None]:
    """Cancel checked before every block of ComfyUI's UNet (forward, and the recomputed forward of a checkpointed
    backward), so a Cancel stops a long phase (features, a step) within one block, not at the end of it."""
    import comfy.model_management

    def check(module, args):
        comfy.model_management.throw_exception_if_processing_interrupted()

    blocks = [b for name in ("input_blocks", "middle_block", "output_blocks") for b in getattr(dm, name, [])]
    handles = [b.register_forward_pre_hook(check) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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


# text-encoder width of the model to patch -> base-model family (768: SD1.x, 1024: SD2.x, 2048: SDXL)
FAMILY_BY_CTX = {width: family for family, width in FAMILIES.items() if width is not None}


# ----------------------------------------------------------------------------------------------------------------------
# the model to patch


def model_text_width(model) -> int | None:
    """Cross-attention width of a ComfyUI MODEL (its text encoder's width), from the model's own config."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    width = (getattr(config, "unet_config", None) or {}).get("context_dim")
    return int(width) if width else None


def model_family(model) -> str | None:
    """The model's base family: the one its config declares (``boothkit_family``: the toy world's loader sets it),
    else the one its text width means."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    if getattr(config, "boothkit_family", None):
        return config.boothkit_family
    width = model_text_width(model)
    return FAMILY_BY_CTX.get(width) if width is not None else None


def model_name(model) -> str:
    config = getattr(getattr(model, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else type(getattr(model, "model", model)).__name__
