"""The ComfyUI host of InstantBooth: what the nodes in instantbooth.py do, written against ComfyUI's objects
by duck typing (a ModelPatcher, a CLIP, a CLIP_VISION, CONDITIONING lists), so it imports no ComfyUI module and is
tested without ComfyUI. The counterpart of hosts/diffusers/instantbooth.py; both must give the same result on the same
weights.

- Adapters: one ``middle_patch`` on a clone of the MODEL. ComfyUI calls it inside every BasicTransformerBlock after
  the self-attention residual and before cross-attention, with ``transformer_index`` (which spatial transformer, in
  execution order) and ``block_index`` (depth inside it), which the file's AdapterLayout maps to adapter i.
- Concept token: the identifier's rows of the encoded prompt, found by re-tokenizing the prompt with the CLIP's own
  tokenizer, are replaced by α·f_c. The chunk length comes from the tokens, never a hard-coded 77."""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import torch

from ...backend.identifier import find_identifier_rows, inject_concept, insert_identifier
from ...backend.regions import at_size, block_grid, box_mask, check_mask
from ...backend.instantbooth import AdapterLayout, Concept, InstantBooth, check_sampling_share
from .common import model_family, model_name, model_text_width


log = logging.getLogger(__name__)


@dataclass
class BoothModel:
    """What travels on an INSTANTBOOTH link: the loaded file and its name (for messages)."""

    model: InstantBooth
    name: str


@dataclass(frozen=True)
class Region:
    """Where a concept acts (issue #29): an optional mask ([H, W] in [0, 1], 1 inside, any size: it is stretched to
    the image) times an optional box (x0, y0, x1, y1, fractions of the image). Neither: the whole image."""

    mask: torch.Tensor | None = None
    box: tuple[float, float, float, float] | None = None

    def is_empty(self) -> bool:
        return self.mask is not None and not bool((self.mask > 0).any())

    def at(self, height: int, width: int) -> torch.Tensor:
        """The region on a [height, width] grid: the mask resampled by area (each cell the mean of the pixels it
        covers), times the box's exact coverage of each cell (backend.regions.box_mask)."""
        out = torch.ones(height, width)
        if self.mask is not None:
            out = at_size(self.mask, height, width)
        if self.box is not None:
            out = out * box_mask(self.box, height, width)
        return out


@dataclass
class BoothConcept:
    """What travels on an INSTANTBOOTH_CONCEPT link: the encoders' output and the InstantBooth it came from (the
    Apply node needs that file's adapters), and where it acts (InstantBooth Region; None: the whole image)."""

    concept: Concept
    booth: BoothModel
    region: Region | None = None


def _is_spatial_transformer(layer) -> bool:
    blocks = getattr(layer, "transformer_blocks", None)
    return blocks is not None and len(blocks) > 0 and all(hasattr(b, "attn1") for b in blocks)


def _changes_level(layer) -> int:
    """-1/+1 for an up/down-sampling layer of ComfyUI's openaimodel UNet (Upsample/Downsample or an up/down ResBlock),
    0 otherwise."""
    name = type(layer).__name__
    if name == "Downsample":
        return 1
    if name == "Upsample":
        return -1
    if getattr(layer, "updown", False):
        return 1 if type(getattr(layer, "h_upd", None)).__name__ == "Downsample" else -1
    return 0


def unet_adapter_layout(diffusion_model) -> AdapterLayout:
    """The adapter layout of a ComfyUI UNet (comfy/ldm/modules/diffusionmodules/openaimodel.py), read from its modules
    in the order its forward numbers them with ``transformer_index``: input blocks, middle block, output blocks."""
    if not hasattr(diffusion_model, "input_blocks") or not hasattr(diffusion_model, "output_blocks"):
        raise ValueError(f"the model's denoiser is a {type(diffusion_model).__name__}, not a UNet: InstantBooth works "
                         f"with Stable Diffusion UNets (SD1.x, SD2.x, SDXL)")
    dims, heads, levels, depths = [], [], [], []
    level = 0
    middle = diffusion_model.middle_block
    stages = ([("input", b) for b in diffusion_model.input_blocks]
              + ([("middle", middle)] if middle is not None else [])
              + [("output", b) for b in diffusion_model.output_blocks])
    for where, block in stages:
        for layer in block:
            if _is_spatial_transformer(layer):
                depths.append(len(layer.transformer_blocks))
                for tb in layer.transformer_blocks:
                    dims.append(int(tb.attn1.to_q.in_features))
                    heads.append(int(getattr(tb, "n_heads", getattr(tb.attn1, "heads", 1))))
                    levels.append(level)
            elif where != "middle":
                level += _changes_level(layer)
    if not dims:
        raise ValueError("the model's UNet has no transformer blocks, so InstantBooth has nowhere to go")
    return AdapterLayout(dims=dims, heads=heads, levels=levels, depths=depths)


