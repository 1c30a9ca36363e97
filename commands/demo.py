"""`boothkit demo`: no arguments needed. Takes a held-out toy-world subject that no trainer has seen, personalizes the
shipped toy model with several methods side by side, and writes a labelled PNG grid:

    column heads:  input photos | base model (no personalization) | one column per method
    each row:      its prompt written above it
    under each method column: the time it took to personalize and to sample

Default methods: E4T-15 (shown first: 15 tuning steps from the shipped pre-trained E4T, on the first photo alone;
on the held-out table, docs/eval/eval.md, most of quick-tune's identity in a fifteenth of its tune time) and
InstantBooth (zero-shot, no tuning). The grid names each method and its times, so a retrained file shows as it is.
Add a short quick-tune with `--methods e4t-15 quicktune-demo instantbooth` (20 + 80 steps, labelled so; the full
100 + 200 steps is `quicktune`), or pick any method of `boothkit eval`.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import threads
from .args import Parser, int_range, nonneg_int

log = logging.getLogger(__name__)

DEFAULT_METHODS = ["e4t-15", "instantbooth"]

# method -> (column head, what it gets / does); methods not listed show their name
LABELS = {
    "instantbooth": ("InstantBooth", "zero-shot, all photos"),
    "e4t-0": ("E4T-0", "encoder only, photo 1"),
    **{f"e4t-{n}": (f"E4T-{n}", f"{n} steps, photo 1") for n in (5, 15, 30, 60)},
    "e4t-15-untrained": ("E4T-15 untrained", "no pre-training"),
    "quicktune": ("quick-tune", "100+200 steps"),
    "quicktune-demo": ("quick-tune, short", "20+80 steps"),
    "quicktune-1photo": ("quick-tune", "100+200, photo 1"),
    "quicktune-stage1": ("textual inversion", "100 steps"),
    "quicktune-stage2": ("DreamBooth-style", "200 steps"),
}


def parse_args(argv=None):
    from ..toyworld.methods import METHODS

    p = Parser(prog="boothkit demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subject", type=nonneg_int, default=0, help="which held-out subject (0..31)")
    p.add_argument("--methods", "--method", nargs="+", default=None, metavar="METHOD",
                   choices=[m for m in METHODS if m != "base"],
                   help=f"methods, one column each, in this order (default: {' '.join(DEFAULT_METHODS)}); any of "
                        f"{', '.join(m for m in METHODS if m != 'base')}")
    p.add_argument("--prompts", type=int_range(1, 16), default=4, help="how many prompts (rows)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--steps", type=int_range(1, 1000), default=25, help="DDIM steps")
    p.add_argument("--scale", type=int_range(1, 16), default=4,
                   help="pixel upscaling of the 32x32 toy images in the grid (nearest; default 4)")
    threads.add_argument(p)
    p.add_argument("--out", default="out/demo.png", help="the PNG to write, or a folder (then FOLDER/demo.png)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.suffix == "" or out.is_dir():
        args.out = str(out / "demo.png")
    elif out.suffix.lower() != ".png":  # checked before the minute of work, not after
        p.error(f"--out {args.out}: the grid is written as PNG; give a .png file or a folder")
    from ..backend.files import refuse_existing

    try:
        refuse_existing(args.out, overwrite=True)  # the demo's grid is replaced; a file in the way is refused
    except (ValueError, OSError) as e:
        p.error(str(e))
    from ..toyworld.domain import identities

    held = len(identities("heldout"))
    if args.subject >= held:
        p.error(f"--subject {args.subject}: the toy world has {held} held-out subjects (0..{held - 1})")
    return args


@dataclass
class Column:
    head: str
    detail: str
    images: torch.Tensor  # [rows, 3, H, W]
    personalize_s: float | None = None  # None: the base model
    sample_s: float = 0.0


def main(argv=None) -> int:
    args = parse_args(argv)
    threads.apply(args.threads)
    from tqdm.auto import tqdm

    from ..toyworld.evaluate import eval_contexts, make_subjects, prompts_for
    from ..toyworld.methods import METHODS, ToyEnv

    t0 = time.perf_counter()
    env = ToyEnv.load(sample_steps=args.steps)
    methods = list(args.methods or DEFAULT_METHODS)
    missing = {"instantbooth": env.instantbooth is None, "e4t": env.e4t is None}
    for m in list(methods):
        if missing.get(m.split("-")[0]):
            log.warning("note: %s left out: the toy world has no trained %s file", m, m.split("-")[0])
            methods.remove(m)
    if not methods:
        raise ValueError("no method left to show; train one (README, 'Toy world') or pick --methods quicktune")
    subject = make_subjects(args.subject + 1, 3, args.seed)[args.subject]
    contexts = eval_contexts(args.prompts, args.seed + 1)
    prompts, plain = prompts_for(subject, contexts, env.identifier)
    bar = tqdm(total=len(methods) + 1, desc="demo", dynamic_ncols=True)
    columns = []
    for name in ["base"] + methods:
        bar.set_postfix_str(name)
        t1 = time.perf_counter()
        generate = METHODS[name](env, subject, args.seed)
        t2 = time.perf_counter()
        images = generate(prompts, plain, args.seed)
        t3 = time.perf_counter()
        head, detail = ("base model", "no personalization") if name == "base" else LABELS.get(name, (name, ""))
        columns.append(Column(head, detail, images, None if name == "base" else t2 - t1, t3 - t2))
        bar.update(1)
    bar.close()
    title = (f"held-out {subject.class_name} #{subject.identity.id} (no trainer has seen it); first method shown: "
             f"{columns[1].head}")
    grid = labelled_grid(subject.images, columns, prompts, title, args.scale)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    print(f"subject: held-out {subject.class_name} #{subject.identity.id}; methods: {', '.join(methods)}")
    for i, p in enumerate(prompts):
        print(f"  row {i + 1}: {p}")
    for c in columns[1:]:
        print(f"  {c.head} ({c.detail}): personalize {_seconds(c.personalize_s)}, sample {_seconds(c.sample_s)}")
    print(f"wrote {path.resolve()} in {time.perf_counter() - t0:.1f} s ({torch.get_num_threads()} thread(s))")
    return 0


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 1 else f"{s:.1f} s"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def labelled_grid(inputs: torch.Tensor, columns: list[Column], prompts: list[str], title: str, scale: int):
    """A Pillow image: title, column heads, the input photos (one row, first photo marked '1'), then per prompt its
    text and a row of images (base, methods), and each method's times under its column."""
    from PIL import Image, ImageDraw

    cell = inputs.shape[-1] * scale
    pad, gap, group = 8, 4, 16
    font, small = _font(13), _font(11)
    line = 17
    n_in = inputs.shape[0]
    x_in = [pad + i * (cell + gap) for i in range(n_in)]
    x0 = x_in[-1] + cell + group
    x_col = [x0 + j * (cell + gap) for j in range(len(columns))]
    width = x_col[-1] + cell + pad
    head_h = line + 4 + 2 * line
    row_h = line + cell + gap
    foot_h = 2 * line + 4
    height = pad + head_h + len(prompts) * row_h + foot_h + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), _fit(draw, title, font, width - 2 * pad), fill="black", font=font)
    y = pad + line + 4
    draw.text((x_in[0], y), "input photos", fill="black", font=font)
    draw.text((x_in[0], y + line), f"{n_in} of the subject", fill="dimgray", font=small)
    for x, c in zip(x_col, columns):
        draw.text((x, y), _fit(draw, c.head, font, cell), fill="black", font=font)
        draw.text((x, y + line), _fit(draw, c.detail, small, cell), fill="dimgray", font=small)
    y = pad + head_h

    def paste(t: torch.Tensor, x: int, yy: int):
        t = torch.nn.functional.interpolate(t[None].float().clamp(0, 1), scale_factor=scale, mode="nearest")[0]
        arr = (t.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        img.paste(Image.fromarray(arr), (x, yy))

    for r, prompt in enumerate(prompts):
        draw.text((x0, y), _fit(draw, f"prompt: {prompt}", small, width - x0 - pad), fill="black", font=small)
        if r == 0:
            for i, x in enumerate(x_in):
                paste(inputs[i], x, y + line)
                draw.text((x + 2, y + line + 1), str(i + 1), fill="white", font=small, stroke_width=1,
                          stroke_fill="black")
        for x, c in zip(x_col, columns):
            paste(c.images[r], x, y + line)
        y += row_h
    per_image = lambda c: c.sample_s / max(len(prompts), 1)  # noqa: E731
    for x, c in zip(x_col, columns):
        first = "no tuning" if c.personalize_s is None else f"personalize {_seconds(c.personalize_s)}"
        draw.text((x, y + 2), _fit(draw, first, small, cell), fill="black", font=small)
        draw.text((x, y + 2 + line), _fit(draw, f"sample {_seconds(per_image(c))}/image", small, cell), fill="dimgray",
                  font=small)
    return img
