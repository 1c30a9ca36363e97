"""`boothkit demo`: no arguments needed. Takes a held-out toy-world subject that no trainer has seen, personalizes the
shipped toy model with the method a user should see first (DEMO_METHODS: the first whose file is trained), and
writes a PNG grid:

    row per prompt:  input images | base model without personalization | personalized result
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The demo's default, in order of preference, each with why: the best identity on the held-out table (README,
# "Evaluation") among the methods that personalize within seconds on a CPU; quick-tune scores higher but takes over a
# minute a concept here.
DEMO_METHODS = [
    ("e4t-15", "E4T, 15 tuning steps from one photo: the best identity within seconds on the held-out table"),
    ("instantbooth", "InstantBooth, zero-shot (no tuning)"),
    ("quicktune-demo", "quick-tune with a short budget (no trained E4T or InstantBooth file)"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="boothkit demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subject", type=int, default=0, help="which held-out subject (0..)")
    p.add_argument("--method", default=None, help="personalization method (default: the best one that is trained)")
    p.add_argument("--prompts", type=int, default=4, help="how many prompts (contexts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of the 32x32 toy images in the grid")
    p.add_argument("--out", default="out/demo.png", help="the PNG to write, or a folder (then FOLDER/demo.png)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.suffix == "" or out.is_dir():
        args.out = str(out / "demo.png")
    elif out.suffix.lower() != ".png":  # checked before the minute of work, not after
        p.error(f"--out {args.out}: the grid is written as PNG; give a .png file or a folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from ..backend.imageio import save_png
    from .evaluate import eval_contexts, make_subjects, prompts_for
    from .methods import METHODS, ToyEnv

    t0 = time.perf_counter()
    bar = tqdm(total=4, desc="demo", dynamic_ncols=True)
    env = ToyEnv.load(sample_steps=args.steps)
    trained = {"e4t": env.e4t is not None, "instantbooth": env.instantbooth is not None}
    why = "chosen with --method"
    method = args.method
    if method is None:
        method, why = next((m, w) for m, w in DEMO_METHODS if trained.get(m.split("-")[0], True))
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    bar.update(1)
    bar.set_postfix_str("subject")
    subject = make_subjects(args.subject + 1, 3, args.seed)[args.subject]
    contexts = eval_contexts(args.prompts, args.seed + 1)
    prompts, plain = prompts_for(subject, contexts, env.identifier)
    base = METHODS["base"](env, subject, args.seed)(prompts, plain, args.seed)
    bar.update(1)
    bar.set_postfix_str(method)
    personalized = METHODS[method](env, subject, args.seed)(prompts, plain, args.seed)
    bar.update(1)

    pad = lambda x: torch.nn.functional.pad(x, (1, 1, 1, 1), value=1.0)  # white separators
    refs = torch.cat([pad(im) for im in subject.images], dim=-1)
    rows = []
    for i in range(len(prompts)):
        rows.append(torch.cat([refs, pad(torch.ones_like(subject.images[0])), pad(base[i]), pad(personalized[i])],
                              dim=-1))
    grid = torch.cat(rows, dim=-2)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=args.scale, mode="nearest")[0]
    path = save_png(grid, args.out)
    bar.update(1)
    bar.close()
    print(f"subject: held-out {subject.class_name} #{subject.identity.id}; method: {method} ({why}; another: "
          f"--method NAME)")
    for i, p in enumerate(prompts):
        print(f"  row {i + 1}: {p}")
    print(f"columns: {len(subject.images)} input images | (gap) | base model, no personalization | {method}")
    print(f"wrote {path.resolve()} in {time.perf_counter() - t0:.1f} s")
    return 0
