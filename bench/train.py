"""`boothkit bench train`: InstantBooth training throughput on the toy world (its architecture and data; the weights
do not change the speed, so the bench builds them randomly and needs no trained files).

Compared in one run, interleaved:
  plain loop   written the obvious way: a torch Dataset that augments, crops and normalises one image at a time,
               the tokenizer and text encoder and the target encoding on every step, fp32, PyTorch's fused
               attention kernel (SDPA, diffusers' default)
  trainer      BoothKit's trainer (training/trainer.py + training/instantbooth.py) with its defaults: batched
               augmentation, cached text encodings (and latents where there is a VAE), bf16 autocast, the attention
               kernel picked for the device (attention = "auto": explicit softmax(QKᵀ)V on CPU; training/frozen.py)
  no caching   the trainer with caching switched off, to isolate what caching brings
  sdpa         the trainer with the fused attention kernel, to isolate what the kernel choice brings
  fp32         the trainer in fp32, to isolate what bf16 brings
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def parse_args(argv):
    p = argparse.ArgumentParser(prog="boothkit bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and variant")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def build(tmp):
    """The toy world's base architecture, toy CLIP vision backbone and a 256-image dataset folder."""
    from transformers import CLIPVisionModelWithProjection

    from ..hosts.diffusers.loading import SDModel
    from ..toyworld import domain
    from ..toyworld.base import build_base
    from ..toyworld.scorers import clip_config
    from ..toyworld.tokenizer import load_tokenizer
    from ..training.data import FolderDataset

    torch.manual_seed(0)
    tok = load_tokenizer()
    b = build_base(tok)
    model = SDModel(b.unet, b.text_encoder, b.tokenizer, b.scheduler, None, "toy", domain.RESOLUTION)
    vision = CLIPVisionModelWithProjection(clip_config(tok).vision_config).eval()
    domain.export_folder("train", 256, tmp, seed=0)
    return model, vision, FolderDataset(tmp, domain.RESOLUTION)


class PlainDataset(torch.utils.data.Dataset):
    """The per-item way: each __getitem__ augments, crops and normalises one image."""

    def __init__(self, ds, method):
        self.ds, self.method = ds, method

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        from ..backend.preprocess import prepare_concept_images

        c = self.method.ib.config
        j = self.ds.concept_indices(i, 1, torch.Generator().manual_seed(i), self.method.s.same_image)[0]
        img, m = self.method.augment(self.ds.images[j:j + 1], self.ds.masks[j:j + 1])
        pixels = prepare_concept_images(img, m, c.image_size, c.crop_margin, c.background)[0]
        return self.ds.images[i], pixels, self.method.prompts[i][0]


def plain_step(method, batch, optimizer):
    """One step written the obvious way, fp32, nothing cached."""
    from ..backend.identifier import find_identifier_rows

    model, ib = method.model, method.ib
    images, pixels, prompts = batch
    ids = model.tokenizer(list(prompts), padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    text = model.text_encoder(ids)[0]
    ident = model.tokenizer(method.s.identifier, add_special_tokens=False).input_ids
    rows = torch.zeros(ids.shape, dtype=torch.bool)
    for k, row in enumerate(ids.tolist()):
        rows[k, find_identifier_rows([row], ident)] = True
    out = method.vision(pixel_values=pixels)
    f_c = ib.concept_encoder(out.image_embeds[:, None])
    f_p = ib.patch_encoder(out.last_hidden_state[:, None])
    cond = torch.where(rows[..., None], f_c[:, None], text)
    method.hooks.set_f_p(f_p)
    latents = images * 2 - 1
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (len(images),))
    pred = model.unet(model.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
    loss = F.mse_loss(pred, noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv=None) -> int:
    args = parse_args(argv or [])
    from ..training.frozen import use_attention
    from ..training.instantbooth import InstantBoothSettings, InstantBoothTraining
    from ..training.trainer import Trainer, TrainSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="boothkit-bench-train-")
    model, vision, ds = build(tmp)
    method_kw = dict(category="cat", class_nouns=["kitten", "robot", "droid"], same_image=False)

    def trainer(cache: bool, precision: str, attention: str = "auto"):
        m = InstantBoothTraining(model, vision, ds, InstantBoothSettings(cache_text=cache, cache_latents=cache,
                                                                         attention=attention, **method_kw))
        t = Trainer(m, ds, TrainSettings(output_dir=tmp + "/run", batch_size=args.batch_size, steps=10**9,
                                         mixed_precision=precision), {})
        t.optimizer_step()  # warm-up (and fills the caches, as the first epoch does)
        m.hooks.remove()
        return t, m

    t_fast, m_fast = trainer(True, "bf16")
    t_nocache, m_nocache = trainer(False, "bf16")
    t_sdpa, m_sdpa = trainer(True, "bf16", "sdpa")
    t_cache32, m_cache32 = trainer(True, "no")
    m_plain = InstantBoothTraining(model, vision, ds, InstantBoothSettings(attention="sdpa", **method_kw))
    m_plain.hooks.remove()
    opt = torch.optim.AdamW(m_plain.ib.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(PlainDataset(ds, m_plain), batch_size=args.batch_size, shuffle=True)
    batches = iter(loader)

    def plain():
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        plain_step(m_plain, batch, opt)

    kernel = [None]  # the UNet's current attention kind: switched only when a variant needs another

    def active(method, step):
        """Each variant has its own adapters on the shared UNet: only the running one is attached, with its kernel."""
        def run():
            if kernel[0] != method.attention:
                use_attention(model.unet, method.attention)
                kernel[0] = method.attention
            method.hooks.attach()
            try:
                step()
            finally:
                method.hooks.remove()
        return run

    variants = {
        "plain loop (fp32, per-item, no caching)": active(m_plain, plain),
        "trainer (bf16, cached)": active(m_fast, t_fast.optimizer_step),
        "trainer, no caching (bf16)": active(m_nocache, t_nocache.optimizer_step),
        "trainer, fused sdpa attention (bf16)": active(m_sdpa, t_sdpa.optimizer_step),
        "trainer, fp32": active(m_cache32, t_cache32.optimizer_step),
    }
    times = {k: [] for k in variants}
    names = list(variants)
    variants[names[0]]()  # warm-up of the plain loop
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                variants[name]()
            times[name].append((time.perf_counter() - t0) / args.steps)
    rate = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    base = rate[names[0]]
    print(f"InstantBooth training on the toy world: batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':<44} {'samples/s':>10} {'vs plain':>9}")
    for k in names:
        print(f"{k:<44} {rate[k]:10.2f} {rate[k] / base:9.2f}")
    result = {"speedup": round(rate[names[1]] / base, 3),
              "speedup_from_caching": round(rate[names[1]] / rate[names[2]], 3),
              "speedup_from_attention": round(rate[names[1]] / rate[names[3]], 3),
              "speedup_fp32": round(rate[names[4]] / base, 3),
              "samples_per_s_plain": round(base, 3), "samples_per_s_trainer": round(rate[names[1]], 3)}
    print(json.dumps(result))
    return 0
