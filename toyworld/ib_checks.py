"""Cheap checks of an InstantBooth file on the toy world (issue #30), run before scaling a recipe:

conditioning   fixed-noise denoising loss on renders of training (or held-out) identities, the concept taken from the
               same render, from other renders of the same identity, from another identity of the same class, or
               with the adapters off (β = 0): does the file carry the render it is shown or the identity?
residuals      per adapter: |tanh γ|, the top singular value of W_out·W_v (the value path's gain), their product, and
               ‖β·tanh γ·S(...)‖ / ‖y‖ measured while sampling held-out subjects
probes         linear probes (logistic regression, trained on renders of training identities, scored on held-out
               identities) of the toy CLIP's global feature, its CLS and mean patch token, and the file's patch
               features f_p: what the patch tokens carry about pattern, part, eye colour and colours

`boothkit eval --instantbooth-checks [--instantbooth FILE] [--out DIR]` runs all three and writes checks.json/.md."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TIMESTEPS = (100, 300, 500, 700, 900)


def _interleaved(split: str, n: int) -> list:
    from . import domain

    by_class: dict[str, list] = {}
    for ident in domain.identities(split):
        by_class.setdefault(ident.class_name, []).append(ident)
    order = [x for group in zip(*by_class.values()) for x in group]
    return order[:n]


def _renders(ident, n: int, seed: int):
    from . import domain

    return domain.identity_renders(ident, n, seed * 7919 + ident.id)


def _concept(env, ib, samples):
    from ..hosts.diffusers.instantbooth import encode_images

    images = torch.stack([s.image for s in samples])
    masks = torch.stack([s.mask for s in samples])
    return ib.encode(*encode_images(env.vision, images, masks, ib))


@torch.no_grad()
def conditioning_loss(env, ib, split: str = "train", n_ids: int = 16, seed: int = 0,
                      timesteps=TIMESTEPS) -> dict:
    """Mean fixed-noise loss (ε-MSE) on the subject's pixels and on the whole image, per conditioning, with the
    training's weights (α = 1, β = 1). Target: render 0 of each identity; "other renders": renders 1-3."""
    from . import domain
    from ..hosts.diffusers.instantbooth import InstantBoothHooks, condition_with_concept

    idents = _interleaved(split, n_ids)
    renders = {i.id: _renders(i, 4, seed) for i in idents}
    same_class = {c: [i for i in idents if i.class_name == c] for c in {i.class_name for i in idents}}
    unet, sched = env.base.unet, env.base.scheduler
    conds = ["same render", "other render (N=1)", "other renders (N=3)", "another identity", "beta=0 (token only)",
             "nothing (no token, beta=0)"]
    sums = {c: {"subject": [], "image": []} for c in conds}
    t = torch.tensor(timesteps)
    for ident in idents:
        r = renders[ident.id]
        peers = same_class[ident.class_name]
        other = peers[(peers.index(ident) + 1) % len(peers)]
        target = r[0]
        noun = domain.CLASS_NOUNS[ident.class_name][0]
        prompt = domain.caption(ident.class_name, target.context, noun=noun, identifier=env.identifier)
        text = env.encode([prompt])
        x0 = (target.image[None] * 2 - 1).expand(len(t), -1, -1, -1)
        g = torch.Generator().manual_seed(seed * 1_000_003 + ident.id)
        noise = torch.randn(x0.shape, generator=g)
        noisy = sched.add_noise(x0, noise, t)
        m = target.mask[None].expand(len(t), -1, -1, -1)
        sources = {"same render": [r[0]], "other render (N=1)": [r[1]], "other renders (N=3)": r[1:4],
                   "another identity": [renders[other.id][0]], "beta=0 (token only)": [r[0]],
                   "nothing (no token, beta=0)": None}
        for name, src in sources.items():
            if src is None:
                cond, f_p, beta = text, None, 0.0
            else:
                concept = _concept(env, ib, src)
                cond = condition_with_concept(text, env.base.tokenizer, prompt, concept, 1.0)
                f_p, beta = concept.f_p, (0.0 if name.startswith("beta=0") else 1.0)
            with InstantBoothHooks(unet, ib, f_p, beta):
                pred = unet(noisy, t, encoder_hidden_states=cond.expand(len(t), -1, -1)).sample
            err = (pred - noise).pow(2).mean(1, keepdim=True)
            sums[name]["subject"].append(((err * m).sum() / m.sum().clamp(min=1)).item())
            sums[name]["image"].append(err.mean().item())
    return {"split": split, "identities": len(idents), "timesteps": list(timesteps), "alpha": 1.0,
            "loss": {c: {k: float(np.mean(v)) for k, v in d.items()} for c, d in sums.items()}}