def check_model(booth: BoothModel, model) -> AdapterLayout:
    """The file must be for this model: same family/text width and the same transformer blocks. Returns the file's
    layout. Errors say which file and what it was made for."""
    c = booth.model.config
    width, family = model_text_width(model), model_family(model)
    if (width is not None and width != c.ctx_dim) or (c.family != "toy" and family is not None and family != c.family):
        raise ValueError(f"InstantBooth file '{booth.name}' was trained for base family '{c.family}' (text width "
                         f"{c.ctx_dim}), but the model is {model_name(model)} (family '{family}', text width {width}); "
                         f"load an InstantBooth file made for {family or 'this model'}.")
    layout = unet_adapter_layout(model.get_model_object("diffusion_model"))
    want = c.layout
    if (layout.dims, layout.depths) != (want.dims, want.depths):
        raise ValueError(f"InstantBooth file '{booth.name}' does not fit this model's transformer blocks: the model "
                         f"has widths {layout.dims} with depths {layout.depths}, the file has widths {want.dims} with "
                         f"depths {want.depths}; the file is for another base model.")
    return want


def check_family_for_load(model) -> tuple[str | None, int | None]:
    """(family, text width) to pass to formats.load_instantbooth so the loader rejects a file for another model."""
    return model_family(model), model_text_width(model)


# ----------------------------------------------------------------------------------------------------------------------
# the adapters as a middle_patch


def parse_indices(text: str, what: str) -> list[int]:
    """'0, 2' -> [0, 2]; '' -> []."""
    out = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ValueError(f"{what}: '{part}' is not a number; write numbers separated by commas, e.g. '0' or "
                             f"'0, 1' (empty: none)") from None
    return out


