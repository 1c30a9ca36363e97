"""E4T on a diffusers model (and the toy world): the host side of backend/e4t.py — the denoiser's pooled encoder
features, the CLIP class tokens, the identifier spliced into the prompts with one vector per image, the offsets'
modules — plus the one-image tune and the files a tuned concept is saved as (a standard embedding and a weight-diff
file that stock ComfyUI and A1111 load)."""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ...backend import e4t as e4t_backend
from ...backend.e4t import E4T, E4TConfig
from ...backend.embedding import Embedding, save_embedding
from ...backend.lora import BASE_MODEL_VERSIONS, LoRATensors
from ...backend.tune import TuneResult, frozen
from ...backend.identifier import check_identifier, training_template
from ...backend.preprocess import prepare_concept_images, prepare_images, with_mirrors
from .common import PromptEncoder, cache_images, default_resolution, make_predict, schedule_of, text_slots, word_ids

log = logging.getLogger(__name__)


def denoiser_features(predict, unet):
    """Pooled outputs of every down block and of the mid block (backend/e4t.py's features)."""
    return e4t_backend.denoiser_features(predict, list(unet.down_blocks) + [unet.mid_block])


def unet_dims(unet) -> list[int]:
    c = list(unet.config.block_out_channels)
    return c + [c[-1]]


def default_vision_layers(vision) -> list[int]:
    """Four hidden states spread over the backbone (its last included), as indices into ``hidden_states``."""
    n = int(vision.config.num_hidden_layers)
    return sorted({max(1, round(n * k / 4)) for k in (1, 2, 3, 4)})


@torch.no_grad()
def class_tokens(vision, images: torch.Tensor, masks: torch.Tensor | None, layers, crop_margin: float = 0.1):
    """[B, 3, H, W] in [0, 1] -> the class token of each chosen hidden state [B, L, D] (subject cropped by its mask)."""
    size = int(vision.config.image_size)
    pixels = prepare_concept_images(images, masks, size, crop_margin, 0.0)
    param = next(vision.parameters())
    out = vision(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=True)
    return torch.stack([out.hidden_states[i][:, 0] for i in layers], dim=1).float()


def class_vectors(model, word: str) -> list[torch.Tensor]:
    """The class word's input embedding per text encoder [width]; the word must be one token."""
    out = []
    for slot in text_slots(model):
        ids = word_ids(slot.tokenizer, word)
        if len(ids) != 1:
            raise ValueError(f"the class word {word!r} is {len(ids)} tokens for the {slot.key} tokenizer; E4T starts "
                             f"the identifier from one word's embedding: choose a one-token class word")
        out.append(slot.text_encoder.get_input_embeddings().weight[ids[0]].detach().float())
    return out


def new_config(model, vision, class_word: str, identifier: str = "sks", **overrides) -> E4TConfig:
    """An E4T sized for ``model`` and ``vision``: offsets on every Linear of the denoiser's transformer blocks."""
    names = e4t_backend.offset_targets(model.unet)
    shapes = [list(model.unet.get_submodule(n).weight.shape) for n in names]
    return E4TConfig(family=model.family,
                     word_dims=[s.width for s in text_slots(model)],
                     vision_dim=int(vision.config.hidden_size), vision_layers=default_vision_layers(vision),
                     unet_dims=unet_dims(model.unet), targets=names, target_shapes=shapes,
                     identifier=check_identifier(identifier, class_word), class_word=class_word, **overrides)


def offset_modules(unet, targets) -> dict[str, torch.nn.Module]:
    """The E4T targets (diffusers module paths) that ``unet`` has -> its modules; WeightOffsets.attach names any
    that are missing."""
    names = {n for n, _ in unet.named_modules()}
    return {n: unet.get_submodule(n) for n in targets if n in names}


