"""`boothkit eval --pairs`: several concepts in one image (issue #29) on the toy world. Held-out subjects 2i and 2i+1
(a cat and a robot: make_subjects interleaves the classes) are each made a concept by the single-subject method
(methods.CONCEPTS), bound to their own identifier (sks, zwx), and sampled together on a 32x64 canvas, subject 2i in
the left half and 2i+1 in the right. Each half (a 32x32 crop) is scored against both subjects' references:

own          identity of each half with its own subject's references
other        identity of each half with the other subject's references (the identities leaking or swapped)
swap_margin  own − other
context      the context margin (evaluate.py) of each half with its own class prompt; /base against the base
             model on the same canvas (each half its class prompt, composited)

Modes: NAME composites the regions' noise predictions, each from its own concept alone (hosts/diffusers/regions.py);
NAME-residual (InstantBooth only) samples one prompt carrying both identifiers in one pass, each concept's adapter
term limited to its half (InstantBoothHooks(region=...))."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

log = logging.getLogger(__name__)

RESIDUAL = "-residual"
PAIR_DEFAULT_METHODS = ["base", "instantbooth", "instantbooth-residual", "quicktune", "e4t-0", "e4t-15"]


def method_of(name: str) -> tuple[str, str]:
    """(the concept maker's name, "composite" or "residual")."""
    from .methods import CONCEPTS

    concept, mode = (name[: -len(RESIDUAL)], "residual") if name.endswith(RESIDUAL) else (name, "composite")
    if concept not in CONCEPTS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(CONCEPTS)}, and "
                         f"instantbooth{RESIDUAL} (one pass, adapters masked)")
    if mode == "residual" and not concept.startswith("instantbooth"):
        raise ValueError(f"{name!r}: only InstantBooth's adapters can be limited to a region within one pass; the "
                         f"tuned methods' weights are composited ({concept})")
    return concept, mode


