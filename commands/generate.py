"""`boothkit generate`: text-to-image on a diffusers model (or the toy world) with what any method made:

  InstantBooth (zero-shot)  --images DIR [--instantbooth FILE]          photos of the subject, no tune
  quick-tune                --embedding NAME.safetensors --lora NAME_lora.safetensors
  E4T                       --e4t-concept NAME_e4t.safetensors          (or its --stock-export: --embedding + --lora)

  several, each in a region  --concept KIND=PATH[,identifier=zwx][,box=X0:Y0:X1:Y1|,mask=FILE.png][,prompt=TEXT] ...

At most one of --images / --embedding / --e4t-concept gives the identifier its meaning; --lora (repeatable: a LoRA
or E4T's weight diffs) goes with any of them or alone. --concept (repeatable) puts several concepts in one image
instead, each bound to its own identifier and limited to its region (see --concept's help and docs/commands.md).
`boothkit tune` prints the exact command for its files. The identifier (the file's, e.g. sks) is inserted before the
class noun when the prompt lacks it.

Examples (toy world):
  boothkit generate --images photos --prompt "a photo of a cat on snow at night"
  boothkit generate --e4t-concept tuned/sks_e4t.safetensors --prompt "a photo of a sks cat on grass at day"
  boothkit generate --height 32 --width 64 --prompt "a photo of a cat on grass at day" \
      --concept images=cat_photos,box=0:0:0.5:1 --concept e4t=tuned/sks_e4t.safetensors,identifier=zwx,box=0.5:0:1:1
"""
from __future__ import annotations

import argparse
import logging
from contextlib import ExitStack
from pathlib import Path

import torch

from . import threads
from .args import Parser, finite_float, fraction, int_range, nonneg_float, nonneg_int
from .concept_files import checked_prompt, class_noun_of, default_instantbooth, lora_context, subject_nouns


