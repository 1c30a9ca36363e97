"""InstantBooth as one object: the concept encoder and patch encoder heads plus one adapter per transformer block,
with the layout that ties adapters to a denoiser's blocks (the InstantBooth paper)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .adapter import Adapter
from .encoders import ConceptEncoder, PatchEncoder, PixelEncoder
from .identifier import class_nouns_for
from pathlib import Path
import json
from .files import FormatError, _Fields, check_bounds, load_module, write_safetensors

FAMILIES = {
    # base-model family -> text-encoder width (the concept token's width); "toy" is the project's own toy world
    "sd1": 768,
    "sd2": 1024,
    "sdxl": 2048,
    "toy": None,
}


@dataclass
class AdapterLayout:
    """Where the adapters go. Index i is the i-th transformer block in execution order (input/down blocks, middle,
    output/up blocks), the order both ComfyUI and diffusers run them in.

    dims/heads/levels are per block; ``levels`` is the resolution level (0 = full latent resolution, 1 = half, ...);
    ``depths`` is the number of blocks in each spatial transformer, in the same order, so a host that numbers
    transformers and blocks within them (ComfyUI's transformer_index/block_index) can find index i."""

    dims: list[int]
    heads: list[int]
    levels: list[int]
    depths: list[int]

    def __post_init__(self):
        n = len(self.dims)
        if not (len(self.heads) == len(self.levels) == n) or sum(self.depths) != n:
            raise ValueError(f"inconsistent adapter layout: {n} dims, {len(self.heads)} heads, {len(self.levels)} "
                             f"levels, depths summing to {sum(self.depths)}")
        self._offsets = [sum(self.depths[:i]) for i in range(len(self.depths))]

    def __len__(self) -> int:
        return len(self.dims)

    def index(self, transformer_index: int, block_index: int) -> int:
        """Adapter index of block ``block_index`` inside spatial transformer ``transformer_index``."""
        if not 0 <= transformer_index < len(self.depths) or not 0 <= block_index < self.depths[transformer_index]:
            raise IndexError(f"no adapter for transformer {transformer_index}, block {block_index}: this layout has "
                             f"depths {self.depths}")
        return self._offsets[transformer_index] + block_index

    def select(self, skip_levels: Iterable[int] = (), skip_blocks: Iterable[int] = ()) -> list[bool]:
        """Which adapters run, leaving out whole resolution levels and/or single blocks (as IP-Adapter users weight
        layers). The full-resolution level holds most of the adapters' cost."""
        skip_levels, skip_blocks = set(skip_levels), set(skip_blocks)
        unknown = skip_blocks - set(range(len(self)))
        if unknown:
            raise ValueError(f"blocks {sorted(unknown)} do not exist; this model has adapters 0..{len(self) - 1}")
        return [lvl not in skip_levels and i not in skip_blocks for i, lvl in enumerate(self.levels)]

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}


