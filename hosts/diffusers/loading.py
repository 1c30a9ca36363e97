"""Loading a Stable Diffusion model for the diffusers host and the trainers: a diffusers folder, a single-file
checkpoint (SD1.x, SD2.x, SDXL). Pixel-space models (``vae`` None, such as the toy world's base) come as the same
:class:`SDModel`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class SDModel:
    unet: object
    text_encoder: object
    tokenizer: object
    scheduler: object  # the training noise scheduler (add_noise, config.num_train_timesteps)
    vae: object | None  # None: the denoiser works in pixel space on images in [-1, 1] (the toy world)
    family: str  # sd1 | sd2 | sdxl | toy
    resolution: int  # native image size in pixels
    text_encoder_2: object | None = None  # SDXL
    tokenizer_2: object | None = None

    @property
    def ctx_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def parts(self):
        return [m for m in (self.unet, self.text_encoder, self.text_encoder_2, self.vae) if m is not None]

    def to(self, device) -> SDModel:
        for part in self.parts():
            part.to(device)
        return self


def default_device(name: str | None = None) -> torch.device:
    """The device the commands run on: ``name`` ("cpu", "cuda", "cuda:1" ...), or CUDA when there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def family_of(unet) -> str:
    """SD family from the UNet's own config (text width and SDXL's added conditioning), never from a file name."""
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(int(cfg.cross_attention_dim), "toy")


def load_sd(path: str | Path, dtype: torch.dtype = torch.float32, config: str | Path | None = None) -> SDModel:
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"{path}: not a diffusers model folder (no model_index.json)")
        return _loading(path, "a diffusers model folder (safetensors weights)", _from_folder, path, dtype)
    if path.is_file() and path.suffix == ".safetensors":
        return _loading(path, "a Stable Diffusion checkpoint", _from_single_file, path, dtype, config)
    if path.is_file():
        raise ValueError(f"{path}: only .safetensors checkpoints are loaded (no pickled .ckpt/.pt files)")
    raise FileNotFoundError(f"{path}: no such model folder or file")


def _from_folder(path: Path, dtype) -> SDModel:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=True)
    family = family_of(unet)
    kw = dict(torch_dtype=dtype, use_safetensors=True)  # safetensors only: a pickled .bin is refused, never run
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
    tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    te2 = tok2 = None
    if family == "sdxl":
        te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
        tok2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    vae = None
    if (path / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=True)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    res = int(unet.config.sample_size) * (_vae_scale(vae) if vae is not None else 1)
    return SDModel(unet, te, tok, scheduler, vae, family, res, te2, tok2)


def _from_single_file(path: Path, dtype, config) -> SDModel:
    if config is None:
        raise ValueError(f"{path}: loading a single-file checkpoint offline needs its configuration; pass "
                         f"--config with a local diffusers folder of the same family (its weights are not used)")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            is_xl = any(k.startswith("conditioner.embedders.1") for k in f.keys())
    except Exception as e:  # safetensors' own error types for a truncated or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(config), torch_dtype=dtype, local_files_only=True)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    family = family_of(pipe.unet)
    return SDModel(pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler, pipe.vae, family,
                   int(pipe.unet.config.sample_size) * _vae_scale(pipe.vae), getattr(pipe, "text_encoder_2", None),
                   getattr(pipe, "tokenizer_2", None))


def _loading(path, what: str, fn, *args):
    """``fn(*args)``, with the libraries' errors for a broken or foreign model (missing or pickled-only weights, a
    corrupt file, a config that does not fit) turned into one line naming the path."""
    try:
        return fn(*args)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, EnvironmentError) as e:
        if isinstance(e, (FileNotFoundError, ValueError)) and str(e).startswith(str(path)):
            raise  # already ours
        msg = " ".join(str(e).split())[:300]
        raise ValueError(f"{path}: cannot load it as {what} ({type(e).__name__}: {msg})") from None


def _vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_clip_vision(path: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers CLIPVisionModelWithProjection from a local folder."""
    from transformers import CLIPVisionModelWithProjection

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a CLIP vision model folder (no config.json)")
    return _loading(path, "a CLIP vision model folder (safetensors weights)", lambda: CLIPVisionModelWithProjection
                    .from_pretrained(path, torch_dtype=dtype, use_safetensors=True).eval())