def halves(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ..backend.regions import box_mask

    return box_mask((0, 0, 0.5, 1), height, width), box_mask((0.5, 0, 1, 1), height, width)


def residual_prompts(prompts_a: list[str], noun_b: str, identifier_b: str) -> list[str]:
    """One prompt for both subjects in the toy captions' grammar: the left subject's caption, "with a zwx robot"."""
    return [f"{p} with a {identifier_b} {noun_b}" for p in prompts_a]


def sample_pair(env, a, b, prompts: tuple[list[str], list[str]], plain: tuple[list[str], list[str]], mode: str,
                seed: int, nouns: tuple[str, str], identifiers: tuple[str, str]) -> torch.Tensor:
    """Images [B, 3, R, 2R]: concept ``a`` (methods.Personalized) on the left, ``b`` on the right."""
    from ..hosts.diffusers.regions import Region, sample_regions
    from ..hosts.diffusers.sampling import sample
    from .domain import RESOLUTION

    h, w = RESOLUTION, 2 * RESOLUTION
    left, right = halves(h, w)
    uncond = env.encode([""])
    if mode == "residual":
        text = residual_prompts(prompts[0], nouns[1], identifiers[1])
        with torch.no_grad():
            cond = b.inject(a.encode(text, identifiers[0]), text, identifiers[1])
        with a.applied(left), b.applied(right):
            return sample(env.base, cond, uncond, seed, env.sample_steps, env.guidance, height=h, width=w)
    with torch.no_grad():
        conds = [c.encode(pl if c.plain else pr, ident)
                 for c, pr, pl, ident in zip((a, b), prompts, plain, identifiers)]
    regions = [Region(cond, mask, c.applied) for c, cond, mask in zip((a, b), conds, (left, right))]
    return sample_regions(env.base, regions, uncond, seed=seed, steps=env.sample_steps, guidance=env.guidance,
                          height=h, width=w)


def evaluate_pairs(methods: list[str] | None, n_subjects: int, k_refs: int, n_contexts: int, samples_per_prompt: int,
                   seed: int, steps: int, dev: bool = False, context_draw: str = "halves", picture=None) -> dict:
    """The table of ``methods`` over the pairs of the first ``n_subjects`` held-out subjects (an even number).
    ``picture``: a PNG path for the first pair in its first context (the reference scene, then one image per
    method)."""
    from . import domain
    from .evaluate import context_alternatives, eval_contexts, make_subjects, prompts_for, with_ratios
    from .methods import CONCEPTS, ToyEnv
    from .scorers import load_scorers

    methods = list(methods or PAIR_DEFAULT_METHODS)
    modes = {name: method_of(name) for name in methods}
    if n_subjects < 2 or n_subjects % 2:
        raise ValueError(f"--pairs takes an even number of subjects (two per image), got {n_subjects}")
    env = ToyEnv.load(sample_steps=steps)
    scorers = load_scorers()
    subjects = make_subjects(n_subjects, k_refs, seed, dev)
    pairs = [(subjects[i], subjects[i + 1]) for i in range(0, n_subjects, 2)]
    contexts = eval_contexts(n_contexts, seed, dev, context_draw)
    identifiers = domain.RARE_WORDS[:2]
    r = domain.RESOLUTION
    rows, shown = {}, []
    for name in methods:
        concept, mode = modes[name]
        make = CONCEPTS[concept]
        own, other, context, prep, per_image = [], [], [], [], []
        for pa, pb in pairs:
            t0 = time.perf_counter()
            a, b = make(env, pa, seed), make(env, pb, seed)
            t1 = time.perf_counter()
            texts = [prompts_for(s, contexts, ident) for s, ident in zip((pa, pb), identifiers)]
            prompts = tuple([p for p in t[0] for _ in range(samples_per_prompt)] for t in texts)
            plain = tuple([p for p in t[1] for _ in range(samples_per_prompt)] for t in texts)
            images = sample_pair(env, a, b, prompts, plain, mode, seed, (pa.noun, pb.noun), identifiers)
            t2 = time.perf_counter()
            prep.append((t1 - t0) / 2)
            per_image.append((t2 - t1) / len(images))
            if pa is pairs[0][0]:
                shown.append(images[0])
            sides = (images[..., :r], images[..., r:])
            for side, subj, rival, pl in ((sides[0], pa, pb, plain[0]), (sides[1], pb, pa, plain[1])):
                own.append(scorers.identity_similarity(side, subj.images).mean().item())
                other.append(scorers.identity_similarity(side, rival.images).mean().item())
                alternatives = [x for x in context_alternatives(subj, contexts) for _ in range(samples_per_prompt)]
                context.append(scorers.context_margin(side, pl, alternatives).mean().item())
        rows[name] = {"mode": mode, "own": float(np.mean(own)), "other": float(np.mean(other)),
                      "swap_margin": float(np.mean(own) - np.mean(other)),
                      # per half, in the order of settings["pairs"] (left, right, left, right, ...)
                      "own_per_half": [round(v, 4) for v in own], "other_per_half": [round(v, 4) for v in other],
                      "context": float(np.mean(context)), "context_std": float(np.std(context)),
                      "personalize_s": float(np.mean(prep)), "sample_s_per_image": float(np.mean(per_image))}
        log.info("%s: own %.3f other %.3f", name, rows[name]["own"], rows[name]["other"])
    for row in with_ratios(rows).values():
        row.pop("clip_t_vs_base", None)  # no CLIP-T here
    if picture is not None:
        pa, pb = pairs[0]
        ref = domain.render_pair(pa.identity, pb.identity, contexts[0], seed).image
        from ..backend.imageio import save_png

        save_png(torch.stack([ref] + shown), picture)
    return {"methods": rows,
            "settings": {"pairs": [[pa.identity.id, pb.identity.id] for pa, pb in pairs],
                         "classes": [[pa.class_name, pb.class_name] for pa, pb in pairs],
                         "identifiers": list(identifiers), "canvas": [r, 2 * r], "references": k_refs,
                         "contexts": n_contexts, "samples_per_prompt": samples_per_prompt, "seed": seed,
                         "sample_steps": steps, "guidance": env.guidance, "threads": torch.get_num_threads(),
                         **({"dev": True} if dev else {}),
                         **({"context_draw": context_draw} if context_draw != "random" else {})}}


def pairs_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Pairs of held-out toy-world identities, two in one {s['canvas'][0]}x{s['canvas'][1]} image (left / "
             f"right half, identifiers {' / '.join(s['identifiers'])}): {len(s['pairs'])} pairs × {s['contexts']} "
             f"prompts × {s['samples_per_prompt']} samples, {s['references']} reference images each, seed "
             f"{s['seed']}, {s['sample_steps']} DDIM steps, guidance {s['guidance']}, {s['threads']} CPU threads.", "",
             "| method | mode | own ↑ | other ↓ | swap margin ↑ | context ↑ | context / base "
             "| personalize s/concept | s/image |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        ratio = "–" if r.get("context_vs_base") is None else f"{r['context_vs_base']:.3f}"
        lines.append(f"| {name} | {r['mode']} | {r['own']:.3f} | {r['other']:.3f} | {r['swap_margin']:.3f} | "
                     f"{r['context']:.3f} ± {r['context_std']:.3f} | {ratio} | {r['personalize_s']:.2f} | "
                     f"{r['sample_s_per_image']:.3f} |")
    return "\n".join(lines) + "\n"