class InstantBoothPatch:
    """InstantBooth's adapters as one ComfyUI ``middle_patch``: in block i, y += β·tanh(γ_i)·S_i([y, f_p])[:len(y)].

    Keys/values of f_p do not depend on y, so they are computed once per device/dtype the model samples on and reused
    at every step and for cond and uncond alike (one batch). The loaded InstantBooth is never moved or cast in place:
    a copy of the adapters is made for a device/dtype other than its own."""

    def __init__(self, instantbooth: InstantBooth, f_p: torch.Tensor, beta: float, enabled: list[bool] | None = None,
                 sigma_range: tuple[float, float] | None = None, region: Region | None = None):
        """``region``: the adapter term is multiplied by it at every block's token grid (None: the whole image);
        the grid's size comes from the latent's shape, ``transformer_options["original_shape"]``."""
        self.instantbooth = instantbooth
        self.region = region
        self._token_masks: dict[tuple, torch.Tensor] = {}
        self.layout = instantbooth.config.layout
        self.f_p = (f_p if f_p.ndim == 3 else f_p[None]).detach()
        self.beta = float(beta)
        self.enabled = list(enabled) if enabled is not None else [True] * len(self.layout)
        if len(self.enabled) != len(self.layout):
            raise ValueError(f"{len(self.enabled)} enabled flags for {len(self.layout)} adapters")
        self.sigma_range = sigma_range  # (sigma at start_percent, sigma at end_percent); None: every step
        # the file's guidance setting (InstantBoothConfig.adapters_on_uncond): False = uncond chunks stay the base's
        self.cond_only = not getattr(instantbooth.config, "adapters_on_uncond", True)
        self._prepared: dict[tuple, tuple[list, list]] = {}

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone() deep-copies model_options; the weights are shared, never copied per clone

    def to(self, device_or_dtype):
        """ComfyUI moves patches with the model (``model_patches_to``). The work happens lazily on the sampling
        device; moving away from a device only drops what was prepared there, which frees its memory."""
        if isinstance(device_or_dtype, torch.dtype):
            return self
        device = torch.device(device_or_dtype)
        self._prepared = {k: v for k, v in self._prepared.items() if _same_device(k[0], device)}
        return self

    def _active(self, extra_options) -> bool:
        if self.sigma_range is None:
            return True
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        sigma = float(sigmas.detach().flatten()[0])
        start, end = self.sigma_range
        return end <= sigma <= start

    def prepared(self, device: torch.device, dtype: torch.dtype) -> tuple[list, list]:
        """(adapters, f_p keys/values) on device/dtype, computed on first use and cached. The keys/values are computed
        with the loaded weights in their own precision (as the diffusers host does), then cast."""
        key = (device, dtype)
        if key not in self._prepared:
            adapters, kv = [], []
            for adapter, on in zip(self.instantbooth.adapters, self.enabled):
                if not on:
                    adapters.append(None)
                    kv.append(None)
                    continue
                p = next(adapter.parameters())
                with torch.no_grad():
                    k, v = adapter.patch_kv(self.f_p.to(device=p.device))
                kv.append((k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)))
                if p.device != device or p.dtype != dtype:
                    adapter = copy.deepcopy(adapter).to(device=device, dtype=dtype)
                adapters.append(adapter)
            self._prepared[key] = (adapters, kv)
        return self._prepared[key]

    def __call__(self, x: torch.Tensor, extra_options: dict) -> torch.Tensor:
        i = self.layout.index(extra_options["transformer_index"], extra_options.get("block_index", 0))
        if not self.enabled[i] or not self._active(extra_options):
            return x
        adapters, kv = self.prepared(x.device, x.dtype)
        r = adapters[i].residual(x, beta=self.beta, kv=kv[i])
        if self.region is not None:
            r = r * self.token_mask(x.shape[1], extra_options.get("original_shape"), x.device, x.dtype)[None, :, None]
        chunks = extra_options.get("cond_or_uncond") or []
        if self.cond_only and 1 in chunks and x.shape[0] % len(chunks) == 0:
            # ComfyUI batches cond (0) and uncond (1) chunks of equal size; the uncond ones get no residual
            keep = torch.tensor([float(c != 1) for c in chunks], device=x.device, dtype=x.dtype)
            r = r * keep.repeat_interleave(x.shape[0] // len(chunks))[:, None, None]
        return x + r

    def token_mask(self, tokens: int, latent_shape, device, dtype) -> torch.Tensor:
        """The region at a block of ``tokens`` latent tokens ([tokens], row-major as the block flattens its grid),
        for a latent of ``latent_shape`` ([B, C, H, W]); computed once per grid."""
        if latent_shape is None or len(latent_shape) != 4:
            raise ValueError(f"InstantBooth Region needs the latent's shape [B, C, H, W] from ComfyUI's "
                             f"transformer_options['original_shape'], got {latent_shape}: this model does not give it")
        height, width = int(latent_shape[-2]), int(latent_shape[-1])
        key = (tokens, height, width, device, dtype)
        if key not in self._token_masks:
            gh, gw = block_grid(tokens, height, width)
            self._token_masks[key] = self.region.at(gh, gw).flatten().to(device=device, dtype=dtype)
        return self._token_masks[key]


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def apply(model, booth_concept: BoothConcept, beta: float, start_percent: float = 0.0, end_percent: float = 1.0,
          skip_levels: str = "", skip_blocks: str = ""):
    """A clone of ``model`` with InstantBooth's adapters; ``model`` itself is never changed. ``beta`` 0 means the
    file's β (as ``boothkit generate`` without ``--beta``). No enabled adapter or an empty step range give a plain
    clone, so the output is exactly the unpatched one."""
    booth = booth_concept.booth
    beta = beta or booth.model.config.beta
    layout = check_model(booth, model)
    check_sampling_share(start_percent, end_percent)
    enabled = layout.select(skip_levels=parse_indices(skip_levels, "skip_levels"),
                            skip_blocks=parse_indices(skip_blocks, "skip_blocks"))
    m = model.clone()
    region = booth_concept.region
    if beta == 0 or not any(enabled) or start_percent == end_percent or (region is not None and region.is_empty()):
        return m
    sigma_range = None
    if start_percent > 0.0 or end_percent < 1.0:
        sampling = model.get_model_object("model_sampling")
        sigma_range = (float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent)))
    # ComfyUI appends to the middle_patch list: a second Apply on this output runs after this one, in the same block
    m.set_model_patch(InstantBoothPatch(booth.model, booth_concept.concept.f_p, beta, enabled, sigma_range, region),
                      "middle_patch")
    return m