@torch.no_grad()
def adapter_gains(ib) -> list[dict]:
    out = []
    for i, a in enumerate(ib.adapters):
        gate = float(torch.tanh(a.gate))
        sv = float(torch.linalg.matrix_norm(a.to_out.weight.float() @ a.to_v.weight.float(), ord=2))
        out.append({"block": i, "dim": a.to_q.weight.shape[0], "tanh_gate": gate, "sv_out_v": sv,
                    "gated_gain": abs(gate) * sv})
    return out


@torch.no_grad()
def residual_norms(env, ib, n_subjects: int = 4, n_contexts: int = 2, seed: int = 0) -> list[dict]:
    """‖residual‖ / ‖y‖ per adapter (mean over tokens' batch norms, all sampling steps) while sampling development
    subjects with the file's α, β and guidance setting."""
    from .evaluate import eval_contexts, make_subjects, prompts_for
    from .methods import instantbooth

    ratios: dict[int, list[float]] = {i: [] for i in range(len(ib.adapters))}
    originals = []
    for i, a in enumerate(ib.adapters):
        originals.append(a.residual)

        def wrapped(y, f_p=None, beta=1.0, kv=None, _i=i, _orig=a.residual):
            r = _orig(y, f_p, beta, kv)
            ratios[_i].append(float(r.float().norm() / y.float().norm().clamp(min=1e-12)))
            return r
        a.residual = wrapped
    try:
        contexts = eval_contexts(n_contexts, seed, dev=True)
        for subj in make_subjects(n_subjects, 3, seed, dev=True):
            prompts, plain = prompts_for(subj, contexts, env.identifier)
            instantbooth(env, subj, seed)(prompts, plain, seed)
    finally:
        for a, orig in zip(ib.adapters, originals):
            del a.residual  # back to the class's method
    return [{"block": i, "residual_over_y": float(np.mean(v)) if v else None} for i, v in ratios.items()]


ATTRIBUTES = ("pattern", "part", "eye", "primary", "secondary")


def _label(ident, attr: str):
    return (ident.class_name, ident.part) if attr == "part" else getattr(ident, attr)


@torch.no_grad()
def _features(env, ib, samples) -> dict[str, torch.Tensor]:
    from ..backend.preprocess import prepare_concept_images

    c = ib.config
    images = torch.stack([s.image for s in samples])
    masks = torch.stack([s.mask for s in samples])
    pixels = prepare_concept_images(images, masks, c.image_size, c.crop_margin, c.background)
    out = env.vision(pixel_values=pixels.to(next(env.vision.parameters()).dtype))
    tokens = out.last_hidden_state.float()
    # per image: [N, T, ctx] (the patch head, plus the pixel map where the file has one)
    f_p = ib.patch_features(tokens[:, None].to(ib.patch_encoder.fc.weight.dtype), pixels[:, None]).float()
    return {"global (image_embeds)": out.image_embeds.float(), "CLS token": tokens[:, 0],
            "patch tokens (mean)": tokens[:, 1:].mean(1), "patch tokens (all, flattened)": tokens[:, 1:].flatten(1),
            "f_p (the file's, mean)": f_p[:, 1:].mean(1)}


def _probe(xtr, ytr, xte, yte, steps: int = 300) -> float:
    mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    classes = sorted(set(ytr) | set(yte), key=str)
    idx = {c: i for i, c in enumerate(classes)}
    ytr_t = torch.tensor([idx[y] for y in ytr])
    yte_t = torch.tensor([idx[y] for y in yte])
    lin = torch.nn.Linear(xtr.shape[1], len(classes))
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(xtr), ytr_t).backward()
        opt.step()
    with torch.no_grad():
        return float((lin(xte).argmax(1) == yte_t).float().mean())


