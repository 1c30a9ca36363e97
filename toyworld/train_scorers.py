"""Train the toy world's frozen scorers: the toy CLIP backbone and the identity network (face-recognition analogue).

Both learn from TRAIN identities only; the held-out identities measure them at the end (``toyworld.scorers.validate``).

* identity network: small CNN → 64-d unit embedding, ArcFace over the train identities, renders in random contexts
  (some with the background masked out or cropped to the subject, as references are preprocessed downstream);
* toy CLIP: image↔caption contrastive loss in which identical captions count as positives (a batch holds many
  duplicates), plus a supervised-contrastive identity term between two renders of each identity in different
  contexts, because InstantBooth's concept and patch encoders read identity from this backbone, as they do from
  real CLIP.

Checkpoints (safetensors, written atomically) go to ``--run-dir``; ``--resume`` continues from them. The exported
files are recorded in the weights manifest with the exact command that rebuilds them::

    python -m boothkit.toyworld.train_scorers --out-dir toyworld/weights
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import scorers as sc
from . import store

logger = logging.getLogger("boothkit.toyworld.train_scorers")

CKPT_FORMAT = "boothkit.toyworld.scorer_checkpoint"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m boothkit.toyworld.train_scorers",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=store.WEIGHTS_DIR, help="weights folder (holds MANIFEST.json)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/toy_scorers"), help="checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --run-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--identity-steps", type=int, default=800)
    p.add_argument("--identity-batch", type=int, default=128)
    p.add_argument("--identity-lr", type=float, default=2e-3)
    p.add_argument("--arcface-scale", type=float, default=16.0)
    p.add_argument("--arcface-margin", type=float, default=0.3)
    p.add_argument("--clip-steps", type=int, default=1000)
    p.add_argument("--clip-identities", type=int, default=64, help="identities per CLIP batch (2 renders each)")
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--identity-weight", type=float, default=1.0, help="weight of the CLIP identity (SupCon) term")
    p.add_argument("--supcon-temperature", type=float, default=0.1)
    p.add_argument("--renders-per-identity", type=int, default=40, help="size of the shared render pool")
    p.add_argument("--augment-p", type=float, default=0.4, help="chance a view is background-masked/cropped")
    p.add_argument("--degrade-p", type=float, default=0.3, help="chance a training image is blurred and noised")
    p.add_argument("--tiny", action="store_true", help="tiny networks (tests)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--validate-identities", type=int, default=64, help="held-out identities in the final check")
    args = p.parse_args(argv)
    for name in ("renders_per_identity", "identity_steps", "clip_steps", "identity_batch", "clip_identities",
                 "threads", "checkpoint_every", "log_every", "validate_identities"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.renders_per_identity < 2:
        p.error("--renders-per-identity must be at least 2 (the identity term pairs two renders)")
    if args.clip_identities < 2:
        p.error("--clip-identities must be at least 2 (the identity term needs negatives)")
    return args


# ----------------------------------------------------------------------------------------------------------------
# data


def mask_and_crop(image: torch.Tensor, mask: torch.Tensor, fill: float, crop: bool) -> torch.Tensor:
    """The reference preprocessing done downstream: background set to a flat ``fill``, and with ``crop`` the image cut
    to the subject's square, padded mask box and resized back to full size."""
    r = image.shape[-1]
    m = (mask > 0.5).float()
    out = image * m + fill * (1 - m)
    ys, xs = torch.nonzero(m[0], as_tuple=True)
    if crop and len(ys):
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        side = min(r, max(y1 - y0, x1 - x0) + 2)
        y0 = max(0, min(r - side, (y0 + y1 - side) // 2))
        x0 = max(0, min(r - side, (x0 + x1 - side) // 2))
        crop_ = out[:, y0:y0 + side, x0:x0 + side]
        out = F.interpolate(crop_[None], size=(r, r), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    return out


@dataclass
class RenderPool:
    """Renders of the train identities made once and shared by both phases (rendering costs as much as a CNN step).

    Captions are drawn per use (template and noun vary), augmentation is applied per use."""

    images: torch.Tensor   # [N,3,R,R] float16
    masks: torch.Tensor    # [N,1,R,R] bool
    labels: torch.Tensor   # [N] index into the identity list
    contexts: list
    by_label: list[list[int]]


def render_pool(domain, idents: list, per_identity: int, seed: int) -> RenderPool:
    from tqdm import tqdm

    rng = random.Random(f"pool/{seed}")
    images, masks, labels, contexts = [], [], [], []
    for i, ident in enumerate(tqdm(idents, desc="render pool", mininterval=30, file=sys.stderr)):
        for _ in range(per_identity):
            ctx = domain.random_context(rng)
            sample = domain.render(ident, ctx, rng.randrange(2**31))
            images.append(sample.image.half())
            masks.append(sample.mask > 0.5)
            labels.append(i)
            contexts.append(ctx)
    by_label = [list(range(i * per_identity, (i + 1) * per_identity)) for i in range(len(idents))]
    return RenderPool(torch.stack(images), torch.stack(masks), torch.tensor(labels), contexts, by_label)


def degrade(images: torch.Tensor, rng: random.Random, p: float) -> torch.Tensor:
    """With chance ``p`` per image: Gaussian blur (σ 0.3–1.2 px) and pixel noise (σ ≤ 0.04), because the scorers
    judge generated images, which are softer and noisier than renders."""
    hit = [k for k in range(len(images)) if rng.random() < p]
    if hit:
        sigma = torch.tensor([rng.uniform(0.3, 1.2) for _ in hit])
        noise = torch.tensor([rng.uniform(0.0, 0.04) for _ in hit]).view(-1, 1, 1, 1)
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        x = sc.gaussian_blur(images[hit], sigma)
        images[hit] = (x + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return images


def draw(pool: RenderPool, domain, idents: list, picks: list[int], rng: random.Random, augment: list[bool],
         degrade_p: float = 0.0):
    """Pool renders ``picks`` as float images (``augment[k]``: background masked/cropped; some degraded, see
    :func:`degrade`) with fresh captions."""
    images = pool.images[picks].float()
    for k, aug in enumerate(augment):
        if aug:
            images[k] = mask_and_crop(images[k], pool.masks[picks[k]].float(), rng.choice([0.0, 0.5, 1.0]),
                                      rng.random() < 0.5)
    images = degrade(images, rng, degrade_p)
    captions = [domain.caption(idents[int(pool.labels[i])].class_name, pool.contexts[i], rng=rng) for i in picks]
    return images, captions, pool.labels[picks]


# ----------------------------------------------------------------------------------------------------------------
# losses


class ArcFace(nn.Module):
    """Additive angular margin softmax (ArcFace): logits s·cos(θ + m) for the true class, s·cos θ otherwise."""

    def __init__(self, embed_dim: int, n_classes: int, scale: float, margin: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, embed_dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = emb @ F.normalize(self.weight, dim=-1).T
        theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        target = torch.cos(theta + self.margin)
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        logits = torch.where(onehot, target, cos) * self.scale
        return F.cross_entropy(logits, labels)


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, captions: list[str],
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss where every image-caption pair with the same caption is a positive
    (targets spread evenly over them), since toy captions repeat within a batch."""
    ids = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    cap = torch.tensor([ids[c] for c in captions], device=img.device)
    pos = (cap[:, None] == cap[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T
    return 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                  + torch.sum(-target * logits.T.log_softmax(1), 1).mean())


def supcon_loss(emb: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.): pull renders of the same identity together."""
    n = emb.shape[0]
    logits = emb @ emb.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=emb.device)
    logits = logits.masked_fill(self_mask, -1e9)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits.log_softmax(1)
    has_pos = pos.any(1)
    return -(log_prob * pos).sum(1)[has_pos].div(pos.sum(1)[has_pos]).mean()


def lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 % of ``base``."""
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------------------------------------------
# checkpoints (safetensors; optimizer state flattened into tensors + JSON metadata)


def save_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, step: int,
                    fingerprint: dict, done: bool) -> None:
    from safetensors.torch import save_file

    tensors = {f"{name}.{k}": v.detach().contiguous().cpu() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optim.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous().cpu()
    meta = {"format": CKPT_FORMAT, "version": sc.VERSION, "step": str(step), "done": str(done),
            "fingerprint": json.dumps(fingerprint, sort_keys=True),
            "param_groups": json.dumps(opt["param_groups"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    fingerprint: dict) -> tuple[int, bool]:
    """Restore ``modules`` and ``optimizer`` from ``path``; returns (step, done). The run's settings must match."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: metadata field 'format' is {meta.get('format')!r}, expected {CKPT_FORMAT!r}.")
    found = json.loads(meta["fingerprint"])
    if found != fingerprint:
        diff = {k: (found.get(k), fingerprint.get(k)) for k in set(found) | set(fingerprint)
                if found.get(k) != fingerprint.get(k)}
        raise ValueError(f"{path}: checkpoint was made with other settings (field: (checkpoint, now)): {diff}; "
                         f"rerun with the same arguments or without --resume.")
    tensors = load_file(str(path))
    for name, m in modules.items():
        prefix = name + "."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"]), meta["done"] == "True"


# ----------------------------------------------------------------------------------------------------------------
# the two phases


def _fingerprint(args: argparse.Namespace, phase: str, **extra) -> dict:
    keys = {"identity": ("seed", "identity_steps", "identity_batch", "identity_lr", "arcface_scale",
                         "arcface_margin", "augment_p", "degrade_p", "renders_per_identity", "tiny"),
            "clip": ("seed", "clip_steps", "clip_identities", "clip_lr", "identity_weight", "supcon_temperature",
                     "augment_p", "degrade_p", "renders_per_identity", "tiny")}[phase]
    return {"phase": phase, **{k: getattr(args, k) for k in keys}, **extra}


def _run_phase(name: str, args, modules: dict[str, nn.Module], optimizer, total: int, base_lr: float, step_fn,
               fingerprint: dict) -> None:
    from tqdm import tqdm

    ckpt = args.run_dir / f"{name}.ckpt.safetensors"
    start = 0
    if args.resume and ckpt.exists():
        start, done = load_checkpoint(ckpt, modules, optimizer, fingerprint)
        logger.info("%s: resumed at step %d/%d%s", name, start, total, " (done)" if done else "")
    elif ckpt.exists():
        logger.warning("%s: %s exists; starting over (pass --resume to continue it)", name, ckpt)
    t0, running = time.time(), 0.0
    for step in tqdm(range(start, total), desc=name, initial=start, total=total, mininterval=30,
                     disable=total - start < 2, file=sys.stderr):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, base_lr)
        logs = step_fn(step)
        running += logs["loss"]
        if (step + 1) % args.log_every == 0 or step + 1 == total:
            n = (step % args.log_every) + 1
            extra = " ".join(f"{k} {v:.4f}" for k, v in logs.items() if k != "loss")
            logger.info("%s step %d/%d loss %.4f %s (%.2f s/step)", name, step + 1, total, running / n, extra,
                        (time.time() - t0) / (step + 1 - start))
            running = 0.0
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == total:
            save_checkpoint(ckpt, modules, optimizer, step + 1, fingerprint, done=step + 1 == total)
    for m in modules.values():
        m.eval()


def train_identity(args, domain, train_ids: list, pool: RenderPool) -> sc.IdentityNet:
    torch.manual_seed(args.seed)
    channels = (8, 16) if args.tiny else (32, 64, 128)
    net = sc.IdentityNet(channels=channels, embed_dim=64, resolution=domain.RESOLUTION).to(args.device)
    head = ArcFace(64, len(train_ids), args.arcface_scale, args.arcface_margin).to(args.device)
    opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=args.identity_lr, weight_decay=1e-4)

    def step_fn(step: int) -> dict:
        net.train()
        rng = random.Random(f"identity/{args.seed}/{step}")
        picks = [rng.randrange(len(pool.labels)) for _ in range(args.identity_batch)]
        images, _, labels = draw(pool, domain, train_ids, picks, rng,
                                 [rng.random() < args.augment_p for _ in picks], args.degrade_p)
        images, labels = images.to(args.device), labels.to(args.device)
        emb = net(images)
        loss = head(emb, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    _run_phase("identity", args, {"net": net, "head": head}, opt, args.identity_steps, args.identity_lr, step_fn,
               _fingerprint(args, "identity", n_train=len(train_ids), channels=list(channels)))
    return net.requires_grad_(False)


def train_clip(args, domain, train_ids: list, pool: RenderPool, tokenizer):
    from transformers import CLIPModel

    torch.manual_seed(args.seed + 1)
    sizes = (dict(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, projection_dim=16)
             if args.tiny else dict(vision_hidden=128, vision_layers=4, text_hidden=64, text_layers=2,
                                    projection_dim=64))
    config = sc.clip_config(tokenizer, image_size=domain.RESOLUTION, **sizes)
    model = CLIPModel(config).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.clip_lr, weight_decay=0.05)
    mean = torch.tensor(sc.CLIP_MEAN, device=args.device).view(1, 3, 1, 1)
    std = torch.tensor(sc.CLIP_STD, device=args.device).view(1, 3, 1, 1)
    n_ids = min(args.clip_identities, len(train_ids))

    def step_fn(step: int) -> dict:
        model.train()
        rng = random.Random(f"clip/{args.seed}/{step}")
        # two renders (different contexts) of each of n_ids identities; the first is never augmented
        picks, raw = [], []
        for i in rng.sample(range(len(train_ids)), n_ids):
            picks += rng.sample(pool.by_label[i], 2)
            raw += [True, rng.random() >= args.augment_p]
        raw = torch.tensor(raw)
        images, captions, labels = draw(pool, domain, train_ids, picks, rng, (~raw).tolist(), args.degrade_p)
        pixels = ((images.to(args.device) - mean) / std)
        img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        # the caption loss only on renders the caption describes (a masked background is no longer "on a beach")
        raw_idx = torch.nonzero(raw).flatten()
        cap = [captions[k] for k in raw_idx.tolist()]
        tok = tokenizer(cap, padding=True, truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt")
        txt = model.get_text_features(input_ids=tok["input_ids"].to(args.device),
                                      attention_mask=tok["attention_mask"].to(args.device)).pooler_output
        txt = F.normalize(txt, dim=-1)
        l_clip = multi_positive_clip_loss(img[raw_idx.to(args.device)], txt, cap, model.logit_scale)
        l_id = supcon_loss(img, labels.to(args.device), args.supcon_temperature)
        loss = l_clip + args.identity_weight * l_id
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item(), "clip": l_clip.item(), "supcon": l_id.item(),
                "scale": model.logit_scale.exp().item()}

    # the token ids are part of what the text side learns: a rebuilt tokenizer must not resume an old run
    _run_phase("clip", args, {"model": model}, opt, args.clip_steps, args.clip_lr, step_fn,
               _fingerprint(args, "clip", n_train=len(train_ids), tokenizer=sc.tokenizer_digest(tokenizer), **sizes))
    return model.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------


def export(args, identity_net, clip_model, tokenizer, command: str, validation: dict) -> list[Path]:
    """Write the shipped files (each folder/file replaced only once complete) and record them in the manifest."""
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    info = {"seed": str(args.seed), "command": command, "train_split": "train",
            "validation": json.dumps(validation, sort_keys=True)}
    id_path = sc.save_identity_net(identity_net, out / sc.IDENTITY_FILE, steps=str(args.identity_steps),
                                   loss=f"arcface(s={args.arcface_scale}, m={args.arcface_margin})", **info)
    tmp_dir = out / (sc.CLIP_DIR + ".tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    sc.save_clip(clip_model, tmp_dir, tokenizer=tokenizer, tokenizer_vocab_sha256=sc.tokenizer_digest(tokenizer),
                 steps=str(args.clip_steps),
                 loss=f"multi-positive CLIP + {args.identity_weight}*SupCon identity term", **info)
    final = out / sc.CLIP_DIR
    if final.exists():
        shutil.rmtree(final)
    tmp_dir.replace(final)
    paths = [id_path] + sorted(p for p in final.iterdir() if p.is_file())
    store.record(paths, weights_dir=out, reproduce=command)
    return paths


def toy_tokenizer():
    """The shipped toy tokenizer, or (before the base-model trainer has shipped it) the same one built from
    ``domain.VOCAB``: ``build_tokenizer`` is deterministic."""
    from . import tokenizer as toy_tok

    try:
        return toy_tok.load_tokenizer()
    except store.WeightsError:
        logger.info("toy tokenizer not shipped yet; building it from domain.VOCAB")
        return toy_tok.build_tokenizer()


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    # --resume changes how a run gets there, not what it makes: the recorded recipe leaves it out
    command = "python -m boothkit.toyworld.train_scorers " + shlex.join(a for a in argv if a != "--resume")
    from . import domain

    args.run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_ids = list(domain.identities("train"))
    logger.info("training toy scorers on %d train identities (%s)", len(train_ids), command)
    tokenizer = toy_tokenizer()
    pool = render_pool(domain, train_ids, args.renders_per_identity, args.seed)
    logger.info("render pool: %d renders in %.1f s", len(pool.labels), time.time() - t0)
    identity_net = train_identity(args, domain, train_ids, pool)
    t1 = time.time()
    clip_model = train_clip(args, domain, train_ids, pool, tokenizer)
    t2 = time.time()
    scorers = sc.Scorers(clip=clip_model, identity_net=identity_net, tokenizer=tokenizer,
                         device=torch.device(args.device))
    validation = sc.validate(scorers, max_identities=args.validate_identities)
    paths = export(args, identity_net, clip_model, tokenizer, command, validation)
    # timings stay out of the exported metadata so a rerun of the recipe gives byte-identical files
    validation["train_seconds"] = {"identity": round(t1 - t0, 1), "clip": round(t2 - t1, 1)}
    (args.run_dir / "validation.json").write_text(json.dumps(validation, indent=2) + "\n")
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    logger.info("%s", sc.format_validation(validation))
    logger.info("total %.1f s (identity %.1f s, clip %.1f s)", time.time() - t0, t1 - t0, t2 - t1)
    return validation


if __name__ == "__main__":
    main()
