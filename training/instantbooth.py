"""Training InstantBooth (InstantBooth paper, sec. 3.3): the concept-encoder head, the patch-encoder head and the
adapters, on top of a frozen Stable Diffusion model and a frozen CLIP vision backbone.

Recipe: the identifier is inserted before the class noun; the conditioning images are the (augmented, cropped,
masked) images themselves, since no paired data is needed; the full image is the denoising target; β = 1; the FC
heads learn at 1e-4 and the adapters at 1e-6; everything else is frozen.

Options beyond the paper (InstantBoothSettings, each named as ours there): other images of the identity as the
conditioning (``same_image = False``), ``hue_jitter``, ``init_from``, ``subject_weight`` / ``masked_loss``,
``adapters_on_uncond = False`` (a sampling setting written into the file), ``pixel_features`` (each patch's pixels
added to f_p), ``background_residual_weight`` (a penalty on the adapter term off the subject), ``color_jitter``;
``augment_order = "before_crop"`` keeps the first toy recipe's order."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backend.instantbooth import save_instantbooth
from ..backend.identifier import class_nouns_for, insert_identifier
from ..backend.instantbooth import InstantBooth, InstantBoothConfig
from ..backend.preprocess import TrainAugment, prepare_concept_images
from ..backend.regions import block_grid
from ..backend.identifier import find_identifier_rows
from ..hosts.diffusers.instantbooth import (InstantBoothHooks, adapter_layout, encode_prompt, sampling_hooks,
                                             tokenize_chunks)
from ..hosts.diffusers.loading import SDModel
from .data import LatentTargets
from .frozen import freeze_base

log = logging.getLogger(__name__)


@dataclass
class InstantBoothSettings:
    identifier: str = "sks"
    category: str = "person"  # picks the class-noun list (backend.identifier.CLASS_NOUNS) ...
    class_nouns: list[str] = field(default_factory=list)  # ... extended by these
    num_images: int = 1  # N conditioning images per concept
    same_image: bool = True  # paper: condition on the target image itself; False: other images of its identity
    class_noun_free_prob: float = 0.0  # share of prompts with the class noun removed ("a photo of sks")
    lr_heads: float = 1e-4
    lr_adapters: float = 1e-6
    beta: float = 1.0  # adapter weight while training
    alpha_inference: float = 0.4  # written into the file as the defaults for sampling
    beta_inference: float = 0.3
    start_percent_inference: float = 0.0  # ours: the adapters act from this share of sampling on (into the file)
    # ours: training timesteps uniform in [0, max_timestep · T) (1: the whole schedule, the paper); below 1 the
    # adapters learn only the noise levels they act at when sampling starts them late (start_percent_inference)
    max_timestep: float = 1.0
    crop_margin: float = 0.1
    background: float = 0.0
    augment: bool = True
    # "after_crop": the paper's order (sec. 3.2: crop to the mask box, mask, then augment the masked crop);
    # "before_crop": the order of files before this setting (augment the full image, then crop to the augmented mask's
    # box, which cancels the scale and translate jitter: only flip, rotation and colour survive)
    augment_order: str = "after_crop"
    hue_jitter: float = 0.05  # colour jitter's hue range (the old fixed value); 0 keeps identity-defining hues
    color_jitter: float = 0.2  # colour jitter's brightness, contrast and saturation range
    init_from: str = ""  # ours: start heads and adapters from this InstantBooth file (e.g. a shorter run's) instead of
    # the paper's fresh start (γ = 0)
    adapters_on_uncond: bool = True  # written into the file (InstantBoothConfig): False = adapters on the
    # conditional half of guidance only (ours; sampling only, training is unchanged)
    cache_latents: bool = True  # VAE latents of the targets, computed once (no augmentation touches them)
    cache_text: bool = True  # text-encoder outputs per caption, computed once (the text encoder is frozen)
    gradient_checkpointing: bool = False
    attention: str = "auto"  # auto | sdpa | eager | xformers (auto: eager on CPU, sdpa on GPU; training/frozen.py)
    masked_loss: bool = False  # loss on the subject's mask only
    subject_weight: float = 0.0  # > 0: pixels under the mask count (1 + subject_weight) times (0 = the paper)
    # ours: > 0 adds this weight times the adapter term's energy on the tokens with no subject pixel (relative to the
    # block's input), so the adapters change the subject and leave the scene to the prompt (0 = the paper)
    background_residual_weight: float = 0.0
    pixel_features: bool = False  # ours: f_p also carries each patch's pixels (InstantBoothConfig.pixel_features)
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of sks {noun}"])
    sample_steps: int = 25
    sample_guidance: float = 5.0
    validation_images: int = 4


class InstantBoothTraining:
    name = "instantbooth"

    def __init__(self, model: SDModel, vision, dataset, settings: InstantBoothSettings, validation=None,
                 device: torch.device | str = "cpu"):
        s = self.s = settings
        if s.num_images < 1:
            raise ValueError("num_images must be at least 1")
        self.model, self.vision, self.dataset, self.validation = model, vision, dataset, validation
        self.device = torch.device(device)
        vc = vision.config
        self.nouns = class_nouns_for(s.category, s.class_nouns)
        config = InstantBoothConfig(
            vision_global_dim=int(vc.projection_dim), vision_token_dim=int(vc.hidden_size),
            tokens_per_image=(int(vc.image_size) // int(vc.patch_size)) ** 2 + 1, ctx_dim=model.ctx_dim,
            layout=adapter_layout(model.unet), family=model.family, identifier=s.identifier,
            class_noun=s.class_nouns[0] if s.class_nouns else s.category, alpha=s.alpha_inference,
            beta=s.beta_inference, image_size=int(vc.image_size), crop_margin=s.crop_margin, background=s.background,
            adapters_on_uncond=s.adapters_on_uncond, pixel_features=s.pixel_features,
            start_percent=s.start_percent_inference)
        if not 0 < s.max_timestep <= 1:
            raise ValueError(f"max_timestep is a share of the noise schedule in (0, 1], got {s.max_timestep}")
        if s.augment_order not in ("after_crop", "before_crop"):
            raise ValueError(f"augment_order is {s.augment_order!r}; expected after_crop (the paper) or before_crop")
        self.ib = InstantBooth(config)
        if s.init_from:
            from ..backend.instantbooth import load_instantbooth

            start = load_instantbooth(s.init_from, family=model.family, ctx_dim=model.ctx_dim)
            if start.config.layout.to_dict() != config.layout.to_dict():
                raise ValueError(f"init_from {s.init_from}: its adapter layout does not match this base model's")
            missing, unexpected = self.ib.load_state_dict(start.state_dict(), strict=False)
            if unexpected or any(not k.startswith("pixel_encoder.") for k in missing):
                raise ValueError(f"init_from {s.init_from}: its tensors do not fit this run's (missing {missing}, "
                                 f"unexpected {unexpected})")
            log.info("heads and adapters start from %s%s", s.init_from,
                     " (pixel features from zero)" if missing else "")
        self.ib = self.ib.to(self.device)
        self.attention = freeze_base(model, vision, self.device, attention=s.attention,
                                     gradient_checkpointing=s.gradient_checkpointing, adapters=self.ib.adapters)
        self.module = self.ib
        self.hooks = InstantBoothHooks(model.unet, self.ib, None, beta=s.beta)
        self.augment = TrainAugment(jitter=s.color_jitter, hue=s.hue_jitter) if s.augment else None
        self._text_cache: dict[str, torch.Tensor] = {}
        self.targets = LatentTargets(model, dataset, self.device, s.cache_latents)
        self.prompts = [self._prompts(item.caption, item.path) for item in dataset.items]

    # ---- prompts -----------------------------------------------------------------------------------
    def _prompts(self, caption: str, path) -> tuple[str, str]:
        """(prompt with the identifier before the class noun, the same without the class noun)."""
        try:
            with_noun = insert_identifier(caption, self.s.identifier, self.nouns)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        words = with_noun.split()
        k = words.index(self.s.identifier) if self.s.identifier in words else -1
        without = " ".join(words[: k + 1] + words[k + 2:]) if 0 <= k < len(words) - 1 else with_noun
        return with_noun, without

    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen text-encoder output per prompt (cached) and the identifier-row mask [B, T]."""
        tok, te = self.model.tokenizer, self.model.text_encoder
        ident = tok(self.s.identifier, add_special_tokens=False).input_ids
        embs, masks = [], []
        for p in prompts:
            chunks = tokenize_chunks(tok, p)
            emb = self._text_cache.get(p)
            if emb is None:
                with torch.no_grad():
                    emb = te(torch.tensor(chunks, device=self.device))[0][0]
                if self.s.cache_text:
                    self._text_cache[p] = emb
            embs.append(emb)
            rows = find_identifier_rows(chunks, ident)
            if not rows:
                raise ValueError(f"prompt {p!r} lost its identifier to truncation at {tok.model_max_length} tokens")
            m = torch.zeros(len(chunks) * len(chunks[0]), dtype=torch.bool)
            m[rows] = True
            masks.append(m)
        return torch.stack(embs), torch.stack(masks).to(self.device)

    # ---- the method --------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        heads = [p for name, p in self.ib.named_parameters() if not name.startswith("adapters.")]
        return [{"params": heads, "lr": self.s.lr_heads}, {"params": list(self.ib.adapters.parameters()),
                                                            "lr": self.s.lr_adapters}]

    def concept_features(self, images: torch.Tensor, masks: torch.Tensor, b: int, n: int, augment=None):
        """[B*N] conditioning images -> (f_c [B, ctx], f_p [B, N*T, ctx]) through the frozen backbone and the heads;
        ``augment`` is applied to the masked crops (the paper's order)."""
        c = self.ib.config
        pixels = prepare_concept_images(images, masks, c.image_size, c.crop_margin, c.background, augment=augment)
        with torch.no_grad():
            out = self.vision(pixel_values=pixels.to(self.device, next(self.vision.parameters()).dtype))
        g = out.image_embeds.float().view(b, n, -1)
        t = out.last_hidden_state.float().view(b, n, *out.last_hidden_state.shape[1:])
        pixels = pixels.to(self.device).float().view(b, n, *pixels.shape[1:])
        return self.ib.concept_encoder(g), self.ib.patch_features(t, pixels)

    def loss(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        s, ds, b = self.s, self.dataset, len(indices)
        latents = self.targets(indices)
        use_free = torch.rand(b, generator=generator) < s.class_noun_free_prob
        prompts = [self.prompts[i][int(f)] for i, f in zip(indices, use_free)]
        text, rows = self._encode_text(prompts)

        cidx = [j for i in indices for j in ds.concept_indices(i, s.num_images, generator, s.same_image)]
        images, masks = ds.images[cidx], ds.masks[cidx]
        after = self.augment if s.augment_order == "after_crop" else None
        if self.augment is not None and after is None:
            images, masks = self.augment(images, masks)
        f_c, f_p = self.concept_features(images.to(self.device), masks.to(self.device), b, s.num_images, after)
        # the identifier's rows become f_c (α = 1 in training); every other row stays the frozen encoding
        cond = torch.where(rows[..., None], f_c[:, None, :].to(text.dtype), text)
        self.hooks.set_f_p(f_p)
        self.hooks.residuals = [] if s.background_residual_weight > 0 else None

        sched = self.model.scheduler
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        hi = max(1, round(s.max_timestep * sched.config.num_train_timesteps))
        t = torch.randint(0, hi, (b,), generator=generator).to(self.device)
        noisy = sched.add_noise(latents, noise, t)
        pred = self.model.unet(noisy, t, encoder_hidden_states=cond).sample
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        err = F.mse_loss(pred.float(), target.float(), reduction="none")
        weighted = s.masked_loss or s.subject_weight > 0
        masks = ds.masks[indices].to(self.device) if weighted or s.background_residual_weight > 0 else None
        if weighted:
            m = F.interpolate(masks, size=err.shape[-2:], mode="nearest")
            w = m if s.masked_loss else 1 + s.subject_weight * m
            loss = (err * w).sum() / (w.sum() * err.shape[1]).clamp(min=1)
        else:
            loss = err.mean()
        if s.background_residual_weight > 0:
            loss = loss + s.background_residual_weight * self.background_residual(masks, err.shape[-2:])
        return loss

    def background_residual(self, masks: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """Mean over the adapters of ‖term‖² on the tokens whose patch holds no subject pixel, over the mean ‖y‖² of
        the block ([B, 1, H, W] target masks, the latent's [h, w]; the hooks' residuals of this step, then dropped)."""
        terms, self.hooks.residuals = self.hooks.residuals, None
        out = []
        for r, y in terms:
            grid = block_grid(r.shape[1], *latent_size)
            bg = 1 - F.adaptive_max_pool2d(masks.float(), grid).flatten(1)  # [B, tokens]: no subject pixel at all
            out.append((r.float().pow(2).sum(-1) * bg).mean() / y.float().pow(2).sum(-1).mean().clamp(min=1e-8))
        return torch.stack(out).mean()

    # ---- outputs -----------------------------------------------------------------------------------
    def export(self, path: Path, weights: dict[str, torch.Tensor], config: dict) -> Path:
        ib = InstantBooth(self.ib.config)
        ib.config.extra = {"settings": asdict(self.s), "config": config}
        ib.load_state_dict(weights)
        return save_instantbooth(path, ib)

    @torch.no_grad()
    def sample(self, out_dir: Path, step: int) -> Path | None:
        """A grid: one row per validation concept (its image, then one sample per prompt), fixed seeds."""
        if self.validation is None or self.model.family == "sdxl":
            return None
        from ..backend.identifier import inject_concept
        from ..backend.imageio import save_png
        from ..hosts.diffusers.sampling import sample

        ds = self.validation
        self.hooks.remove()
        rows_out = []
        try:
            for i in range(min(self.s.validation_images, len(ds))):
                f_c, f_p = self.concept_features(ds.images[i:i + 1].to(self.device), ds.masks[i:i + 1].to(self.device),
                                                 1, 1)
                row = [ds.images[i].to(self.device)]
                for k, template in enumerate(self.s.sample_prompts):
                    prompt = template.format(noun=self.ib.config.class_noun)
                    text, rows = self._encode_text([prompt])
                    cond = inject_concept(text, torch.nonzero(rows[0]).flatten().tolist(), f_c[0],
                                          self.ib.config.alpha)
                    uncond = encode_prompt(self.model.text_encoder, self.model.tokenizer, "")
                    with sampling_hooks(self.model, self.ib, f_p[0], self.ib.config.beta):
                        img = sample(self.model, cond, uncond, seed=k, steps=self.s.sample_steps,
                                     guidance=self.s.sample_guidance)
                    row.append(F.interpolate(img, size=row[0].shape[-2:], mode="bilinear")[0] if img.shape[-1] !=
                               row[0].shape[-1] else img[0])
                rows_out.append(torch.cat(row, dim=-1))
        finally:
            self.hooks = InstantBoothHooks(self.model.unet, self.ib, None, beta=self.s.beta)
        if not rows_out:
            return None
        path = save_png(torch.cat(rows_out, dim=-2), Path(out_dir) / f"step-{step:07d}.png")
        log.info("samples: %s", path)
        return path

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Denoising loss on held-out images with fixed noise, so the number is comparable across steps."""
        if self.validation is None:
            return {}
        main_ds = self.dataset
        self.dataset = self.validation
        try:
            g = torch.Generator().manual_seed(1234)
            idx = list(range(min(len(self.validation), 16)))
            prompts = self.prompts
            self.prompts = [self._prompts(it.caption, it.path) for it in self.validation.items]
            targets, self.targets = self.targets, LatentTargets(self.model, self.validation, self.device, cache=False)
            augment, self.augment = self.augment, None
            loss = self.loss(idx, g).item()
        finally:
            self.dataset, self.prompts, self.targets, self.augment = main_ds, prompts, targets, augment
        return {"denoising_loss": loss}