@dataclass
class InstantBoothConfig:
    vision_global_dim: int  # width of the backbone's global feature (CLIP image_embeds)
    vision_token_dim: int  # width of the backbone's tokens (CLIP last_hidden_state)
    tokens_per_image: int  # 257 for ViT-L/14 at 224 px
    ctx_dim: int  # text-encoder width: f_c and f_p live there
    layout: AdapterLayout
    family: str = "sd1"
    identifier: str = "sks"
    class_noun: str = "person"
    alpha: float = 0.4  # concept-token renormalisation at inference (eq. 6)
    beta: float = 0.3  # adapter weight at inference (1 during training)
    image_size: int = 224  # backbone input size
    crop_margin: float = 0.1  # preprocessing used in training, repeated at inference
    background: float = 0.0
    # Classifier-free guidance: True (files before this field, and the paper, which does not say): the adapters act on
    # the unconditional prediction too, so the identity enters at weight ≈ 1 while the prompt gets the guidance scale.
    # False (ours, beyond the paper): the unconditional prediction is the plain base model's, so guidance scales the
    # adapters' identity as it scales the prompt. A sampling setting, written into the file.
    adapters_on_uncond: bool = True
    # ours, beyond the paper: the adapters act from this share of sampling on (ComfyUI's start_percent; 0: from the
    # first step, the paper and files before this field), so the prompt lays the scene out before the subject's
    # features come in. A sampling setting, written into the file.
    start_percent: float = 0.0
    # ours, beyond the paper: f_p also carries each patch's pixels (backend.encoders.PixelEncoder), so the adapters
    # see colour and texture the frozen backbone drops. False in the paper and in files before this field.
    pixel_features: bool = False
    extra: dict = field(default_factory=dict)  # training settings etc., kept in the file's metadata

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown base-model family {self.family!r}; expected one of {sorted(FAMILIES)}")
        want = FAMILIES[self.family]
        if want is not None and want != self.ctx_dim:
            raise ValueError(f"family {self.family} has text width {want}, but ctx_dim is {self.ctx_dim}")
        if not 0.0 <= self.start_percent < 1.0:
            raise ValueError(f"start_percent is {self.start_percent}; expected a share of sampling in [0, 1)")

    def subject_nouns(self) -> list[str]:
        """The nouns that mark the subject in a prompt (the identifier goes before the first): the file's class
        noun and the category and extra nouns it was trained with."""
        trained = self.extra.get("settings", {})
        return class_nouns_for(trained.get("category", self.class_noun),
                               [self.class_noun, *trained.get("class_nouns", [])])


@dataclass
class Concept:
    """What the encoders make of N images of one subject."""

    f_c: torch.Tensor  # [ctx]
    f_p: torch.Tensor  # [N*T, ctx]
    identifier: str
    class_noun: str
    num_images: int


