"""The toy world's text-to-image base model: a tiny Stable-Diffusion-shaped model in pixel space (32×32, no VAE).

* denoiser: diffusers ``UNet2DConditionModel`` (block_out_channels (32, 64, 128); cross-attention transformer blocks at
  16×16 and 8×8 and in the middle, none at 32×32; attention head dim 32), epsilon prediction;
* text encoder: a tiny transformers ``CLIPTextModel`` (width 64) over the toy tokenizer, its ``last_hidden_state``
  [B, 77, 64] is the cross-attention context, exactly as in SD1.x;
* scheduler: ``DDPMScheduler`` (1000 steps, linear betas — the pixel-space DDPM schedule); sampling uses DDIM with
  classifier-free guidance (the text encoder saw 10 % empty captions in training).

It is trained by ``toyworld/train_base.py`` on TRAIN identities with captions that name only class and context,
so it follows captions but cannot draw a specific identity from text alone. The shipped weights live in
``weights/base`` (a diffusers-style folder, every file sha256-checked through :mod:`.store`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import domain, store

logger = logging.getLogger(__name__)

BASE_DIR = "base"
BASE_FORMAT = "boothkit.toyworld.base"
BASE_VERSION = "1"
FAMILY = "toy"
TEXT_WIDTH = 64
DEFAULT_GUIDANCE = 3.0
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
TEXT_ENCODER_FILE = "text_encoder/model.safetensors"


class BaseModelError(ValueError):
    """A toy base-model file has missing or wrong metadata."""

    __module__ = "boothkit"  # its name in ComfyUI's error dialog, whatever folder the pack is cloned into


@dataclass
class ToyBase:
    unet: Any                 # diffusers UNet2DConditionModel
    text_encoder: Any         # transformers CLIPTextModel
    tokenizer: Any            # transformers CLIPTokenizer
    scheduler: Any            # diffusers DDPMScheduler (the training noise schedule)
    vae: Any = None           # pixel space: images in [-1, 1] go straight into the UNet
    family: str = FAMILY
    resolution: int = domain.RESOLUTION
    metadata: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


# ----------------------------------------------------------------------------------------------------------------
# configs


def unet_config(text_width: int = TEXT_WIDTH, tiny: bool = False) -> dict:
    """The UNet's config. ``attention_head_dim`` is, in diffusers' UNet2DConditionModel, the NUMBER of heads per
    block: channels/32 gives a head dim of 32. ``tiny`` is a test-sized variant."""
    channels = (8, 16, 32) if tiny else (32, 64, 128)
    return dict(
        sample_size=domain.RESOLUTION, in_channels=3, out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels, layers_per_block=1 if tiny else 2,
        attention_head_dim=tuple(max(1, c // 32) for c in channels),
        norm_num_groups=8, cross_attention_dim=text_width,
    )


def text_config(tokenizer, hidden: int = TEXT_WIDTH, layers: int = 3, heads: int = 4) -> dict:
    """A tiny CLIPTextConfig; bos/eos/pad ids come from the tokenizer (the pooled output reads the eos position)."""
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)


def build_base(tokenizer, *, tiny: bool = False, text_layers: int | None = None) -> ToyBase:
    """Randomly initialised components (what training starts from)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    width = 16 if tiny else TEXT_WIDTH
    unet = UNet2DConditionModel(**unet_config(width, tiny=tiny))
    tcfg = text_config(tokenizer, hidden=width, layers=text_layers or (1 if tiny else 3), heads=2 if tiny else 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tcfg))
    return ToyBase(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                   scheduler=DDPMScheduler(**scheduler_config()))


# ----------------------------------------------------------------------------------------------------------------
# saving and loading


