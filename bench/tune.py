"""`boothkit bench tune`: time per step of quick-tune's stage 1 and stage 2 against reference loops written like
diffusers' examples/textual_inversion/textual_inversion.py and examples/dreambooth/train_dreambooth_lora.py.

Same model, batch, LoRA, precision and run for both. The references do what those scripts do every step: VAE-encode
the batch and sample a latent, run the text encoder on the batch's token ids; textual inversion adds a token row to
the embedding matrix, optimises the whole matrix with AdamW and copies every other row back after the step. Ours
use the latents and prompt encodings computed once, encode only the distinct prompts of a stage-1 batch, and give
gradients and optimizer state to the identifier's vectors alone. The one-time caching cost is printed too.

Models: ``sd15`` (default) is the SD1.5 architecture (UNet, CLIP ViT-L text encoder with its 49408-token vocabulary,
VAE) with random weights, built from configs (no download); ``toy`` the toy-world base (pixel space); or a diffusers
folder. Last line: one JSON object with ``speedup`` (a default run's 100 stage-1 + 300 stage-2 steps, reference over
ours), ``speedup_stage1`` and ``speedup_stage2`` (per-step medians)."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
DEFAULT_STEPS = (100, 300)  # a default run: weights of the two stages in `speedup`


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="boothkit bench tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", help="sd15 (random SD1.5 architecture), toy, or a diffusers folder")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--resolution", type=int, help="image size (default: 512 on cuda, 256 on cpu for sd15; the "
                                                 "model's own otherwise)")
    p.add_argument("--batch-size", type=int, default=1, help="batch of both stages (the scripts' default: 1)")
    p.add_argument("--images", type=int, default=4, help="number of training images")
    p.add_argument("--steps", type=int, default=6, help="timed steps per loop")
    p.add_argument("--block", type=int, default=3,
                   help="steps per timed block: ours runs a block as one call of the stage function, as a real run "
                        "does (its per-call setup, the optimizer and generators, is paid once per block, not per step)")
    p.add_argument("--warmup", type=int, default=1, help="untimed blocks per loop")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (both stage-2 loops)")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), default="auto",
                   help="for every loop alike; auto = bf16 on cuda, none on cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# models


def build_sd15(device, resolution: int):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..toyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()  # a CLIP BPE tokenizer built offline; its ids lie inside the 49408-row vocabulary
    with torch.device(device):
        unet = UNet2DConditionModel(**dict(SD15_UNET, sample_size=resolution // 8))
        te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id))
        vae = AutoencoderKL(**SD15_VAE)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    for m in (unet, te, vae):
        m.eval().requires_grad_(False)
    return SimpleNamespace(unet=unet, text_encoder=te, tokenizer=tok, vae=vae, scheduler=sched, family="sd1",
                           resolution=resolution, name="sd15-architecture (random weights)")


def load_model(name: str, device, resolution: int | None):
    if name == "sd15":
        return build_sd15(device, resolution or (512 if device.type == "cuda" else 256))
    from ..hosts.diffusers.loading import load_sd

    model = load_sd(name) if name != "toy" else _toy()
    for part in model.parts() if hasattr(model, "parts") else [model.unet, model.text_encoder]:
        part.to(device).eval().requires_grad_(False)
    if resolution:
        model.resolution = resolution
    model.name = name
    return model


def _toy():
    from ..toyworld import store

    try:
        from ..toyworld.base import load_sd_model

        return load_sd_model()
    except (store.WeightsError, FileNotFoundError):
        from ..toyworld.base import build_base
        from ..toyworld.tokenizer import build_tokenizer

        return build_base(build_tokenizer())  # untrained weights time the same


# ----------------------------------------------------------------------------------------------------------------
# the reference loops (diffusers' example scripts, one step each)


def reference_loss(model, text_encoder, prompt_ids, pixels, sched, gen) -> torch.Tensor:
    """The denoising loss as both diffusers example scripts compute it: VAE and text encoder run on every step."""
    latents = encode_latents(model, pixels, gen)
    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen, device=latents.device)
    noisy = sched.add_noise(latents, noise, t)
    cond = text_encoder(prompt_ids.expand(latents.shape[0], -1))[0]
    pred = model.unet(noisy, t, cond).sample
    return F.mse_loss(pred.float(), noise.float())


class ReferenceTextualInversion:
    """textual_inversion.py: placeholder token added (a new embedding row), the whole embedding matrix in AdamW
    (weight decay 1e-2, the script's default), every other row restored after each step."""

    def __init__(self, model, prompt_ids: torch.Tensor, ident_pos: int, init_id: int, lr: float):
        import copy

        self.model = model
        self.te = copy.deepcopy(model.text_encoder)  # the script resizes the model it trains; keep ours untouched
        n = self.te.get_input_embeddings().weight.shape[0]
        self.te.resize_token_embeddings(n + 1, mean_resizing=False)
        emb = self.te.get_input_embeddings()
        with torch.no_grad():
            emb.weight[n] = emb.weight[init_id]
        self.placeholder = n
        self.ids = prompt_ids.clone()
        self.ids[:, ident_pos] = n
        self.te.requires_grad_(False)
        emb.weight.requires_grad_(True)
        self.orig = emb.weight.detach().clone()
        self.keep = torch.ones(n + 1, dtype=torch.bool, device=emb.weight.device)
        self.keep[n] = False
        self.opt = torch.optim.AdamW([emb.weight], lr=lr, weight_decay=1e-2)

    def step(self, pixels, sched, gen):
        loss = reference_loss(self.model, self.te, self.ids, pixels, sched, gen)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            emb = self.te.get_input_embeddings()
            emb.weight[self.keep] = self.orig[self.keep]
        return loss


class ReferenceDreamBoothLoRA:
    """train_dreambooth_lora.py without text-encoder training: VAE encode + text encoder every step, LoRA on the
    UNet (the same LoRA as ours), AdamW, gradient clipping at 1.0."""

    def __init__(self, model, lora, prompt_ids: torch.Tensor, lr: float):
        self.model, self.lora, self.ids = model, lora, prompt_ids
        self.opt = torch.optim.AdamW(lora.parameters(), lr=lr, weight_decay=1e-2)

    def step(self, pixels, sched, gen):
        loss = reference_loss(self.model, self.model.text_encoder, self.ids, pixels, sched, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lora.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        return loss


def encode_latents(model, pixels, gen):
    if model.vae is None:
        return pixels * 2 - 1
    return model.vae.encode(pixels * 2 - 1).latent_dist.sample(gen) * model.vae.config.scaling_factor


# ----------------------------------------------------------------------------------------------------------------
# timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(ref_block, ours_block, warmup: int, blocks: int, block: int, device) -> tuple[list[float], list[float]]:
    """Wall time per step of ``blocks`` blocks of ``block`` steps, reference and ours alternating, so a machine whose
    load changes during the run (a shared CPU) slows both alike. ``fn(i, n)`` runs steps i..i+n-1, each with the
    host sync that reads the loss; ``warmup`` more blocks come first, untimed."""
    ref, ours = [], []
    for b in range(warmup + blocks):
        for fn, out in ((ref_block, ref), (ours_block, ours)):
            sync(device)
            t0 = time.perf_counter()
            fn(b * block, block)
            sync(device)
            if b >= warmup:
                out.append((time.perf_counter() - t0) / block)
    return ref, ours


def run(args) -> dict:
    from ..backend import quicktune as qt
    from ..backend import tune
    from ..backend.lora import LoRA
    from ..hosts.diffusers import common
    from ..hosts.diffusers.loading import default_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device(None if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    model = load_model(args.model, device, args.resolution)
    res = common.default_resolution(model)
    mixed = tune.resolve_mixed_precision(args.mixed_precision, device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed == "bf16")

    warmup = args.warmup
    blocks = -(-args.steps // args.block)  # at least --steps timed steps
    gen = torch.Generator(device=device).manual_seed(args.seed)
    pixels = torch.rand(args.images, 3, res, res, generator=torch.Generator().manual_seed(args.seed)).to(device)
    prompt = "a photo of sks cat"
    tok = model.tokenizer
    init_word = "cat"
    fill = [common.word_ids(tok, init_word)]
    spliced = common.splice(tok, prompt, "sks", fill[0])
    prompt_ids = torch.tensor([spliced.ids], device=device)
    schedule = common.schedule_of(model)
    rows = {}

    # one-time work of ours: latents and prompt encodings
    sync(device)
    t0 = time.perf_counter()
    with autocast():
        data = common.cache_images(model, pixels, None, device=device)
    sync(device)
    rows["cache_latents"] = time.perf_counter() - t0
    encoder = common.PromptEncoder.spliced(model, [prompt], "sks", fill, res)
    init = [model.text_encoder.get_input_embeddings().weight[fill[0]].detach().float().clone()]
    predict = common.make_predict({"unet": model.unet})

    def batch_of(i):
        idx = torch.randint(0, pixels.shape[0], (args.batch_size,), generator=torch.Generator().manual_seed(i))
        return pixels[idx.to(device)]

    def reference(loop):
        def steps(i, n):
            for j in range(i, i + n):
                with autocast():
                    loss = loop.step(batch_of(j), model.scheduler, gen)
                float(loss.detach())
        return steps

    # stage 1: ours is one call of the backend's stage-1 function per block (vectors start over each call)
    ref1 = ReferenceTextualInversion(model, prompt_ids, spliced.rows[0], fill[0][0], lr=5e-3)

    def ours1(i, n):
        qt.learn_embedding(init, encoder, predict, schedule, data, 1, qt.StageConfig(n, 5e-3, args.batch_size),
                           seed=args.seed + i, mixed_precision=mixed)

    with tune.frozen(model.unet, model.text_encoder):
        t_ref1, t_ours1 = interleaved(reference(ref1), ours1, warmup, blocks, args.block, device)
    del ref1

    # stage 2: the prompt encoding is computed once (timed apart); the same LoRA layout in both loops
    sync(device)
    t0 = time.perf_counter()
    with autocast():
        cache = tune.encode_all(encoder, init, 1, device)
    sync(device)
    rows["cache_prompts"] = time.perf_counter() - t0
    lora_ref = LoRA.for_model(model.unet, rank=args.rank)
    lora = LoRA.for_model(model.unet, rank=args.rank)
    ref2 = ReferenceDreamBoothLoRA(model, lora_ref, prompt_ids, lr=1e-4)

    def ref2_steps(i, n):
        with lora_ref.attach(model.unet):
            reference(ref2)(i, n)

    def ours2(i, n):
        with lora.attach(model.unet):
            qt.finetune_denoiser(list(lora.parameters()), predict, schedule, data, cache,
                                 qt.StageConfig(n, 1e-4, args.batch_size, 1e-2, 1.0), seed=args.seed + i,
                                 mixed_precision=mixed)

    with tune.frozen(model.unet, model.text_encoder):
        t_ref2, t_ours2 = interleaved(ref2_steps, ours2, warmup, blocks, args.block, device)

    med = {k: statistics.median(v) for k, v in (("ref1", t_ref1), ("ours1", t_ours1), ("ref2", t_ref2),
                                               ("ours2", t_ours2))}
    s1, s2 = DEFAULT_STEPS
    return {
        "model": getattr(model, "name", args.model), "device": str(device), "resolution": res,
        "batch_size": args.batch_size, "mixed_precision": mixed, "lora_rank": args.rank,
        "timed_steps": blocks * args.block, "block": args.block, "blocks": blocks,
        "stage1_ref_s": med["ref1"], "stage1_ours_s": med["ours1"], "stage2_ref_s": med["ref2"],
        "stage2_ours_s": med["ours2"], "cache_latents_s": rows["cache_latents"],
        "cache_prompts_s": rows["cache_prompts"],
        "speedup_stage1": med["ref1"] / med["ours1"], "speedup_stage2": med["ref2"] / med["ours2"],
        "speedup": (s1 * med["ref1"] + s2 * med["ref2"]) / (s1 * med["ours1"] + s2 * med["ours2"]),
    }


def table(r: dict) -> str:
    lines = [f"quick-tune step time: {r['model']} on {r['device']}, {r['resolution']}px, batch {r['batch_size']}, "
             f"mixed precision {r['mixed_precision']}, LoRA rank {r['lora_rank']}, per-step time "
             f"of blocks of {r['block']} steps, median of {r['blocks']} blocks",
             "",
             f"{'stage':<28}{'reference (s/step)':>20}{'ours (s/step)':>16}{'speedup':>10}",
             f"{'1: textual inversion':<28}{r['stage1_ref_s']:>20.4f}{r['stage1_ours_s']:>16.4f}"
             f"{r['speedup_stage1']:>9.2f}x",
             f"{'2: LoRA fine-tune':<28}{r['stage2_ref_s']:>20.4f}{r['stage2_ours_s']:>16.4f}"
             f"{r['speedup_stage2']:>9.2f}x",
             f"{'run (100 + 300 steps)':<28}{'':>20}{'':>16}{r['speedup']:>9.2f}x",
             "",
             f"one-time cost of ours (not in the per-step times): latents {r['cache_latents_s']:.3f} s, prompt "
             f"encodings {r['cache_prompts_s']:.4f} s"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items()}))
    return 0
