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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backend import quicktune as qt
from ..backend.embedding import Embedding, save_embedding
from ..backend.formats import write_safetensors
from ..backend.identifier import DEFAULT_IDENTIFIER, check_identifier, training_template
from ..backend.lora import LoRA, save_lora
from ..backend.preprocess import prepare_images, with_mirrors
from ..backend.quicktune import resolve_mixed_precision

log = logging.getLogger(__name__)

PAPER_INIT_WORD = "rare"  # seed 002 initialises "(rare)" from the word "rare"
UNET_FORMAT = "boothkit.unet"


# ----------------------------------------------------------------------------------------------------------------
# text encoders: splicing the identifier's vectors into the token embeddings


@dataclass
class TextSlot:
    """One text encoder, its tokenizer and the key its vectors have in an embedding file."""
    key: str
    text_encoder: torch.nn.Module
    tokenizer: object


def text_slots(model) -> list[TextSlot]:
    if model.family == "sdxl":
        if getattr(model, "text_encoder_2", None) is None or getattr(model, "tokenizer_2", None) is None:
            raise ValueError("an SDXL model needs text_encoder_2 and tokenizer_2 (CLIP-G) beside CLIP-L")
        return [TextSlot("clip_l", model.text_encoder, model.tokenizer),
                TextSlot("clip_g", model.text_encoder_2, model.tokenizer_2)]
    return [TextSlot("emb_params", model.text_encoder, model.tokenizer)]


def word_ids(tokenizer, word: str) -> list[int]:
    return list(tokenizer(word, add_special_tokens=False).input_ids)


@dataclass
class SplicedPrompt:
    """A prompt's token ids (start, text, end, padding: the tokenizer's ``model_max_length``) with the identifier
    replaced by ``fill`` ids, and the rows of those positions."""
    ids: list[int]
    rows: list[int]


