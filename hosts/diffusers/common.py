"""What every diffusers host module needs: the text encoders' slots, prompts encoded with the identifier's
vectors spliced into its rows by a forward hook (the vocabulary and every weight stay bit-identical), the
denoiser as a function, its noise schedule and resolution, and training images cached as x0."""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...backend import tune
from ...backend.embedding import Embedding
from ...backend.preprocess import with_mirrors


# ----------------------------------------------------------------------------------------------------------------
# text encoders: splicing the identifier's vectors into the token embeddings


@dataclass
class TextSlot:
    """One text encoder, its tokenizer and the key its vectors have in an embedding file."""
    key: str
    text_encoder: torch.nn.Module
    tokenizer: object

    @property
    def width(self) -> int:
        """The width of the encoder's input token embeddings (an embedding file's vectors for this slot)."""
        return int(self.text_encoder.get_input_embeddings().weight.shape[1])


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


def make_predict(holder: dict) -> tune.Predict:
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


def schedule_of(model) -> tune.NoiseSchedule:
    s = model.scheduler
    return tune.NoiseSchedule(s.alphas_cumprod, getattr(s.config, "prediction_type", "epsilon"))


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
                 device=None, chunk: int = 4) -> tune.TrainingSet:
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
    return tune.TrainingSet(mean, std, masks)


# ----------------------------------------------------------------------------------------------------------------
# using the result: conditioning and the tuned denoiser


def encode_prompt(model, prompt: str, embedding: Embedding | None = None, resolution: int | None = None):
    """The conditioning of ``prompt`` (as in training: a tensor, or SDXL's dict). With ``embedding``, every
    occurrence of its identifier gets the learned vectors; without, the prompt is encoded as the tokenizer reads it."""
    slots = text_slots(model)
    resolution = resolution or default_resolution(model)
    if embedding is None:
        return tune.encode_all(PromptEncoder.plain(model, [prompt], resolution), [None] * len(slots), 1)
    # any in-vocabulary id can stand in for the vectors: their rows are replaced
    fill = [[s.tokenizer.bos_token_id] * embedding.num_vectors for s in slots]
    enc = PromptEncoder.spliced(model, [prompt], embedding.identifier, fill, resolution)
    vectors = [embedding.vectors[s.key].to(s.text_encoder.device) for s in slots]
    return tune.encode_all(enc, vectors, 1)