def concept_spec(text):
    """argparse type of --concept: a ConceptSpec, or the spec's own one-line error."""
    from .concepts import parse_concept

    try:
        return parse_concept(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


concept_spec.__name__ = "concept"

log = logging.getLogger(__name__)

TOY_SCALE = 8  # the toy world's 32x32 images are written at 256x256 unless --scale says otherwise


def parse_args(argv=None):
    p = Parser(prog="boothkit generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help="diffusers folder, single-file .safetensors (with --config), or "
                                                  "'toy' for the shipped toy-world model (default)")
    p.add_argument("--config", help="local diffusers folder whose configs a single-file checkpoint uses")
    p.add_argument("--prompt", required=True, help="prompt; the identifier is inserted before the class noun if absent")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--images", nargs="+", help="InstantBooth: image files or one folder; NAME_mask.png masks beside")
    p.add_argument("--instantbooth", help="InstantBooth .safetensors file (default: the toy world's shipped one)")
    p.add_argument("--clip-vision", default="toy", help="InstantBooth: local CLIP vision model folder (transformers); "
                                                        "'toy' default")
    p.add_argument("--alpha", type=finite_float, help="InstantBooth: concept-token scale α (default: the file's)")
    p.add_argument("--beta", type=finite_float, help="InstantBooth: adapter weight β (default: the file's)")
    p.add_argument("--start-percent", type=fraction,
                   help="InstantBooth: the share of sampling after which the adapters act (default: the file's)")
    p.add_argument("--end-percent", type=fraction, default=1.0,
                   help="InstantBooth: the share of sampling after which they stop (default 1: to the last step)")
    p.add_argument("--skip-levels", type=nonneg_int, nargs="*", default=[],
                   help="InstantBooth: resolution levels without adapters")
    p.add_argument("--embedding", help="a textual-inversion embedding (quick-tune's NAME.safetensors, E4T's stock "
                                       "export); its identifier gets the learnt vectors")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="a LoRA (quick-tune's NAME_lora.safetensors, any kohya LoRA of the denoiser) or E4T's weight "
                        "diffs (--stock-export); repeatable")
    p.add_argument("--lora-strength", type=finite_float, default=1.0, help="multiplier of every --lora (default 1)")
    p.add_argument("--e4t-concept", help="a compact E4T concept (`boothkit tune --method e4t`: NAME_e4t.safetensors)")
    p.add_argument("--concept", type=concept_spec, action="append", default=[],
                   metavar="KIND=PATH[,identifier=W][,box=X0:Y0:X1:Y1|,mask=PNG][,prompt=TEXT]",
                   help="several concepts in one image, each in its own region (repeatable). KIND: images "
                        "(InstantBooth photos), quicktune (NAME.safetensors, NAME_lora.safetensors beside), e4t "
                        "(NAME_e4t.safetensors); identifier: its word (default the file's; each its own: sks, zwx, "
                        "vvk); box: fractions left:top:right:bottom, or mask: a PNG, white inside (default the whole "
                        "image); prompt: the region's own (composite; last, may hold commas; default --prompt, the "
                        "identifier inserted)")
    p.add_argument("--regions-mode", choices=("composite", "residual"),
                   help="with --concept: composite (default): each region's noise prediction from its own prompt with "
                        "only its own concept on, weighted by its mask, --prompt without concepts elsewhere; residual "
                        "(images concepts only): one pass of --prompt naming every identifier, each adapter term "
                        "limited to its region")
    p.add_argument("--height", type=int_range(1, 8192), help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int_range(1, 8192), help="image width in pixels (default: the model's)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--num-images", type=int_range(1, 64), default=1)
    p.add_argument("--steps", type=int_range(1, 1000), default=30)
    p.add_argument("--guidance", type=nonneg_float,
                   help="classifier-free guidance (default 5.0; the toy world's own 3.0 with --model toy)")
    p.add_argument("--scale", type=int_range(1, 64),
                   help=f"enlarge the written image N times, nearest neighbour (default: {TOY_SCALE} with --model toy, "
                        f"whose images are 32x32; else 1)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    threads.add_argument(p)
    p.add_argument("--out", default="out/generate.png", help="the PNG to write (a batch is laid out in one row)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    sources = [f"--{n}" for n in ("images", "embedding", "e4t-concept") if getattr(args, n.replace("-", "_"))]
    if args.concept:
        if sources or args.lora:
            p.error(f"--concept gives each concept its file; it does not go with {(sources or ['--lora'])[0]}")
        args.regions_mode = args.regions_mode or "composite"
        from .concepts import check_specs

        try:
            check_specs(args.concept, args.regions_mode)
        except ValueError as e:
            p.error(str(e))
    elif args.regions_mode:
        p.error("--regions-mode goes with --concept (several concepts in one image)")
    if len(sources) > 1:
        p.error(f"{' and '.join(sources)} each give the identifier its meaning; pass one of them (a --lora goes "
                f"with any)")
    if not args.images and not any(c.kind == "images" for c in args.concept):
        given = [f"--{n.replace('_', '-')}" for n in ("instantbooth", "alpha", "beta", "start_percent")
                 if getattr(args, n) is not None] + (["--end-percent"] if args.end_percent != 1.0 else [])
        if given or args.skip_levels:
            p.error(f"{', '.join(given or ['--skip-levels'])} belong(s) to InstantBooth, which needs --images")
    if Path(args.out).suffix.lower() != ".png":
        p.error(f"--out {args.out}: the image is written as PNG; give a .png file")
    return args


# the option that takes each of BoothKit's file formats, for a file handed to the wrong one
OPTION_OF_FORMAT = {"boothkit.e4t_concept": "--e4t-concept", "boothkit.embedding": "--embedding",
                    "boothkit.lora": "--lora", "boothkit.weight_diff": "--lora",
                    "boothkit.instantbooth": "--instantbooth",
                    "boothkit.e4t": "`boothkit tune --method e4t --e4t` (a pre-trained E4T file, not a tuned concept)"}


def check_kinds(args) -> None:
    """A BoothKit file given to the option for another kind fails before the model loads, saying which option
    takes it."""
    from ..backend.files import read_metadata

    wanted = {"embedding": {"boothkit.embedding"}, "e4t_concept": {"boothkit.e4t_concept"},
              "instantbooth": {"boothkit.instantbooth"}, "lora": {"boothkit.lora", "boothkit.weight_diff"}}
    for dest, formats in wanted.items():
        value = getattr(args, dest)
        for path in value if isinstance(value, list) else [value] if value else []:
            if not Path(path).is_file() or Path(path).suffix != ".safetensors":
                continue  # the loader names a missing or foreign file
            try:
                fmt = read_metadata(path).get("format")
            except Exception:  # an unreadable file: the loader says so
                continue
            if fmt in OPTION_OF_FORMAT and fmt not in formats:
                raise ValueError(f"{path}: metadata field 'format' is {fmt!r}, not what --{dest.replace('_', '-')} "
                                 f"takes; pass it as {OPTION_OF_FORMAT[fmt]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..backend.files import refuse_existing

    refuse_existing(args.out, args.overwrite)  # before the model is loaded, not after the sampling
    check_kinds(args)
    threads.apply(args.threads)
    from ..backend.imageio import save_png
    from ..hosts.diffusers.loading import default_device
    from .models import load_model

    device = default_device(args.device)
    model = load_model(args.model, config=args.config).to(device)
    if args.guidance is not None:
        guidance = args.guidance
    elif model.family == "toy":
        from ..toyworld.base import DEFAULT_GUIDANCE as guidance  # higher scales break the toy base's samples
    else:
        guidance = 5.0

    if args.concept:
        from .concepts import generate_concepts

        out = generate_concepts(model, args, guidance, device)
    elif args.images:
        out = _generate_instantbooth(model, args, guidance, device)
    else:
        out = _generate_tuned(model, args, guidance)
    scale = args.scale or (TOY_SCALE if str(args.model) == "toy" else 1)
    if scale > 1:
        out = torch.nn.functional.interpolate(out, scale_factor=scale, mode="nearest")
    path = save_png(out, args.out)
    print(f"wrote {path} ({out.shape[-1]}x{out.shape[-2]} per image" + (f", {scale}x nearest" if scale > 1 else "")
          + ")")
    return 0


def _generate_tuned(model, args, guidance: float) -> torch.Tensor:
    """Embedding / E4T concept / LoRAs / weight diffs (or none of them: the base model)."""
    from ..backend.embedding import load_embedding
    from ..hosts.diffusers.common import encode_prompt, text_slots
    from ..hosts.diffusers.e4t import load_concept, offsets_applied

    embedding, contexts, identifier, extra = None, [], None, []
    if args.embedding:
        widths = {s.key: s.width for s in text_slots(model)}
        embedding = load_embedding(args.embedding, family=model.family, widths=widths)
        identifier, extra = embedding.identifier, class_noun_of(embedding.metadata)
    elif args.e4t_concept:
        concept = load_concept(args.e4t_concept, model)
        embedding, identifier, extra = concept.embedding, concept.identifier, [concept.class_word]
        contexts.append(lambda: offsets_applied(model, concept.offsets))
    loras = [lora_context(path, model, args.lora_strength) for path in args.lora]
    if identifier is None:  # a LoRA alone (DreamBooth-style) marks its subject with its file's identifier
        identifier = next((ident for _, ident in loras if ident), None)
    for path, (_, ident) in zip(args.lora, loras):
        if ident and identifier and ident != identifier:
            log.warning("note: %s was tuned for the identifier %r, the prompt uses %r", path, ident, identifier)
    contexts += [apply for apply, _ in loras]
    prompt = checked_prompt(model, args, identifier, subject_nouns(model, extra))
    what = ", ".join(Path(p).name for p in [args.embedding, args.e4t_concept, *args.lora] if p) or "the base model"
    log.info("prompt: %s  (%s)", prompt, what)
    with torch.no_grad():
        cond = encode_prompt(model, prompt, embedding)
        uncond = encode_prompt(model, args.negative_prompt)
    with ExitStack() as stack:
        for make in contexts:
            stack.enter_context(make())
        return _sample(model, cond, uncond, args, guidance)


def _sample(model, cond, uncond, args, guidance: float) -> torch.Tensor:
    from ..hosts.diffusers.sampling import sample

    if model.family == "sdxl":
        return _sample_sdxl_embeds(model, cond, uncond, args, guidance)
    return sample(model, cond.expand(args.num_images, -1, -1), uncond, args.seed, args.steps, guidance,
                  height=args.height, width=args.width)


def _sdxl_pipe(model):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                     text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
                                     tokenizer_2=model.tokenizer_2, unet=model.unet,
                                     scheduler=DDIMScheduler.from_config(model.scheduler.config))


def _sample_sdxl_embeds(model, cond, uncond, args, guidance):
    with torch.no_grad():
        return _sdxl_pipe(model)(prompt_embeds=cond["encoder_hidden_states"],
                                 negative_prompt_embeds=uncond["encoder_hidden_states"],
                                 pooled_prompt_embeds=cond["text_embeds"],
                                 negative_pooled_prompt_embeds=uncond["text_embeds"], num_inference_steps=args.steps,
                                 height=args.height, width=args.width,
                                 guidance_scale=guidance, num_images_per_prompt=args.num_images,
                                 generator=torch.Generator().manual_seed(args.seed), output_type="pt").images


def _generate_instantbooth(model, args, guidance: float, device) -> torch.Tensor:
    from ..backend.imageio import read_images_and_masks
    from ..backend.instantbooth import load_instantbooth
    from ..hosts.diffusers.instantbooth import condition_with_concept, encode_images, encode_prompt, sampling_hooks
    from ..hosts.diffusers.sampling import sample
    from .models import load_vision

    ib_path = args.instantbooth or default_instantbooth()
    ib = load_instantbooth(ib_path, family=model.family, ctx_dim=model.ctx_dim).eval().to(device)
    vision = load_vision(args.clip_vision).to(device)
    images, masks = read_images_and_masks(args.images[0] if len(args.images) == 1 else args.images)
    concept = ib.encode(*encode_images(vision, images, masks, ib))
    prompt = checked_prompt(model, args, concept.identifier, ib.config.subject_nouns())
    alpha = ib.config.alpha if args.alpha is None else args.alpha
    beta = ib.config.beta if args.beta is None else args.beta
    start = ib.config.start_percent if args.start_percent is None else args.start_percent
    log.info("prompt: %s  (α=%.2f, β=%.2f, adapters from %.2f to %.2f of sampling, %d image(s))", prompt, alpha, beta,
             start, args.end_percent, len(images))
    loras = [lora_context(path, model, args.lora_strength)[0] for path in args.lora]
    with ExitStack() as stack:
        for make in loras:
            stack.enter_context(make())
        if model.family == "sdxl":
            return _generate_sdxl(model, ib, concept, prompt, args, alpha, beta, guidance)
        cond = condition_with_concept(encode_prompt(model.text_encoder, model.tokenizer, prompt), model.tokenizer,
                                      prompt, concept, alpha)
        uncond = encode_prompt(model.text_encoder, model.tokenizer, args.negative_prompt)
        enabled = ib.config.layout.select(skip_levels=args.skip_levels)
        with sampling_hooks(model, ib, concept.f_p, beta, enabled, start_percent=args.start_percent,
                            end_percent=args.end_percent):
            return sample(model, cond.expand(args.num_images, -1, -1), uncond, args.seed, args.steps, guidance,
                          height=args.height, width=args.width)


def _generate_sdxl(model, ib, concept, prompt, args, alpha, beta, guidance):
    from ..backend.identifier import inject_concept
    from ..hosts.diffusers.instantbooth import identifier_rows, sampling_hooks

    pipe = _sdxl_pipe(model)
    pe, npe, pooled, npooled = pipe.encode_prompt(prompt, negative_prompt=args.negative_prompt,
                                                  do_classifier_free_guidance=True)
    rows = identifier_rows(model.tokenizer, prompt, concept.identifier)
    if rows != identifier_rows(model.tokenizer_2, prompt, concept.identifier):
        raise ValueError("SDXL's two tokenizers place the identifier differently; use a plain single-token identifier")
    pe = inject_concept(pe, rows, concept.f_c, alpha)
    enabled = ib.config.layout.select(skip_levels=args.skip_levels)
    with sampling_hooks(model, ib, concept.f_p, beta, enabled, start_percent=args.start_percent,
                        end_percent=args.end_percent), torch.no_grad():
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
                   negative_pooled_prompt_embeds=npooled, num_inference_steps=args.steps,
                   height=args.height, width=args.width,
                   guidance_scale=guidance, num_images_per_prompt=args.num_images,
                   generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
    return out