class InstantBooth(nn.Module):
    def __init__(self, config: InstantBoothConfig):
        super().__init__()
        self.config = config
        self.concept_encoder = ConceptEncoder(config.vision_global_dim, config.ctx_dim)
        self.patch_encoder = PatchEncoder(config.vision_token_dim, config.ctx_dim)
        self.pixel_encoder = (PixelEncoder(config.image_size, config.tokens_per_image, config.ctx_dim)
                              if config.pixel_features else None)
        lay = config.layout
        self.adapters = nn.ModuleList(Adapter(d, config.ctx_dim, h) for d, h in zip(lay.dims, lay.heads))

    def encode(self, global_features: torch.Tensor, tokens: torch.Tensor, pixels: torch.Tensor | None = None,
               identifier: str | None = None, class_noun: str | None = None) -> Concept:
        """Backbone outputs of N images ([N, Dg] and [N, T, Dt]) -> Concept(f_c [ctx], f_p [N*T, ctx]); ``pixels``:
        the backbone's input [N, 3, S, S], needed by files with pixel features."""
        if global_features.ndim != 2 or tokens.ndim != 3 or global_features.shape[0] != tokens.shape[0]:
            raise ValueError(f"expected global features [N, D] and tokens [N, T, D] for the same N images, got "
                             f"{tuple(global_features.shape)} and {tuple(tokens.shape)}")
        c = self.config
        if global_features.shape[-1] != c.vision_global_dim or tokens.shape[-1] != c.vision_token_dim:
            raise ValueError(f"the CLIP vision model gives features of width {global_features.shape[-1]} / tokens of "
                             f"width {tokens.shape[-1]}, but this InstantBooth file was trained on a backbone with "
                             f"{c.vision_global_dim} / {c.vision_token_dim}: load the matching CLIP vision model.")
        dtype = self.concept_encoder.fc.weight.dtype
        f_c = self.concept_encoder(global_features.to(dtype))
        f_p = self.patch_features(tokens.to(dtype), pixels)
        return Concept(f_c=f_c, f_p=f_p, identifier=identifier or c.identifier,
                       class_noun=class_noun or c.class_noun, num_images=tokens.shape[0])

    def patch_features(self, tokens: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
        """f_p from the backbone's tokens [.., N, T, Dt], plus the pixel features where the file has them."""
        f_p = self.patch_encoder(tokens)
        if self.pixel_encoder is None:
            return f_p
        if pixels is None:
            raise ValueError("this InstantBooth file adds pixel features to f_p: pass the backbone's input images")
        return f_p + self.pixel_encoder(pixels)

    def patch_kv(self, f_p: torch.Tensor, enabled: list[bool] | None = None) -> list:
        """Keys/values of f_p for every adapter (None where disabled): computed once, reused at every step."""
        f_p = f_p if f_p.ndim == 3 else f_p[None]
        return [a.patch_kv(f_p) if enabled is None or enabled[i] else None for i, a in enumerate(self.adapters)]


def check_sampling_share(start_percent: float, end_percent: float) -> None:
    """A share of sampling, as both hosts take it: 0 <= start <= end <= 1."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent {start_percent} and end_percent {end_percent} must satisfy "
                         f"0 <= start <= end <= 1")


def timestep_window(start_percent: float, end_percent: float, train_timesteps: int) -> tuple[float, float] | None:
    """The denoiser timesteps (lo, hi) at which the adapters act, for a share of sampling given as ComfyUI gives it
    (its ``percent_to_sigma``: progress p is timestep (1 - p)(T - 1)), so both hosts switch at the same step.
    None: every step."""
    check_sampling_share(start_percent, end_percent)
    if start_percent == 0.0 and end_percent == 1.0:
        return None
    if start_percent == end_percent:
        return float(train_timesteps), -1.0  # an empty share: no timestep is in it (ComfyUI: a plain clone)
    last = train_timesteps - 1
    return (1.0 - end_percent) * last, (1.0 - start_percent) * last


INSTANTBOOTH_FORMAT = "boothkit.instantbooth"
MAX_TOKENS = 4096  # tokens per image of a vision backbone (ViT-L/14 at 224 px: 257)
MAX_IMAGE_SIZE = 4096  # the backbone's input size (224 for CLIP)
INSTANTBOOTH_VERSION = 1


def instantbooth_metadata(config: InstantBoothConfig) -> dict[str, str]:
    c = config
    return {
        "format": INSTANTBOOTH_FORMAT,
        "version": str(INSTANTBOOTH_VERSION),
        "method": "instantbooth",
        "family": c.family,
        "ctx_dim": str(c.ctx_dim),
        "vision_global_dim": str(c.vision_global_dim),
        "vision_token_dim": str(c.vision_token_dim),
        "tokens_per_image": str(c.tokens_per_image),
        "image_size": str(c.image_size),
        "layout": json.dumps(c.layout.to_dict()),
        "identifier": c.identifier,
        "class_noun": c.class_noun,
        "alpha": repr(float(c.alpha)),
        "beta": repr(float(c.beta)),
        "crop_margin": repr(float(c.crop_margin)),
        "background": repr(float(c.background)),
        "adapters_on_uncond": "true" if c.adapters_on_uncond else "false",
        "start_percent": repr(float(c.start_percent)),
        "pixel_features": "true" if c.pixel_features else "false",
        "training": json.dumps(c.extra, sort_keys=True, default=str),
    }


def save_instantbooth(path: str | Path, model: InstantBooth) -> Path:
    """Only the trained heads and adapters go into the file, never the base model."""
    return write_safetensors(path, model.state_dict(), instantbooth_metadata(model.config))


def instantbooth_config_from_metadata(path, metadata: dict[str, str]) -> InstantBoothConfig:
    f = _Fields(path, metadata)
    f.kind(INSTANTBOOTH_FORMAT, INSTANTBOOTH_VERSION, "instantbooth", "an InstantBooth file")
    lay = f.json("layout")
    check_bounds(path, "layout", lay)
    try:
        layout = AdapterLayout(**{k: [int(x) for x in lay[k]] for k in ("dims", "heads", "levels", "depths")})
        for k, low in (("dims", 1), ("heads", 1), ("levels", 0), ("depths", 0)):
            if any(x < low for x in getattr(layout, k)):
                raise ValueError(f"{k} must be integers >= {low}")
    except (KeyError, TypeError, ValueError) as e:
        raise f.error("layout", str(lay)[:80], f"dims/heads/levels/depths lists that fit together ({e})") from None
    try:
        extra = json.loads(metadata.get("training", "{}"))
    except json.JSONDecodeError:
        raise f.error("training", metadata["training"][:80], "JSON") from None
    if not isinstance(extra, dict):
        raise f.error("training", str(extra)[:80], "a JSON object")
    family = f.str("family", set(FAMILIES))
    ctx_dim = f.int("ctx_dim")
    try:
        return InstantBoothConfig(
            vision_global_dim=f.int("vision_global_dim"), vision_token_dim=f.int("vision_token_dim"),
            tokens_per_image=f.int("tokens_per_image", hi=MAX_TOKENS), ctx_dim=ctx_dim, layout=layout, family=family,
            identifier=f.str("identifier"), class_noun=f.str("class_noun"), alpha=f.float("alpha"),
            beta=f.float("beta"), image_size=f.int("image_size", hi=MAX_IMAGE_SIZE), crop_margin=f.float("crop_margin"),
            background=f.float("background"), extra=extra,
            # files written before these fields: the adapters act on both halves of guidance, from the first step; f_p
            # has no pixels
            adapters_on_uncond=f.flag("adapters_on_uncond", True), pixel_features=f.flag("pixel_features", False),
            start_percent=f.float("start_percent", 0.0))
    except ValueError as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{path}: inconsistent metadata: {e}") from None


def average_instantbooth(models: list[InstantBooth]) -> InstantBooth:
    """The mean of several InstantBooth models' weights (ours, beyond the paper: a "model soup", Wortsman et al.
    2022). Meant for runs continued from one start with different seeds: on the toy world's development set the mean
    of four runs read their mean identity at a context above each of them (docs/instantbooth_toy.md, section 18).
    Every setting but the training record must be the same; the result takes the first model's."""
    if len(models) < 2:
        raise ValueError(f"averaging needs at least two InstantBooth models, got {len(models)}")
    first = instantbooth_metadata(models[0].config)
    first.pop("training")
    for i, m in enumerate(models[1:], 1):
        other = instantbooth_metadata(m.config)
        for key, value in first.items():
            if other[key] != value:
                raise ValueError(f"model {i} differs from model 0 in {key!r} ({other[key][:60]} against "
                                 f"{value[:60]}): only files of one architecture and settings can be averaged")
    out = InstantBooth(replace(models[0].config, extra=dict(models[0].config.extra)))
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
                         for k, v in states[0].items()})
    return out


def load_instantbooth(path: str | Path, family: str | None = None, ctx_dim: int | None = None) -> InstantBooth:
    """Load and validate an InstantBooth file. ``family``/``ctx_dim`` are those of the model it will patch. The
    metadata is bounded and checked against the tensors' shapes (read from the header) before anything is built,
    and the tensors must be finite (backend/files.load_module)."""
    def check(config: InstantBoothConfig) -> None:
        if family is not None and family != config.family:
            raise FormatError(f"{path}: this InstantBooth file was trained for base family '{config.family}', but the "
                              f"model to patch is '{family}'; load an InstantBooth file made for {family}.")
        if ctx_dim is not None and ctx_dim != config.ctx_dim:
            raise FormatError(f"{path}: metadata field 'ctx_dim' is {config.ctx_dim}, but the model's text encoder "
                              f"is {ctx_dim} wide; the file is for another base model.")

    return load_module(path, lambda meta: instantbooth_config_from_metadata(path, meta), InstantBooth, "layout",
                       check)