def save_base(base: ToyBase, out_dir: str | Path, metadata: dict[str, str], dtype=torch.float16) -> list[Path]:
    """Write ``base`` as a diffusers-style folder (unet/, text_encoder/, scheduler/, model_index.json); both weight
    files carry ``metadata`` plus format/version/component. Each file is written atomically. Returns the files."""
    from ..backend.files import write_safetensors

    out = Path(out_dir)
    meta = {"format": BASE_FORMAT, "version": BASE_VERSION, "family": FAMILY,
            "resolution": str(domain.RESOLUTION), **{k: str(v) for k, v in metadata.items()}}
    files = []

    def write_json(rel: str, obj: dict) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=list) + "\n")
        tmp.replace(path)
        files.append(path)

    unet_cfg = {k: v for k, v in dict(base.unet.config).items() if not k.startswith("_")}
    write_json("unet/config.json", {"_class_name": "UNet2DConditionModel", **unet_cfg})
    sd = {k: v.to(dtype) for k, v in base.unet.state_dict().items()}
    files.append(write_safetensors(out / UNET_FILE, sd, {**meta, "component": "unet",
                                                           "dtype": str(dtype).replace("torch.", "")}))
    write_json("text_encoder/config.json", base.text_encoder.config.to_dict())
    sd = {k: v.to(dtype) for k, v in base.text_encoder.state_dict().items()}
    files.append(write_safetensors(out / TEXT_ENCODER_FILE, sd, {**meta, "component": "text_encoder",
                                                                  "dtype": str(dtype).replace("torch.", "")}))
    sched_cfg = {k: v for k, v in dict(base.scheduler.config).items() if not k.startswith("_")}
    write_json("scheduler/scheduler_config.json", {"_class_name": "DDPMScheduler", **sched_cfg})
    write_json("model_index.json", {"_class_name": "BoothKitToyBase", "format": BASE_FORMAT,
                                    "version": BASE_VERSION, "family": FAMILY, "resolution": domain.RESOLUTION,
                                    "unet": ["diffusers", "UNet2DConditionModel"],
                                    "text_encoder": ["transformers", "CLIPTextModel"],
                                    "scheduler": ["diffusers", "DDPMScheduler"],
                                    "tokenizer": "../tokenizer", "vae": None,
                                    **{k: str(v) for k, v in metadata.items()}})
    return files


def _read_weights(path: Path, component: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from ..backend.files import read_safetensors

    tensors, meta = read_safetensors(path)
    for key, expected in (("format", BASE_FORMAT), ("version", BASE_VERSION), ("component", component)):
        if meta.get(key) != expected:
            raise BaseModelError(f"{path}: metadata field {key!r} is {meta.get(key)!r}, expected {expected!r}")
    return tensors, meta


def load_base(dtype=torch.float32, path: str | Path | None = None, device: str | torch.device = "cpu",
              tokenizer=None) -> ToyBase:
    """The shipped toy base model (every file sha256-verified), or the folder ``path`` written by :func:`save_base`.

    Modules come back in eval mode with ``requires_grad`` off; callers that train enable what they need."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import load_tokenizer

    folder = Path(path) if path is not None else store.verified_dir(BASE_DIR)
    for rel in ("model_index.json", "unet/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
                UNET_FILE, TEXT_ENCODER_FILE):
        if not (folder / rel).is_file():
            raise FileNotFoundError(f"{folder / rel}: missing; expected a toy base folder written by save_base")
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("format") != BASE_FORMAT:
        raise BaseModelError(f"{folder / 'model_index.json'}: field 'format' is {index.get('format')!r}, "
                             f"expected {BASE_FORMAT!r}")
    ucfg = {k: v for k, v in json.loads((folder / "unet/config.json").read_text()).items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(ucfg)
    sd, meta = _read_weights(folder / UNET_FILE, "unet")
    unet.load_state_dict({k: v.float() for k, v in sd.items()})
    text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(folder / "text_encoder/config.json")))
    tsd, _ = _read_weights(folder / TEXT_ENCODER_FILE, "text_encoder")
    missing, unexpected = text_encoder.load_state_dict({k: v.float() for k, v in tsd.items()}, strict=False)
    # position_ids is a non-persistent buffer in some transformers versions
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise BaseModelError(f"{folder / TEXT_ENCODER_FILE}: weights do not match the config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    scfg = {k: v for k, v in json.loads((folder / "scheduler/scheduler_config.json").read_text()).items()
            if not k.startswith("_")}
    scheduler = DDPMScheduler.from_config(scfg)
    if tokenizer is None:
        tokenizer = load_tokenizer() if path is None else load_tokenizer(
            folder.parent / "tokenizer" if (folder.parent / "tokenizer").is_dir() else None)
    if text_encoder.config.vocab_size != len(tokenizer):
        raise BaseModelError(f"{folder / 'text_encoder/config.json'}: vocab_size {text_encoder.config.vocab_size} "
                             f"does not match the toy tokenizer's {len(tokenizer)} tokens")
    for m in (unet, text_encoder):
        m.to(device=device).eval().requires_grad_(False)
        if next(m.parameters()).dtype != dtype:  # diffusers warns on any .to(dtype), even a no-op one
            m.to(dtype=dtype)
    return ToyBase(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, metadata=meta)


def load_sd_model(dtype=torch.float32):
    """The shipped toy base as the diffusers host's :class:`~boothkit.hosts.diffusers.loading.SDModel` (pixel space:
    no VAE), the model every command gets for ``--model toy``."""
    from ..hosts.diffusers.loading import SDModel

    b = load_base(dtype=dtype)
    return SDModel(b.unet, b.text_encoder, b.tokenizer, b.scheduler, None, FAMILY, b.resolution)


# ----------------------------------------------------------------------------------------------------------------
# text conditioning and sampling


def tokenize(base: ToyBase, prompts: list[str]) -> torch.Tensor:
    """Token ids [B, 77] (bos, words, eos, eos padding), as SD pads prompts."""
    tok = base.tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=base.tokenizer.model_max_length, return_tensors="pt")
    return tok.input_ids


def encode_prompts(base: ToyBase, prompts: list[str]) -> torch.Tensor:
    """Cross-attention context [B, 77, width]: the text encoder's last_hidden_state (SD1.x convention)."""
    ids = tokenize(base, prompts).to(base.text_encoder.device)
    return base.text_encoder(input_ids=ids).last_hidden_state


