"""`boothkit tune --images DIR --class-noun cat --out DIR`: two-stage quick-tune of one subject on a diffusers model;
`boothkit tune --method e4t --image FILE --class-noun cat --out DIR`: E4T from one image (5-15 steps).

Stage 1 learns the identifier's input embedding (textual inversion, ~100 steps); stage 2 fine-tunes the denoiser as
a LoRA (default) or fully, with the text encoder frozen (200-400 steps). Writes ``<name>.safetensors`` (the embedding:
``embedding:<name>`` in ComfyUI, ``<name>`` in A1111) and ``<name>_lora.safetensors`` (kohya keys; stock LoraLoader).
Defaults come from the model: the toy world's (``--model toy``) or Stable Diffusion's; any flag overrides them.
E4T writes the compact concept ``<name>_e4t.safetensors`` (the tuned offsets' factors, the photo's scales, the
identifier's embedding; ``boothkit generate --e4t-concept`` and the ComfyUI nodes apply it); ``--stock-export`` adds
the embedding and ``<name>_lora.safetensors`` holding the offsets as exact weight diffs in fp16 (``.diff`` keys,
applied by the stock LoraLoader). Both methods end by printing the ``boothkit generate`` command that samples the
subject with the files written. Ctrl-C stops within one step and writes nothing."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

from .args import Parser, learning_rate, int_range, MAX_STEPS, nonneg_float, nonneg_int, positive_float, positive_int
from . import threads

log = logging.getLogger(__name__)


def parse_args(argv=None):
    p = Parser(prog="boothkit tune", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("quicktune", "e4t"), default="quicktune",
                   help="quicktune (default): two stages on 4-6 images; e4t: a pre-trained E4T file, one image")
    p.add_argument("--images", help="quicktune: folder of 4-6 images of the subject (NAME_mask.png beside an image "
                                    "restricts the loss to the mask)")
    p.add_argument("--image", help="e4t: the one image of the subject (NAME_mask.png beside it is used as its mask)")
    p.add_argument("--e4t", help="e4t: the pre-trained E4T .safetensors (default with --model toy: the shipped one)")
    p.add_argument("--clip-vision", default="toy", help="e4t: CLIP vision folder (default: the toy world's)")
    p.add_argument("--steps", type=positive_int, help="e4t: tuning steps (default: the file's, 15)")
    p.add_argument("--lr", type=learning_rate, help="e4t: tuning learning rate (default: the file's)")
    p.add_argument("--stock-export", action="store_true",
                   help="e4t: also write what stock ComfyUI/A1111 loaders read: the embedding and the offsets as "
                        "exact weight diffs in fp16 (<name>_lora.safetensors: 2 bytes per weight of the 160 offset "
                        "layers, 0.48 GB on SD1.5, against 2.4 MB for the compact <name>_e4t.safetensors)")
    p.add_argument("--class-noun", required=True, help="what the subject is: cat, dog, person, backpack ...")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="toy", help="diffusers model folder, a .safetensors checkpoint (with --config), "
                                                  "or 'toy' (default: the shipped toy-world base)")
    p.add_argument("--config", help="local diffusers folder giving the configuration of a single-file checkpoint")
    p.add_argument("--identifier", default="sks", help="the word that stands for the subject in prompts (default sks)")
    p.add_argument("--init-word", help="word the embedding starts from (default: 'rare' as in the paper, or the "
                                       "class noun if the tokenizer lacks 'rare'); several tokens give several vectors")
    p.add_argument("--name", help="output file name (default: the identifier); sanitised, no folders")
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEMPLATE",
                   help="training prompt template with {identifier} and {class_noun} (repeatable; default 'a photo "
                        "of {identifier} {class_noun}')")
    p.add_argument("--stages", choices=("both", "embedding", "denoiser"), default="both",
                   help="both (default); embedding = textual inversion alone; denoiser = DreamBooth-style alone")
    p.add_argument("--mode", choices=("lora", "full"), default="lora", help="stage 2: LoRA (default) or every weight")
    p.add_argument("--rank", type=int_range(1, 4096), help="LoRA rank")
    p.add_argument("--alpha", type=positive_float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--conv-rank", type=int_range(0, 4096),
                   help="LoRA rank of the 3x3 convolutions (0 = attention layers only)")
    p.add_argument("--stage1-steps", type=int_range(0, MAX_STEPS))
    p.add_argument("--stage1-lr", type=learning_rate)
    p.add_argument("--stage2-steps", type=int_range(0, MAX_STEPS))
    p.add_argument("--stage2-lr", type=learning_rate)
    p.add_argument("--batch-size", type=int_range(1, 1024), help="batch size of both stages")
    p.add_argument("--class-images", help="folder of class images: switches on prior preservation (not the paper's "
                                          "default)")
    p.add_argument("--prior-weight", type=nonneg_float, default=1.0)
    p.add_argument("--resolution", type=int_range(8, 4096), help="training resolution in pixels (default: the model's)")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), default="auto",
                   help="auto: bf16 for quick-tune on a GPU that has it, fp32 for E4T and on a CPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade speed for memory")
    p.add_argument("--flip", action="store_true", help="also train on mirrored images")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    threads.add_argument(p)
    args = p.parse_args(argv)
    if args.method == "e4t" and not args.image:
        p.error("--method e4t needs --image FILE (E4T tunes on one image)")
    if args.method == "quicktune" and not args.images:
        p.error("--images DIR is required (or --method e4t --image FILE)")
    for name in ("rank", "steps", "stage1_steps", "stage2_steps", "batch_size", "resolution"):
        v = getattr(args, name)
        if v is not None and v <= 0 and not name.endswith("steps"):
            p.error(f"--{name.replace('_', '-')} must be positive, got {v}")
        if v is not None and v < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative, got {v}")
    if args.stages == "embedding" and args.mode == "full":
        p.error("--mode full fine-tunes the denoiser, which --stages embedding skips")
    return args


def build_config(args, family: str):
    from ..backend.quicktune import QuickTuneConfig
    from ..toyworld.methods import quicktune_config

    base = quicktune_config(mode=args.mode) if family == "toy" else QuickTuneConfig.sd(mode=args.mode)
    s1, s2 = base.stage1, base.stage2
    s1 = replace(s1, **{k: v for k, v in (("steps", args.stage1_steps), ("lr", args.stage1_lr),
                                            ("batch_size", args.batch_size)) if v is not None})
    s2 = replace(s2, **{k: v for k, v in (("steps", args.stage2_steps), ("lr", args.stage2_lr),
                                            ("batch_size", args.batch_size)) if v is not None})
    over = {k: v for k, v in (("rank", args.rank), ("alpha", args.alpha), ("conv_rank", args.conv_rank))
            if v is not None}
    return replace(base, stage1=s1, stage2=s2, prior_weight=args.prior_weight, mixed_precision=args.mixed_precision,
                   gradient_checkpointing=args.gradient_checkpointing, flip=args.flip, **over)


def read_images(folder):
    """Images and their masks; masks are None when no image has one."""
    from ..backend.imageio import list_images, mask_path, read_images_and_masks

    images, masks = read_images_and_masks(folder)
    # a NAME_mask.png beside an image, or an image's own alpha channel (read_images_and_masks used it)
    has_mask = any(mask_path(p).exists() for p in list_images(folder)) or not bool((masks > 0.5).all())
    return images, (masks if has_mask else None)


class Cancellable:
    """Ctrl-C asks the loop to stop after the current step (a second Ctrl-C aborts at once); a bar shows steps and
    the loss."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.flag = False
        self.bar = tqdm(total=total, desc=desc, unit="step")
        self.previous = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None

    def _on_sigint(self, signum, frame):
        self.flag = True
        log.warning("stopping after the current step (Ctrl-C again to abort at once)")
        signal.signal(signal.SIGINT, self.previous)

    def on_progress(self, done, n, loss):
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.4f}")

    def should_cancel(self) -> bool:
        return self.flag

    def close(self):
        self.bar.close()
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads.apply(args.threads)
    if str(args.model) == "toy":
        from ..toyworld import domain

        unknown = domain.unknown_words(" ".join([args.class_noun] + (args.prompts or [])).replace("{identifier}", "")
                                       .replace("{class_noun}", ""))
        if unknown:
            log.warning("note: the toy world's captions never use %s: the toy model reads %s as noise (it knows: %s)",
                        ", ".join(map(repr, unknown)), "it" if len(unknown) == 1 else "them",
                        domain.vocabulary_summary())
    if args.method == "e4t":
        return main_e4t(args)

    from ..backend.tune import CANCELLED, DONE
    from ..backend.files import output_paths, safe_name
    from ..backend.identifier import check_identifier
    from ..hosts.diffusers.quicktune import quick_tune
    from ..hosts.diffusers.loading import default_device
    from .models import load_model

    check_identifier(args.identifier, args.class_noun)
    name = safe_name(args.name or args.identifier)
    kinds = ["embedding"] + ([] if args.stages == "embedding" else ["lora" if args.mode == "lora" else "unet"])
    try:
        output_paths(args.out, name, kinds, args.overwrite)  # refuse before a long run, not after it
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    images, masks = read_images(args.images)
    class_images = read_images(args.class_images)[0] if args.class_images else None

    device = default_device(args.device)
    model = load_model(args.model, config=args.config).to(device)
    config = build_config(args, model.family)

    total = (config.stage1.steps if args.stages != "denoiser" else 0) + \
        (config.stage2.steps if args.stages != "embedding" else 0)
    run = Cancellable(total, "quick-tune")
    try:
        result = quick_tune(model, list(images), args.class_noun, identifier=args.identifier,
                            init_word=args.init_word, masks=list(masks) if masks is not None else None,
                            prompts=args.prompts, config=config, class_images=class_images,
                            stage1=args.stages != "denoiser", stage2=args.stages != "embedding",
                            resolution=args.resolution, on_progress=run.on_progress,
                            should_cancel=run.should_cancel, seed=args.seed)
    finally:
        run.close()
    result.training["base_model"] = str(args.model)
    if result.status == CANCELLED:
        print("quick-tune cancelled; nothing written", file=sys.stderr)
        return 130
    try:
        paths = result.save(args.out, name, overwrite=args.overwrite)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    print_written(paths)
    files = ["--embedding", paths["embedding"]] + (["--lora", paths["lora"]] if "lora" in paths else [])
    if "unet" in paths:
        print(f"the fine-tuned denoiser {paths['unet']} is for the trainer's own use; generate and stock loaders read "
              f"the embedding and a LoRA (--mode lora)")
    print("see it: " + generate_command(args, model.family, files))
    if str(args.model) != "toy":  # the shipped toy base exists only here: no stock loader has it
        print(f"stock loaders: prompt 'a photo of embedding:{name} {args.class_noun}' (ComfyUI) or "
              f"'a photo of {name} {args.class_noun}' (A1111)" + (" with the LoRA loaded" if "lora" in paths else ""))
    if result.status != DONE:
        print(f"stopped early ({result.message}); the files hold the last good state", file=sys.stderr)
        return 1
    return 0


