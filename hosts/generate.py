"""`boothkit generate`: text-to-image with InstantBooth on a diffusers model (or the toy world) from image(s),
optional masks, and a prompt with the identifier."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="boothkit generate", description=__doc__)
    p.add_argument("--model", default="toy", help="diffusers folder, single-file .safetensors (with --config), or "
                                                  "'toy' for the shipped toy-world model (default)")
    p.add_argument("--config", help="local diffusers folder whose configs a single-file checkpoint uses")
    p.add_argument("--clip-vision", default="toy", help="local CLIP vision model folder (transformers); 'toy' default")
    p.add_argument("--instantbooth", help="InstantBooth .safetensors file (default: the toy world's shipped one)")
    p.add_argument("--images", required=True, nargs="+", help="image files or one folder; NAME_mask.png masks beside")
    p.add_argument("--prompt", required=True, help="prompt; the identifier is inserted before the class noun if absent")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--alpha", type=float, help="concept-token scale α (default: the file's, 0.4 in the paper)")
    p.add_argument("--beta", type=float, help="adapter weight β (default: the file's, 0.3 in the paper)")
    p.add_argument("--skip-levels", type=int, nargs="*", default=[], help="resolution levels without adapters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance (default 5.0; the toy world's own 3.0 with --model toy)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", default="out/generate.png")
    return p.parse_args(argv)


def default_instantbooth() -> Path:
    from ..toyworld.store import verified

    return verified("instantbooth.safetensors")


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..backend.formats import load_instantbooth
    from ..backend.identifier import insert_identifier
    from ..backend.imageio import read_images_and_masks, save_png
    from .diffusers_host import InstantBoothHooks, condition_with_concept, encode_images, encode_prompt
    from .loading import default_device, load_clip_vision, load_sd
    from .sampling import sample

    device = default_device(args.device)
    model = load_sd(args.model, config=args.config).to(device)
    ib_path = args.instantbooth or default_instantbooth()
    ib = load_instantbooth(ib_path, family=model.family, ctx_dim=model.ctx_dim).eval().to(device)
    vision = load_clip_vision(args.clip_vision).to(device)
    images, masks = read_images_and_masks(args.images[0] if len(args.images) == 1 else args.images)
    concept = ib.encode(*encode_images(vision, images, masks, ib))
    prompt = insert_identifier(args.prompt, concept.identifier, ib.config.subject_nouns())
    alpha = ib.config.alpha if args.alpha is None else args.alpha
    beta = ib.config.beta if args.beta is None else args.beta
    if args.guidance is not None:
        guidance = args.guidance
    elif model.family == "toy":
        from ..toyworld.base import DEFAULT_GUIDANCE as guidance  # higher scales break the toy base's samples
    else:
        guidance = 5.0
    log.info("prompt: %s  (α=%.2f, β=%.2f, %d image(s))", prompt, alpha, beta, len(images))

    if model.family == "sdxl":
        out = _generate_sdxl(model, ib, concept, prompt, args, alpha, beta, guidance)
    else:
        cond = condition_with_concept(encode_prompt(model.text_encoder, model.tokenizer, prompt), model.tokenizer,
                                      prompt, concept, alpha)
        uncond = encode_prompt(model.text_encoder, model.tokenizer, args.negative_prompt)
        enabled = ib.config.layout.select(skip_levels=args.skip_levels)
        # the sampler's batch is [uncond; cond]: a file with adapters_on_uncond = False keeps the uncond half plain
        with InstantBoothHooks(model.unet, ib, concept.f_p, beta, enabled, cond_only=not ib.config.adapters_on_uncond):
            out = sample(model, cond.expand(args.num_images, -1, -1), uncond, args.seed, args.steps, guidance)
    path = save_png(out, args.out)
    print(f"wrote {path}")
    return 0


def _generate_sdxl(model, ib, concept, prompt, args, alpha, beta, guidance):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from ..backend.identifier import inject_concept
    from .diffusers_host import InstantBoothHooks, identifier_rows

    pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                     text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
                                     tokenizer_2=model.tokenizer_2, unet=model.unet,
                                     scheduler=DDIMScheduler.from_config(model.scheduler.config))
    pe, npe, pooled, npooled = pipe.encode_prompt(prompt, negative_prompt=args.negative_prompt,
                                                  do_classifier_free_guidance=True)
    rows = identifier_rows(model.tokenizer, prompt, concept.identifier)
    if rows != identifier_rows(model.tokenizer_2, prompt, concept.identifier):
        raise ValueError("SDXL's two tokenizers place the identifier differently; use a plain single-token identifier")
    pe = inject_concept(pe, rows, concept.f_c, alpha)
    enabled = ib.config.layout.select(skip_levels=args.skip_levels)
    # diffusers' SDXL pipeline batches [negative; positive] as well
    with InstantBoothHooks(model.unet, ib, concept.f_p, beta, enabled,
                           cond_only=not ib.config.adapters_on_uncond), torch.no_grad():
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
                   negative_pooled_prompt_embeds=npooled, num_inference_steps=args.steps,
                   guidance_scale=guidance, num_images_per_prompt=args.num_images,
                   generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
    return out