def with_region(booth_concept: BoothConcept, mask: torch.Tensor | None = None,
                box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0), identifier: str = "") -> BoothConcept:
    """The concept limited to a region (a ComfyUI MASK [1, H, W] or [H, W], 1 inside; and/or a box of fractions of the
    image; both: their product) and, with ``identifier``, put into the prompt at that word instead of the file's.
    The whole-image box and no mask give no region (exactly the single-concept path)."""
    if mask is not None:
        m = mask
        if m.ndim == 3:
            if m.shape[0] != 1:
                raise ValueError(f"a region is one mask; got a batch of {m.shape[0]} masks (shape "
                                 f"{tuple(mask.shape)}): pick one with a mask batch node")
            m = m[0]
        mask = check_mask(m.detach().float().cpu())
    box = tuple(float(v) for v in box)
    whole = box == (0.0, 0.0, 1.0, 1.0)
    if not whole:
        box_mask(box, 1, 1)  # checks the box
    region = None if mask is None and whole else Region(mask=mask, box=None if whole else box)
    concept = booth_concept.concept
    identifier = identifier.strip()
    if identifier:
        if len(identifier.split()) != 1:
            raise ValueError(f"identifier {identifier!r} must be one word (e.g. zwx)")
        concept = dataclasses.replace(concept, identifier=identifier)
    return BoothConcept(concept=concept, booth=booth_concept.booth, region=region)


# ----------------------------------------------------------------------------------------------------------------------
# concept images -> CONCEPT


def _masks_for(masks: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor | None:
    """ComfyUI MASK ([N, H, W] or [H, W], 1 on the subject) -> [N, 1, H, W] matching ``images`` [N, 3, H, W]."""
    if masks is None:
        return None
    n, _, h, w = images.shape
    m = masks.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise ValueError(f"mask must be [N, H, W], got shape {tuple(masks.shape)}")
    if m.shape[0] == 1 and n > 1:
        m = m.expand(n, -1, -1)
    if m.shape[0] != n:
        raise ValueError(f"{m.shape[0]} masks for {n} images: give one mask per image (or one for all)")
    m = m[:, None]
    if m.shape[-2:] != (h, w):
        m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    empty = [i for i in range(n) if not bool((m[i] > 0.5).any())]
    if empty:
        raise ValueError(f"mask {empty} is empty (nothing above 0.5): the mask must be 1 on the subject. LoadImage "
                         f"gives an empty mask for an image without alpha; leave the mask input unconnected to use "
                         f"whole images.")
    return m


def encode_concept(booth: BoothModel, clip_vision, images: torch.Tensor, masks: torch.Tensor | None = None
                   ) -> BoothConcept:
    """N concept images (ComfyUI IMAGE [N, H, W, 3] in 0..1, optional MASK) -> CONCEPT: crop each image to its mask's
    box, fill the background, resize (backend.preprocess, as in training), run the frozen CLIP vision backbone
    (ComfyUI normalises), then the concept and patch encoders."""
    from ...backend.preprocess import clip_normalize, prepare_concept_images  # kornia: only when a concept is encoded

    c = booth.model.config
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"images must be an IMAGE batch [N, H, W, 3], got shape {tuple(images.shape)}")
    pixels = images[..., :3].movedim(-1, 1).float().cpu()
    masks = _masks_for(masks.cpu() if masks is not None else None, pixels)
    with torch.no_grad():
        crops = prepare_concept_images(pixels, masks, c.image_size, c.crop_margin, c.background, normalize=False)
        out = clip_vision.encode_image(crops.movedim(1, -1).clamp(0, 1), crop=False)
        tokens = out["last_hidden_state"]
        if tokens.shape[1] != c.tokens_per_image:
            raise ValueError(f"the CLIP vision model gives {tokens.shape[1]} tokens per image, but InstantBooth file "
                             f"'{booth.name}' was trained with {c.tokens_per_image}: load the CLIP vision model it was "
                             f"trained with.")
        # a file with pixel features reads the backbone's input too, normalised as the backbone saw it
        pixels = clip_normalize(crops) if c.pixel_features else None
        concept = booth.model.encode(out["image_embeds"].float().cpu(), tokens.float().cpu(), pixels)
    return BoothConcept(concept=concept, booth=booth)