def main_e4t(args) -> int:
    from ..backend.e4t import load_e4t
    from ..backend.imageio import read_image_and_mask
    from ..backend.tune import CANCELLED, DONE
    from ..backend.files import output_paths, safe_name
    from ..hosts.diffusers.e4t import e4t_tune
    from ..hosts.diffusers.loading import default_device
    from .models import load_model, load_vision

    name = safe_name(args.name or args.identifier)
    try:
        output_paths(args.out, name, ["e4t"] + (["embedding", "lora"] if args.stock_export else []), args.overwrite)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    if args.e4t:
        e4t_path = args.e4t
    elif str(args.model) == "toy":
        from ..toyworld import store

        e4t_path = store.verified("e4t.safetensors")
    else:
        raise ValueError("--method e4t needs --e4t FILE: an E4T file pre-trained for this model's family "
                         "(`boothkit train e4t`)")
    device = default_device(args.device)
    model = load_model(args.model, config=args.config).to(device)
    vision = load_vision(args.clip_vision).to(device)
    e4t = load_e4t(e4t_path, family=model.family)
    if args.gradient_checkpointing:  # diffusers checkpoints only in training mode; the UNet has no dropout/BN
        model.unet.enable_gradient_checkpointing()
        model.unet.train()
    e4t.config.identifier = args.identifier  # only a prompt word: the file's encoder works with any
    image_path = Path(args.image)
    image, mask = read_image_and_mask(image_path)  # NAME_mask.png, else the image's alpha, else None
    # "auto" is fp32 for E4T: on an H100 (512 px, `boothkit bench e4t --model sd15 --e4t-mixed-precision bf16`) bf16
    # autocast made the 15-step tune 1.7x slower and saved only 1.5 GB of its 13.5 GB peak
    precision = "no" if args.mixed_precision == "auto" else args.mixed_precision
    run = Cancellable(args.steps if args.steps is not None else e4t.config.tune_steps, "e4t")
    try:
        concept = e4t_tune(model, vision, e4t, image, mask, args.class_noun, steps=args.steps, lr=args.lr,
                           seed=args.seed, on_progress=run.on_progress, should_cancel=run.should_cancel,
                           mixed_precision=precision)
    finally:
        run.close()
    status = concept.result.status if concept.result is not None else DONE
    if status == CANCELLED:
        print("e4t cancelled; nothing written", file=sys.stderr)
        return 130
    concept.training["base_model"] = str(args.model)
    paths = concept.save(model, args.out, name, overwrite=args.overwrite, stock=args.stock_export)
    print_written(paths)
    print("see it: " + generate_command(args, model.family, ["--e4t-concept", paths["e4t"]]))
    if "lora" in paths and str(args.model) != "toy":
        print(f"stock loaders: prompt 'a photo of embedding:{name} {args.class_noun}' (ComfyUI) or 'a photo of {name} "
              f"{args.class_noun}' (A1111) with {paths['lora'].name} loaded as a LoRA")
    if status != DONE:
        print(f"stopped early ({concept.result.message}); the files hold the last good state", file=sys.stderr)
        return 1
    return 0


def print_written(paths) -> None:
    for kind, path in paths.items():
        size = Path(path).stat().st_size
        shown = f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"
        print(f"wrote {kind}: {path} ({shown})")


def generate_command(args, family: str, files: list) -> str:
    """The exact `boothkit generate` command that samples the subject with the files a tune wrote."""
    import shlex

    from ..backend.identifier import training_template

    prompt = training_template(family).format(identifier=args.identifier, class_noun=args.class_noun)
    if family == "toy":
        prompt += " on grass at day"  # the toy base's captions name a background and a light
    parts = ["boothkit", "generate"]
    if str(args.model) != "toy":
        parts += ["--model", str(args.model)] + (["--config", str(args.config)] if args.config else [])
    parts += [str(f) for f in files] + ["--prompt", prompt, "--out", str(Path(args.out) / f"{Path(files[1]).stem}.png")]
    return " ".join(shlex.quote(p) for p in parts)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