class E4THost:
    """The callables backend/e4t.py needs, over ``model`` and a list of prompts containing the identifier."""

    def __init__(self, model, e4t: E4T, prompts: list[str], resolution: int | None = None):
        c = e4t.config
        self.model, self.e4t = model, e4t
        self.predict = make_predict({"unet": model.unet})
        self.features = denoiser_features(self.predict, model.unet)
        self.schedule = schedule_of(model)
        self.modules = offset_modules(model.unet, c.targets)
        fill = [[s.tokenizer.bos_token_id] for s in text_slots(model)]
        self.encode = PromptEncoder.spliced(model, prompts, c.identifier, fill,
                                            resolution or default_resolution(model))

    def loss(self, batch: e4t_backend.Batch, generator=None) -> torch.Tensor:
        """The objective; the offsets must be attached (``e4t.offsets.attach(self.modules)``)."""
        return e4t_backend.objective(self.e4t, batch, self.features, self.encode, self.predict, self.schedule,
                                     self.modules, generator)


@contextmanager
def offsets_applied(model, offsets: e4t_backend.WeightOffsets):
    """While inside, ``model.unet`` runs with ``offsets`` (a tuned concept's, or a compact file's; removed on exit)."""
    with torch.no_grad(), offsets.applied(offset_modules(model.unet, offsets.names)):
        yield model.unet


def load_concept(path: str | Path, model) -> e4t_backend.E4TConceptData:
    """A compact E4T concept file (``boothkit tune --method e4t``) checked against ``model``'s family and text
    encoder widths; apply with :func:`offsets_applied` and ``common.encode_prompt(model, prompt, c.embedding)``."""
    widths = {s.key: s.width for s in text_slots(model)}
    concept = e4t_backend.load_e4t_concept(path, family=model.family, widths=widths)
    present = offset_modules(model.unet, concept.offsets.names)
    missing = [n for n in concept.offsets.names if n not in present]
    if missing:
        raise e4t_backend.FormatError(f"{path}: the model's denoiser has no module {missing[0]!r} "
                                      f"({len(missing)} of the concept's {len(concept.offsets.names)} targets missing);"
                                      f" the concept was tuned on another architecture")
    concept.offsets.to(model.unet.device)
    if concept.offsets.scales is not None:
        concept.offsets.scales = [s.to(model.unet.device) for s in concept.offsets.scales]
    return concept


@dataclass
class E4TConcept:
    """A tuned concept: the tuned encoder and offsets, the identifier's fixed embedding, and how the tune ended."""
    e4t: E4T
    embedding: Embedding
    result: TuneResult | None
    class_word: str = ""
    training: dict | None = None

    @contextmanager
    def applied(self, model):
        """While inside, ``model.unet`` runs with the tuned offsets (removed on exit)."""
        with offsets_applied(model, self.e4t.offsets) as unet:
            yield unet

    def weight_diff(self, model, dtype: torch.dtype | None = None) -> LoRATensors:
        """The offsets as a weight-diff file that stock ComfyUI (LoraLoader) and A1111 load (``dtype``: of the
        model's weights, or e.g. fp16 to halve the file)."""
        weights = {n: m.weight for n, m in offset_modules(model.unet, self.e4t.config.targets).items()}
        if dtype is not None:
            weights = {n: w.to(dtype) for n, w in weights.items()}
        return e4t_backend.weight_diff_file(self.e4t.offsets, weights, model.family, self.embedding.identifier,
                                            BASE_MODEL_VERSIONS.get(model.family, model.family))

    def save(self, model, out_dir: str | Path, name: str, overwrite: bool = False, stock: bool = False,
             stock_dtype: torch.dtype | None = torch.float16) -> dict[str, Path]:
        """Write the compact concept ``<name>_e4t.safetensors`` (kind "e4t": offsets, the photo's scales, the
        embedding; backend/e4t.py save_e4t_concept). ``stock`` also writes what stock loaders read: the embedding
        ``<name>.safetensors`` and the exact weight diffs ``<name>_lora.safetensors`` in ``stock_dtype`` (fp16 by
        default; None: the model's)."""
        from ...backend.files import output_paths

        kinds = ["e4t"] + (["embedding", "lora"] if stock else [])
        paths = output_paths(out_dir, name, kinds, overwrite)
        c = self.e4t.config
        training = dict(self.training or {}, name=paths["e4t"].stem)
        e4t_backend.save_e4t_concept(paths["e4t"], c, self.e4t.offsets, self.embedding,
                                     self.class_word or c.class_word, training, overwrite=overwrite)
        if stock:
            save_embedding(paths["embedding"], self.embedding, {"method": "e4t"}, overwrite=overwrite)
            self.weight_diff(model, stock_dtype).save(paths["lora"], overwrite=overwrite)
        return paths


