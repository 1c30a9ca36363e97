"""A plain DDIM sampler with classifier-free guidance for SD1.x/SD2.x and the toy world (pixel space), taking
precomputed text conditioning so that a personalization method can hand in its modified prompt encoding."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .loading import SDModel

# eps(x, t) -> the guided noise prediction for the batch x
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def latent_size(model: SDModel, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The denoiser's (rows, columns) for an image of ``height`` x ``width`` pixels (None: the model's own square);
    a side must be a whole number of latent pixels."""
    side = int(model.unet.config.sample_size)
    factor = 1 if model.vae is None else 2 ** (len(model.vae.config.block_out_channels) - 1)
    out = []
    for name, px in (("height", height), ("width", width)):
        if px is None:
            out.append(side)
            continue
        if px < factor or px % factor:
            raise ValueError(f"{name} {px}: expected a positive multiple of {factor} pixels (the VAE's downsampling)")
        out.append(px // factor)
    return out[0], out[1]


def guided(unet, x: torch.Tensor, t, context: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance in one batch: ``context`` is [unconditional; conditional] for the batch ``x``."""
    eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def guidance_context(model: SDModel, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    param = next(model.unet.parameters())
    return torch.cat([uncond.expand(cond.shape[0], -1, -1), cond]).to(param.device, param.dtype)


@torch.no_grad()
def sample(model: SDModel, cond: torch.Tensor, uncond: torch.Tensor, seed: int = 0, steps: int = 25,
           guidance: float = 5.0, progress=None, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """cond/uncond [B, T, ctx] -> images [B, 3, H, W] in [0, 1] (``height`` x ``width`` pixels; default the model's
    square). ``progress(i, n)`` is called after each step."""
    context = guidance_context(model, cond, uncond)
    return denoise(model, lambda x, t: guided(model.unet, x, t, context, guidance), cond.shape[0], seed, steps,
                   progress, height, width)


@torch.no_grad()
def denoise(model: SDModel, eps: Denoise, batch: int, seed: int = 0, steps: int = 25, progress=None,
            height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The DDIM loop over any guided noise prediction ``eps(x, t)`` (one prompt's, or several regions' composite)."""
    from diffusers import DDIMScheduler

    if model.family == "sdxl":
        raise ValueError("the plain sampler covers SD1.x/SD2.x/toy; SDXL goes through diffusers' SDXL pipeline")
    unet = model.unet
    param = next(unet.parameters())
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    rows, cols = latent_size(model, height, width)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config.in_channels, rows, cols, generator=g).to(param.device, param.dtype)
    x = x * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        x = sched.step(eps(x, t), t, x).prev_sample
        if progress is not None:
            progress(i + 1, len(sched.timesteps))
    if model.vae is not None:
        x = model.vae.decode(x / model.vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)
