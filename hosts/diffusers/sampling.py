"""A plain DDIM sampler with classifier-free guidance for SD1.x/SD2.x and the toy world (pixel space), taking
precomputed text conditioning so that a personalization method can hand in its modified prompt encoding."""
from __future__ import annotations

import torch

from .loading import SDModel


@torch.no_grad()
def sample(model: SDModel, cond: torch.Tensor, uncond: torch.Tensor, seed: int = 0, steps: int = 25,
           guidance: float = 5.0, progress=None) -> torch.Tensor:
    """cond/uncond [B, T, ctx] -> images [B, 3, H, W] in [0, 1]. ``progress(i, n)`` is called after each step."""
    from diffusers import DDIMScheduler

    if model.family == "sdxl":
        raise ValueError("the plain sampler covers SD1.x/SD2.x/toy; SDXL goes through diffusers' SDXL pipeline")
    unet = model.unet
    param = next(unet.parameters())
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    b = cond.shape[0]
    side = int(unet.config.sample_size)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, unet.config.in_channels, side, side, generator=g).to(param.device, param.dtype)
    x = x * sched.init_noise_sigma
    context = torch.cat([uncond.expand(b, -1, -1), cond]).to(param.device, param.dtype)
    for i, t in enumerate(sched.timesteps):
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        if progress is not None:
            progress(i + 1, len(sched.timesteps))
    if model.vae is not None:
        x = model.vae.decode(x / model.vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)