def splice(tokenizer, prompt: str, identifier: str, fill: Sequence[int]) -> SplicedPrompt:
    """Tokenize ``prompt`` with every occurrence of ``identifier`` (whole word) replaced by ``len(fill)`` positions
    holding ``fill``. CLIP's tokenizer splits on word boundaries, so tokenizing the pieces equals tokenizing the
    whole prompt with the fill word written in."""
    parts = re.split(rf"(?<![\w.\-]){re.escape(identifier)}(?![\w\-])", prompt, flags=re.IGNORECASE)
    if len(parts) < 2:
        raise ValueError(f"prompt {prompt!r} does not contain the identifier {identifier!r}; write it before the "
                         f"class noun, e.g. 'a photo of {identifier} cat'")
    ids, rows = [tokenizer.bos_token_id], []
    for i, part in enumerate(parts):
        if i:
            rows += range(len(ids), len(ids) + len(fill))
            ids += list(fill)
        if part.strip():
            ids += word_ids(tokenizer, part)
    length = tokenizer.model_max_length
    if rows and rows[-1] >= length - 1:
        raise ValueError(f"prompt {prompt!r} is too long: the identifier falls beyond the text encoder's "
                         f"{length} tokens; shorten the prompt")
    ids = ids[: length - 1] + [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids += [pad] * (length - len(ids))
    return SplicedPrompt(ids, rows)


@contextmanager
def spliced_rows(embedding_layer: torch.nn.Module, vec_index: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
    """While inside, the token-embedding layer's output row [b, i] is ``vectors[vec_index[b, i]]`` wherever
    ``vec_index[b, i] >= 0`` (differentiably); every other row is the layer's own. ``vectors`` [n, width] are shared
    by the batch; [B, n, width] give each prompt its own (E4T predicts one embedding per image)."""
    mask = (vec_index >= 0).unsqueeze(-1)
    index = vec_index.clamp_min(0).to(vectors.device)
    if vectors.ndim == 3:
        rows = vectors[torch.arange(index.shape[0], device=vectors.device)[:, None], index]
    else:
        rows = vectors[index]

    def hook(module, args, output):
        return torch.where(mask.to(output.device), rows.to(output.device, output.dtype), output)

    handle = embedding_layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class PromptEncoder:
    """The backend's ``encode(vectors, prompt_ids)``: the conditioning of training prompts with the identifier's
    vectors spliced in, the way diffusers' pipelines encode prompts (SD1/SD2/toy: last hidden state; SDXL: both
    encoders' penultimate hidden states concatenated, CLIP-G's pooled projection and the size/crop time ids)."""

    def __init__(self, model, ids: Sequence[torch.Tensor], vec_index: Sequence[torch.Tensor],
                 resolution: int | None = None):
        self.family, self.slots, self.resolution = model.family, text_slots(model), resolution
        self.ids, self.vec_index = list(ids), list(vec_index)

    @classmethod
    def spliced(cls, model, prompts: Sequence[str], identifier: str, fill: Sequence[Sequence[int]],
                resolution: int | None = None) -> PromptEncoder:
        """Prompts containing ``identifier``; its rows take the vectors (``fill`` ids stand in for them)."""
        slots = text_slots(model)
        if len(fill) != len(slots):
            raise ValueError(f"need fill ids for {len(slots)} text encoder(s), got {len(fill)}")
        all_ids, all_index = [], []
        for slot, f in zip(slots, fill):
            spliced = [splice(slot.tokenizer, p, identifier, f) for p in prompts]
            ids = torch.tensor([s.ids for s in spliced], device=slot.text_encoder.device)
            index = torch.full_like(ids, -1)
            for b, s in enumerate(spliced):
                for j, r in enumerate(s.rows):
                    index[b, r] = j % len(f)
            all_ids.append(ids)
            all_index.append(index)
        return cls(model, all_ids, all_index, resolution)

    @classmethod
    def plain(cls, model, prompts: Sequence[str], resolution: int | None = None) -> PromptEncoder:
        """Prompts encoded as the tokenizer reads them (class prompts, negative prompts)."""
        all_ids = []
        for slot in text_slots(model):
            t = slot.tokenizer
            all_ids.append(t(list(prompts), padding="max_length", max_length=t.model_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(slot.text_encoder.device))
        return cls(model, all_ids, [torch.full_like(i, -1) for i in all_ids], resolution)

    @property
    def num_prompts(self) -> int:
        return self.ids[0].shape[0]

    def __call__(self, vectors: Sequence[torch.Tensor | None], prompt_ids: torch.Tensor):
        outs = []
        for slot, ids, index, vec in zip(self.slots, self.ids, self.vec_index, vectors):
            sel = prompt_ids.to(ids.device)
            use = index[sel]
            splice_ctx = spliced_rows(slot.text_encoder.get_input_embeddings(), use, vec.to(ids.device)) \
                if vec is not None and bool((use >= 0).any()) else nullcontext()
            with splice_ctx:
                if self.family == "sdxl":
                    outs.append(slot.text_encoder(ids[sel], output_hidden_states=True))
                else:
                    outs.append(slot.text_encoder(ids[sel]))
        if self.family != "sdxl":
            return outs[0][0]
        hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        pooled = outs[1][0]  # CLIPTextModelWithProjection: text_embeds
        r = self.resolution or 1024
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=hidden.dtype, device=hidden.device)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled,
                "time_ids": time_ids.expand(hidden.shape[0], -1)}


def make_predict(holder: dict) -> qt.Predict:
    """``predict(x_t, t, cond)`` over ``holder["unet"]`` (a holder, so stage 2 of a full fine-tune can swap in its
    copy)."""
    def predict(x, t, cond):
        unet = holder["unet"]
        x = x.to(unet.dtype)
        if isinstance(cond, dict):
            added = {"text_embeds": cond["text_embeds"].to(unet.dtype), "time_ids": cond["time_ids"].to(unet.dtype)}
            return unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"].to(unet.dtype),
                        added_cond_kwargs=added, return_dict=False)[0]
        return unet(x, t, encoder_hidden_states=cond.to(unet.dtype), return_dict=False)[0]
    return predict


def schedule_of(model) -> qt.NoiseSchedule:
    s = model.scheduler
    return qt.NoiseSchedule(s.alphas_cumprod, getattr(s.config, "prediction_type", "epsilon"))


# ----------------------------------------------------------------------------------------------------------------
# images: prepared once, encoded once


def default_resolution(model) -> int:
    if getattr(model, "resolution", None):
        return int(model.resolution)
    size = model.unet.config.sample_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    if model.vae is None:
        return int(size)
    return int(size) * 2 ** (len(model.vae.config.block_out_channels) - 1)


@torch.no_grad()
def cache_images(model, images: torch.Tensor, masks: torch.Tensor | None = None, flip: bool = False,
                 device=None, chunk: int = 4) -> qt.TrainingSet:
    """x0 of the training images, computed once: VAE posterior mean/std scaled by ``scaling_factor`` (a fresh latent
    sample per step costs a multiply-add), or pixels in [-1, 1] when ``model.vae`` is None. ``flip`` adds the
    mirrored images."""
    device = device or model.unet.device
    pixels = images.to(device) * 2 - 1
    if flip:
        pixels, masks = with_mirrors(pixels, masks)
    if model.vae is None:
        mean, std = pixels.float(), None
    else:
        vae = model.vae
        sf = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        means, stds = [], []
        for chunk_px in pixels.split(chunk):
            dist = vae.encode(chunk_px.to(vae.dtype)).latent_dist
            means.append(((dist.mean - shift) * sf).float())
            stds.append((dist.std * sf).float())
        mean, std = torch.cat(means), torch.cat(stds)
    if masks is not None:
        masks = F.interpolate(masks.to(device).float(), size=mean.shape[-2:], mode="area")
    return qt.TrainingSet(mean, std, masks)


# ----------------------------------------------------------------------------------------------------------------
# quick-tune on a diffusers model