# ----------------------------------------------------------------------------------------------------------------------
# the concept token in the encoded prompt


def _token_id(t) -> int:
    return t if isinstance(t, int) else -1  # an embedding (textual inversion) tensor is never the identifier


def identifier_token_ids(clip, identifier: str) -> dict[str, list[int]]:
    """The identifier's token ids for each of the CLIP's tokenizers ('l', 'g', 'h', ...)."""
    tokens = clip.tokenize(identifier, return_word_ids=True)
    return {key: [_token_id(t) for t, _w, word in chunks[0] if word != 0] for key, chunks in tokens.items()}


def identifier_rows(clip, text: str, identifier: str) -> tuple[list[int], int]:
    """Rows of the identifier in the encoded ``text`` and the encoded prompt's length, from the CLIP's tokenizers.

    SDXL has two tokenizers (its encoded prompt is their outputs side by side): they must agree."""
    ident = identifier_token_ids(clip, identifier)
    found = {}
    for key, chunks in clip.tokenize(text).items():
        ids = [[_token_id(tok[0]) for tok in chunk] for chunk in chunks]
        found[key] = (find_identifier_rows(ids, ident[key]), sum(len(chunk) for chunk in ids))
    results = set((tuple(rows), length) for rows, length in found.values())
    if len(results) != 1:
        raise ValueError(f"the text encoders' tokenizers place the identifier {identifier!r} differently "
                         f"({ {k: v[0] for k, v in found.items()} }); use an identifier that is one token for all of "
                         f"them")
    rows, length = results.pop()
    return list(rows), length


def condition(conditioning: list, clip, text: str, booth_concept: BoothConcept, alpha: float) -> list:
    """CONDITIONING made from ``text`` -> the same with the identifier's rows replaced by α·f_c (pooled output and
    every other row untouched). ``alpha`` 0 means the file's α (as ``boothkit generate`` without ``--alpha``)."""
    concept = booth_concept.concept
    alpha = alpha or booth_concept.booth.model.config.alpha
    rows, length = identifier_rows(clip, text, concept.identifier)
    if not rows:
        raise ValueError(f"the prompt {text!r} does not contain the identifier {concept.identifier!r}. Write it before "
                         f"the class noun, e.g. 'a photo of {concept.identifier} {concept.class_noun}', or use the "
                         f"InstantBooth Insert Identifier node.")
    out = []
    for cond, extras in conditioning:
        if cond.shape[1] != length:
            raise ValueError(f"the conditioning has {cond.shape[1]} token rows, but the text {text!r} tokenizes to "
                             f"{length}: give this node the same text that was encoded into the conditioning.")
        out.append([inject_concept(cond, rows, concept.f_c, alpha), dict(extras)])
    return out


def with_identifier(text: str, booth_concept: BoothConcept) -> str:
    """Insert the identifier before the first noun the InstantBooth file marks the subject with ("a photo of a
    person" -> "a photo of a sks person"); a text that already has it is returned unchanged."""
    return insert_identifier(text, booth_concept.concept.identifier, booth_concept.booth.model.config.subject_nouns())


def encode_text(clip, text: str, booth_concept: BoothConcept, alpha: float, add_identifier: bool = True) -> list:
    """Tokenize + encode ``text`` with the CLIP (as CLIPTextEncode does) and put the concept token in."""
    if add_identifier:
        text = with_identifier(text, booth_concept)
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return condition(conditioning, clip, text, booth_concept, alpha)
