"""`boothkit bench overhead`: one denoising step of an SD1.5-shaped UNet (real architecture, random weights, 64×64
latent, batch 2 = cond + uncond) with and without InstantBooth's adapters in every transformer block, measured
interleaved in one run so machine noise hits every variant alike. Reports time ratios against the plain UNet."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
TINY_UNET = dict(  # for a smoke run of the bench itself
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=2, norm_num_groups=8,
)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="boothkit bench overhead", description=__doc__)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs every variant once)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny UNet, to check the bench itself runs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv or [])
    from diffusers import UNet2DConditionModel

    from ..backend.instantbooth import InstantBooth, InstantBoothConfig
    from ..hosts.diffusers.instantbooth import InstantBoothHooks, adapter_layout

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if args.tiny else SD15_UNET)).eval()
    unet = unet.to(device, dtype)
    latent = 16 if args.tiny else args.latent
    ctx = 768
    layout = adapter_layout(unet)
    ib = InstantBooth(InstantBoothConfig(vision_global_dim=768, vision_token_dim=1024, tokens_per_image=257,
                                         ctx_dim=ctx, layout=layout, family="sd1")).eval().to(device, dtype)
    with torch.no_grad():
        for a in ib.adapters:
            a.gate.fill_(0.5)  # a trained-looking gate, so the adapters really compute

    x = torch.randn(2, 4, latent, latent, dtype=dtype, device=device)
    t = torch.tensor([500, 500], device=device)
    cond = torch.randn(2, 77, ctx, dtype=dtype, device=device)
    f_p = {n: torch.randn(257 * n, ctx, dtype=dtype, device=device) for n in (1, 4)}

    def step():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=cond)

    def with_hooks(n, enabled=None, recompute_kv=False):
        """A variant = (set-up outside the timer, timed step). The hooks compute f_p's K/V once per sampling run,
        which is set-up; ``recompute_kv`` times what an implementation without that cache pays every step."""
        def timed(hooks):
            if recompute_kv:
                with torch.no_grad():
                    hooks.kv = ib.patch_kv(f_p[n], hooks.enabled)
            step()
        return (lambda: InstantBoothHooks(unet, ib, f_p[n], beta=0.3, enabled=enabled)), timed

    variants = {
        "plain UNet": ((lambda: None), (lambda hooks: step())),
        "N=1": with_hooks(1),
        "N=4": with_hooks(4),
        "N=1, f_p K/V recomputed each step": with_hooks(1, recompute_kv=True),
        "N=1, adapters off at level 0 (64x64)": with_hooks(1, enabled=layout.select(skip_levels=[0])),
        "N=4, adapters off at level 0 (64x64)": with_hooks(4, enabled=layout.select(skip_levels=[0])),
    }

    def run(variant) -> float:
        setup, timed = variant
        hooks = setup()
        try:
            sync()
            t0 = time.perf_counter()
            timed(hooks)
            sync()
            return time.perf_counter() - t0
        finally:
            if hooks is not None:
                hooks.remove()

    for variant in variants.values():  # warm-up: allocator, SDPA kernels
        run(variant)
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats):
        # interleaved, and rotated each round so no variant always runs first: noise hits every variant alike
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(run(variants[name]))

    base = statistics.median(times["plain UNet"])
    n_level0 = sum(1 for lvl in layout.levels if lvl == 0)
    print(f"UNet {'tiny' if args.tiny else 'SD1.5-shaped'} ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M "
          f"params), {len(layout)} adapters ({sum(p.numel() for p in ib.adapters.parameters()) / 1e6:.0f}M params, "
          f"{n_level0} at level 0), latent {latent}x{latent}, batch 2, {args.dtype}, {device.type}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, "
          f"median of {args.repeats}")
    print(f"{'variant':<40} {'s/step':>8} {'ratio':>7}")
    ratios = {}
    for name, ts in times.items():
        r = statistics.median(ts) / base
        ratios[name] = r
        print(f"{name:<40} {statistics.median(ts):8.3f} {r:7.3f}")
    result = {
        "ratio_n1": round(ratios[names[1]], 3),
        "ratio_n4": round(ratios[names[2]], 3),
        "ratio_n1_uncached": round(ratios[names[3]], 3),
        "ratio_n1_skip_level0": round(ratios[names[4]], 3),
        "ratio_n4_skip_level0": round(ratios[names[5]], 3),
        "baseline_s": round(base, 4),
        "dtype": args.dtype,
        "device": device.type,
    }
    print(json.dumps(result))
    return 0