@dataclass
class QuickTuneResult:
    """What :func:`quick_tune` learned. The input model is unchanged; use :func:`tuned` / :func:`encode_prompt`
    to sample with the result, :meth:`save` to write the files."""
    embedding: Embedding
    lora: LoRA | None
    unet_state: dict[str, torch.Tensor] | None
    stage1: qt.TuneResult | None
    stage2: qt.TuneResult | None
    prompts: list[str]
    training: dict = field(default_factory=dict)
    prediction_type: str = "epsilon"

    @property
    def status(self) -> str:
        for r in (self.stage1, self.stage2):
            if r is not None and r.status != qt.DONE:
                return r.status
        return qt.DONE

    @property
    def message(self) -> str:
        return "; ".join(r.message for r in (self.stage1, self.stage2) if r is not None and r.message)

    def paths(self, out_dir, name: str | None = None, overwrite: bool = False) -> dict[str, Path]:
        kinds = ["embedding"] + (["lora"] if self.lora is not None else []) + \
            (["unet"] if self.unet_state is not None else [])
        return qt.output_paths(out_dir, name or self.embedding.identifier, kinds, overwrite)

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
               stage2: bool = True, resolution: int | None = None, on_progress: qt.Progress | None = None,
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
    config = config or (qt.QuickTuneConfig.toy() if model.family == "toy" else qt.QuickTuneConfig.sd())
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
            cond = qt.encode_all(class_encoder, [None] * len(slots), class_encoder.num_prompts, device)
            return qt.PriorPreservation(cache_images(model, cpx, None, config.flip), cond, config.prior_weight)

    with qt.frozen(model.unet, *text_encoders), _gradient_checkpointing(model.unet, config.gradient_checkpointing):
        data = cache_images(model, pixels, pmasks, config.flip)
        out = qt.two_stage(init_vectors, encoder, predict, schedule, data, encoder.num_prompts, config,
                           stage2_params if stage2 else None, run_stage1=stage1, prior=prior,
                           on_progress=on_progress, should_cancel=should_cancel, seed=seed, mixed_precision=mixed)

    embedding = Embedding({s.key: v.cpu() for s, v in zip(slots, out.vectors)}, model.family, identifier,
                          init_word if stage1 else "")
    r1, r2 = out.stage1, out.stage2
    training = {
        "method": "quicktune", "stages": [s for s, on in (("embedding", stage1), ("denoiser", stage2)) if on],
        "class_noun": class_noun, "prompts": templates, "init_word": init_word, "num_images": len(pixels),
        "num_class_images": 0 if class_images is None else len(class_images), "resolution": resolution,
        "seed": seed, "mixed_precision": mixed, "gradient_checkpointing": config.gradient_checkpointing,
        "mode": config.mode, "rank": config.rank, "alpha": config.alpha if config.alpha is not None else config.rank,
        "conv_rank": config.conv_rank, "flip": config.flip, "masked_loss": masks is not None,
        "stage1_steps": config.stage1.steps if stage1 else 0, "stage1_lr": config.stage1.lr,
        "stage1_batch_size": config.stage1.batch_size, "stage1_steps_done": r1.steps if r1 else 0,
        "stage2_steps": config.stage2.steps if stage2 else 0, "stage2_lr": config.stage2.lr,
        "stage2_batch_size": config.stage2.batch_size, "stage2_steps_done": r2.steps if r2 else 0,
        "status": out.status, "started_at": int(started), "finished_at": int(time.time()),
        "base_model": getattr(model, "name", ""),
    }
    unet_state = None
    if full_copy is not None and r2 is not None:
        unet_state = {k: v.detach().cpu() for k, v in full_copy.state_dict().items()}
    return QuickTuneResult(embedding, lora if (stage2 and r2 is not None) else None, unet_state, r1, r2, texts,
                           training, schedule.prediction_type)


# ----------------------------------------------------------------------------------------------------------------
# using the result: conditioning and the tuned denoiser


def encode_prompt(model, prompt: str, embedding: Embedding | None = None, resolution: int | None = None):
    """The conditioning of ``prompt`` (as in training: a tensor, or SDXL's dict). With ``embedding``, every
    occurrence of its identifier gets the learned vectors; without, the prompt is encoded as the tokenizer reads it."""
    slots = text_slots(model)
    resolution = resolution or default_resolution(model)
    if embedding is None:
        return qt.encode_all(PromptEncoder.plain(model, [prompt], resolution), [None] * len(slots), 1)
    # any in-vocabulary id can stand in for the vectors: their rows are replaced
    fill = [[s.tokenizer.bos_token_id] * embedding.num_vectors for s in slots]
    enc = PromptEncoder.spliced(model, [prompt], embedding.identifier, fill, resolution)
    vectors = [embedding.vectors[s.key].to(s.text_encoder.device) for s in slots]
    return qt.encode_all(enc, vectors, 1)


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