@torch.no_grad()
def sample(base: ToyBase, prompts: list[str], seed: int, steps: int = 25, guidance: float = DEFAULT_GUIDANCE,
           encoder_hidden_states: torch.Tensor | None = None, unet=None,
           negative_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance → images [B,3,R,R] in [0,1].

    ``encoder_hidden_states`` [B, L, width] replaces the encoded ``prompts`` (personalization methods pass modified
    conditioning; ``prompts`` then only sets the batch size and may be None); ``unet`` replaces the base UNet (e.g. a
    patched clone). The unconditional branch is the encoded empty prompt unless ``negative_hidden_states`` is given.
    Noise is drawn on the CPU from ``seed``, so results do not depend on the device."""
    from diffusers import DDIMScheduler

    unet = unet if unet is not None else base.unet
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    if encoder_hidden_states is None:
        if not prompts:
            raise ValueError("sample: give prompts or encoder_hidden_states")
        cond = encode_prompts(base, prompts)
    else:
        cond = encoder_hidden_states
    b = cond.shape[0]
    if prompts is not None and len(prompts) != b:
        raise ValueError(f"sample: {len(prompts)} prompts but encoder_hidden_states has batch {b}")
    cond = cond.to(device=device, dtype=dtype)
    if guidance != 1.0:
        uncond = negative_hidden_states if negative_hidden_states is not None else \
            encode_prompts(base, [""]).expand(b, -1, -1)
        uncond = uncond.to(device=device, dtype=dtype)
        if uncond.shape[1] != cond.shape[1]:
            raise ValueError(f"sample: conditioning length {cond.shape[1]} != unconditional length {uncond.shape[1]}")
        context = torch.cat([uncond, cond])
    else:
        context = cond
    sched = DDIMScheduler.from_config(base.scheduler.config, set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(int(seed))
    r = base.resolution
    x = torch.randn(b, 3, r, r, generator=gen).to(device=device, dtype=dtype)
    for t in sched.timesteps:
        inp = torch.cat([x, x]) if guidance != 1.0 else x
        eps = unet(inp, t.to(device), encoder_hidden_states=context).sample
        if guidance != 1.0:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        x = sched.step(eps.float(), t, x.float()).prev_sample.to(dtype)
    return ((x.float() + 1) / 2).clamp(0, 1).cpu()


def image_grid(images: torch.Tensor, nrow: int, upscale: int = 4):
    """A PIL image of ``images`` [B,3,R,R] in [0,1], ``nrow`` per row, nearest-upscaled (for quick looks)."""
    import numpy as np
    from PIL import Image

    b, c, h, w = images.shape
    rows = (b + nrow - 1) // nrow
    canvas = torch.ones(3, rows * (h + 1), nrow * (w + 1))
    for i in range(b):
        y, x = divmod(i, nrow)
        canvas[:, y * (h + 1):y * (h + 1) + h, x * (w + 1):x * (w + 1) + w] = images[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    return img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