def e4t_tune(model, vision, e4t: E4T, image: torch.Tensor, mask: torch.Tensor | None = None,
             class_word: str | None = None, steps: int | None = None, lr: float | None = None, seed: int = 0,
             on_progress=None, should_cancel=None, mixed_precision: str = "no") -> E4TConcept:
    """Tune a copy of ``e4t`` on one image ([3, H, W] in [0, 1]) for ``steps`` steps (0: the encoder's prediction
    alone). ``model``, ``vision`` and ``e4t`` are left as they were."""
    c = e4t.config
    if c.family != model.family:
        raise ValueError(f"this E4T file was pre-trained for the '{c.family}' family; the model is '{model.family}'")
    word = class_word or c.class_word
    check_identifier(c.identifier, word)
    tuned = copy.deepcopy(e4t).to(model.unet.device).train()
    size = default_resolution(model)
    images, masks = prepare_images(image if image.ndim == 4 else image[None], size,
                                   None if mask is None else (mask if mask.ndim == 4 else mask[None]))
    if images.shape[0] != 1:
        log.info("E4T tunes on one image; using the first of %d", images.shape[0])
        images, masks = images[:1], None if masks is None else masks[:1]
    if c.tune_flip:
        images, masks = with_mirrors(images, masks)
    ts = cache_images(model, images, masks)
    prompt = training_template(model.family).format(identifier=c.identifier, class_noun=word)
    host = E4THost(model, tuned, [prompt])
    batch = e4t_backend.Batch(ts.mean, class_tokens(vision, images, masks, c.vision_layers),
                              class_vectors(model, word), torch.zeros(len(images), dtype=torch.long), ts.masks)
    parts = [model.unet, vision, *[s.text_encoder for s in text_slots(model)]]
    result = None
    with frozen(*parts):
        if (steps if steps is not None else c.tune_steps) > 0:
            result = e4t_backend.tune(tuned, batch, host.features, host.encode, host.predict, host.schedule,
                                      host.modules, steps, lr, seed, on_progress, should_cancel, mixed_precision)
        vectors = e4t_backend.fix_concept(tuned, batch, host.features, host.encode, host.schedule, host.modules,
                                          seed)
    keys = [s.key for s in text_slots(model)]
    embedding = Embedding({k: v[None].detach().cpu() for k, v in zip(keys, vectors)}, model.family, c.identifier,
                          init_word=word, metadata={"method": "e4t"})
    training = {"method": "e4t", "class_word": word, "steps": steps if steps is not None else c.tune_steps,
                "lr": lr if lr is not None else c.tune_lr, "seed": seed, "mixed_precision": mixed_precision,
                "steps_done": result.steps if result is not None else 0,
                "status": result.status if result is not None else "done"}
    return E4TConcept(tuned.eval(), embedding, result, word, training)


@contextmanager
def weight_diffs_applied(model, diffs: dict[str, torch.Tensor], strength: float = 1.0, source: str = "weight diffs"):
    """While inside, each Linear of ``model.unet`` named in ``diffs`` (kohya names, :func:`backend.e4t.
    load_weight_diff`) computes x·(W + strength · diff)ᵀ + b, as a forward hook; the weights are never written."""
    from ...backend.lora import UNET_PREFIX, kohya_name

    by_name = {kohya_name(UNET_PREFIX, p): m for p, m in model.unet.named_modules()}
    missing = [k for k in diffs if k not in by_name]
    wrong = [k for k in diffs if k in by_name and (not isinstance(by_name[k], torch.nn.Linear)
                                                    or tuple(by_name[k].weight.shape) != tuple(diffs[k].shape))]
    if missing or wrong:
        raise ValueError(f"{source}: {len(missing)} layer(s) not in the model {missing[:2]}, {len(wrong)} of another "
                         f"shape {wrong[:2]}; they were made for another base model")
    handles = []
    try:
        for k, d in diffs.items():
            m = by_name[k]
            delta = (d.float() * strength).to(m.weight)
            handles.append(m.register_forward_hook(lambda mod, args, out, delta=delta:
                                                   out + torch.nn.functional.linear(args[0], delta.to(args[0]))))
        yield model.unet
    finally:
        for h in handles:
            h.remove()