def probes(env, ib, train_renders: int = 4, heldout_renders: int = 8, seed: int = 0) -> dict:
    """Held-out accuracy of a linear probe per (feature, attribute), and the majority-class rate (chance)."""
    from . import domain

    torch.manual_seed(seed)
    tr = [(i, s) for i in domain.identities("train") for s in _renders(i, train_renders, seed)]
    te = [(i, s) for i in domain.identities("heldout") for s in _renders(i, heldout_renders, seed + 1)]
    ftr = _features(env, ib, [s for _, s in tr])
    fte = _features(env, ib, [s for _, s in te])
    out = {"train_images": len(tr), "heldout_images": len(te), "accuracy": {}, "chance": {}}
    for attr in ATTRIBUTES:
        ytr = [_label(i, attr) for i, _ in tr]
        yte = [_label(i, attr) for i, _ in te]
        counts = {}
        for y in yte:
            counts[y] = counts.get(y, 0) + 1
        out["chance"][attr] = max(counts.values()) / len(yte)
        for name in ftr:
            out["accuracy"].setdefault(name, {})[attr] = _probe(ftr[name], ytr, fte[name], yte)
    return out


def run_checks(env, ib, out: Path, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    result = {"settings": {"file": ib.config.extra.get("file", ""), "alpha": ib.config.alpha,
                           "beta": ib.config.beta, "adapters_on_uncond": ib.config.adapters_on_uncond,
                           "threads": torch.get_num_threads(), "seed": seed}}
    log.info("checks: conditioning loss")
    result["conditioning_train"] = conditioning_loss(env, ib, "train", seed=seed)
    result["conditioning_heldout"] = conditioning_loss(env, ib, "heldout", seed=seed)
    log.info("checks: adapter gains and residual norms")
    gains = adapter_gains(ib)
    for g, r in zip(gains, residual_norms(env, ib, seed=seed)):
        g.update(r)
    result["adapters"] = gains
    log.info("checks: linear probes")
    result["probes"] = probes(env, ib, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checks.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "checks.md").write_text(checks_markdown(result))
    return result


def checks_markdown(r: dict) -> str:
    s = r["settings"]
    lines = [f"InstantBooth checks ({s['file'] or 'the loaded file'}; sampling α {s['alpha']}, β {s['beta']}, adapters "
             f"on the unconditional half: {s['adapters_on_uncond']}; seed {s['seed']}, {s['threads']} threads).", ""]
    for key in ("conditioning_train", "conditioning_heldout"):
        c = r[key]
        lines += [f"Fixed-noise loss, {c['split']} identities ({c['identities']}, target render 0, t ∈ "
                  f"{c['timesteps']}, α = {c['alpha']}, β = 1 unless stated):", "",
                  "| concept from | loss on the subject | loss on the image |", "|---|---|---|"]
        lines += [f"| {k} | {v['subject']:.4f} | {v['image']:.4f} |" for k, v in c["loss"].items()]
        lines.append("")
    lines += ["Adapters (gain of the value path; residual measured while sampling 4 development subjects × 2 "
              "contexts):", "", "| block | width | tanh γ | σ_max(W_out·W_v) | gated gain | ‖residual‖/‖y‖ |",
              "|---|---|---|---|---|---|"]
    for a in r["adapters"]:
        ratio = "–" if a.get("residual_over_y") is None else f"{a['residual_over_y']:.3f}"
        lines.append(f"| {a['block']} | {a['dim']} | {a['tanh_gate']:+.4f} | {a['sv_out_v']:.2f} | "
                     f"{a['gated_gain']:.3f} | {ratio} |")
    p = r["probes"]
    attrs = list(p["chance"])
    lines += ["", f"Linear probes (trained on {p['train_images']} renders of training identities, accuracy on "
                  f"{p['heldout_images']} renders of held-out identities):", "",
              "| feature | " + " | ".join(attrs) + " |", "|---|" + "---|" * len(attrs),
              "| chance (majority) | " + " | ".join(f"{p['chance'][a]:.2f}" for a in attrs) + " |"]
    for name, acc in p["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{acc[a]:.2f}" for a in attrs) + " |")
    return "\n".join(lines) + "\n"
