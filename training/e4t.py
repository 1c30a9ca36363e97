"""Pre-training E4T (the E4T paper) on a domain: many images of one class (or a few, each image naming its class word),
prompts with the identifier before the class noun, the denoising loss plus the regularisers. The domain encoder and
the weight offsets are trained; the denoiser, the text encoder and the CLIP backbone stay frozen. The objective is
backend/e4t.py's — the same one a tune at use time runs for 5-15 steps."""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path

import torch

from ..backend import e4t as e4t_backend
from ..backend.e4t import E4T, E4TConfig
from ..backend.e4t import save_e4t
from ..backend.identifier import class_nouns_for, insert_identifier
from ..hosts.diffusers.e4t import E4THost, class_tokens, class_vectors, new_config
from ..hosts.diffusers.common import text_slots
from .data import LatentTargets
from .frozen import freeze_base

log = logging.getLogger(__name__)


@dataclass
class _TrainerSettings:
    """What only pre-training reads; the rest of ``[method]`` is E4TConfig's own fields (below)."""
    category: str = "person"  # picks the class-noun list (backend.identifier.CLASS_NOUNS) ...
    class_nouns: list[str] = field(default_factory=list)  # ... extended by these; the first is the file's default
    lr: float = 1.6e-5  # encoder and offsets (the public re-implementation's pre-training rate)
    cache_latents: bool = True
    cache_vision: bool = True  # class tokens of each image, computed once (the backbone is frozen, no augmentation)
    gradient_checkpointing: bool = False
    attention: str = "auto"  # auto | sdpa | eager | xformers (auto: eager on CPU, sdpa on GPU; training/frozen.py)
    masked_loss: bool = False
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of sks {noun}"])
    sample_steps: int = 25
    sample_guidance: float = 5.0
    validation_images: int = 4


# E4TConfig's fields that the model fixes (dimensions, targets) or the trainer derives (class_word, extra); every
# other field of it (identifier, scale, rank, the regularisers, the tune's defaults written into the file ...) is a
# [method] key with E4TConfig's own default, so the two can never disagree
_FROM_MODEL = {"family", "word_dims", "vision_dim", "vision_layers", "unet_dims", "targets", "target_shapes",
               "class_word", "extra"}
CONFIG_FIELDS = [f.name for f in fields(E4TConfig) if f.name not in _FROM_MODEL]
E4TSettings = make_dataclass(
    "E4TSettings",
    [(f.name, f.type, field(default=f.default, default_factory=f.default_factory))
     for f in fields(E4TConfig) if f.name in CONFIG_FIELDS],
    bases=(_TrainerSettings,))
E4TSettings.__doc__ = "E4T pre-training's [method] settings: E4TConfig's free fields + the trainer's own."


class E4TTraining:
    name = "e4t"

    def __init__(self, model, vision, dataset, settings: E4TSettings, validation=None, device="cpu"):
        s = self.s = settings
        if s.reg_background and not s.masked_loss:
            raise ValueError("reg_background holds the background off the subject's mask: it needs masked_loss = true")
        self.model, self.vision, self.dataset, self.validation = model, vision, dataset, validation
        self.device = torch.device(device)
        self.attention = freeze_base(model, vision, self.device, attention=s.attention,
                                     gradient_checkpointing=s.gradient_checkpointing)
        self.nouns = class_nouns_for(s.category, s.class_nouns)
        own = {name: getattr(s, name) for name in CONFIG_FIELDS if name != "identifier"}
        self.e4t = E4T(new_config(model, vision, self.nouns[0], s.identifier, **own)).to(self.device)
        self.module = self.e4t
        self.train_set = self._split(dataset, s.cache_latents)
        self.val_set = self._split(validation, False) if validation is not None else None
        self._class_vectors: dict[str, list[torch.Tensor]] = {}
        self._base_loss: float | None = None  # validation's base-model loss (fixed draws, frozen base)
        # attached for the whole run: the backward pass (and gradient checkpointing's recomputation) needs them
        self.attached = self.e4t.offsets.attach(self.train_set["host"].modules)

    def _split(self, dataset, cache: bool) -> dict:
        """Per dataset: prompts with the identifier, the class word of each, its host and its targets."""
        prompts, words = [], []
        for item in dataset.items:
            try:
                p = insert_identifier(item.caption, self.s.identifier, self.nouns)
            except ValueError as e:
                raise ValueError(f"{item.path}: {e}") from None
            w = p.split()
            prompts.append(p)
            words.append(w[w.index(self.s.identifier) + 1])
        return {"dataset": dataset, "prompts": prompts, "words": words, "host": E4THost(self.model, self.e4t, prompts),
                "targets": LatentTargets(self.model, dataset, self.device, cache), "tokens": {}}

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.e4t.parameters()), "lr": self.s.lr}]

    def _vectors(self, word: str) -> list[torch.Tensor]:
        if word not in self._class_vectors:
            self._class_vectors[word] = [v.to(self.device) for v in class_vectors(self.model, word)]
        return self._class_vectors[word]

    def _tokens(self, split: dict, indices: list[int]) -> torch.Tensor:
        ds, cache = split["dataset"], split["tokens"]
        todo = [i for i in indices if i not in cache]
        if todo:
            t = class_tokens(self.vision, ds.images[todo].to(self.device), ds.masks[todo].to(self.device),
                             self.e4t.config.vision_layers)
            if not self.s.cache_vision:
                return torch.stack([t[todo.index(i)] for i in indices])
            cache.update(zip(todo, t))
        return torch.stack([cache[i] for i in indices])

    def batch(self, split: dict, indices: list[int]) -> e4t_backend.Batch:
        vecs = [self._vectors(split["words"][i]) for i in indices]
        class_vecs = [torch.stack([v[k] for v in vecs]) for k in range(len(text_slots(self.model)))]
        x0 = split["targets"](indices)
        masks = None
        if self.s.masked_loss:
            masks = torch.nn.functional.interpolate(split["dataset"].masks[indices].to(self.device),
                                                    size=x0.shape[-2:], mode="area")
        return e4t_backend.Batch(x0, self._tokens(split, indices), class_vecs, torch.tensor(indices), masks)

    def loss(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        return self.train_set["host"].loss(self.batch(self.train_set, indices), generator)

    def export(self, path: Path, weights: dict[str, torch.Tensor], config: dict) -> Path:
        e4t = E4T(copy.deepcopy(self.e4t.config))
        e4t.config.extra = {"settings": asdict(self.s), "config": config}
        e4t.load_state_dict(weights)
        return save_e4t(path, e4t)

    @contextmanager
    def _offsets_detached(self):
        """The training offsets detached while inside (the base model, or a tuned copy's own offsets), attached again
        after."""
        for h in self.attached:
            h.remove()
        try:
            yield
        finally:
            self.attached = self.e4t.offsets.attach(self.train_set["host"].modules)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Denoising loss on held-out images with fixed noise (no regularisers), comparable across steps, and the base
        model's on the same draws (the class word, no offsets): pre-training has learnt something only where the
        first is below the second. The base's value never changes, so it is computed once. ``identifier_shift``:
        |scale · prediction| / |class word| on the same draws; near 0, the encoder has no say in the identifier."""
        if self.val_set is None:
            return {}
        host = self.val_set["host"]
        batch = self.batch(self.val_set, list(range(min(len(self.val_set["dataset"]), 16))))

        def loss(e4t, stats=None):
            return e4t_backend.objective(e4t, batch, host.features, host.encode, host.predict, host.schedule,
                                         host.modules, torch.Generator().manual_seed(1234), regularise=False,
                                         stats=stats).item()

        stats = {}
        out = {"denoising_loss": loss(self.e4t, stats), **stats}
        if self._base_loss is None:
            with self._offsets_detached():  # a fresh E4T predicts 0 and has Δ = 0: the base model with the class word
                self._base_loss = loss(E4T(self.e4t.config).to(self.device))
        out["denoising_loss_base"] = self._base_loss
        return out

    @torch.no_grad()
    def sample(self, out_dir: Path, step: int) -> Path | None:
        """A grid: one row per validation image (the image, then one sample per prompt from the encoder's prediction
        alone, no tuning), fixed seeds."""
        if self.val_set is None or self.model.family == "sdxl":
            return None
        from ..backend.imageio import save_png
        from ..hosts.diffusers.common import encode_prompt

        ds, rows = self.val_set["dataset"], []
        uncond = encode_prompt(self.model, "")
        # the last step's photo scales (kept for its backward pass); each tune has its own
        self.e4t.offsets.scales = None
        with self._offsets_detached():  # each sample applies its own tuned copy's offsets
            rows = self._sample_rows(ds, uncond)
        if not rows:
            return None
        path = save_png(torch.cat(rows, dim=-2), Path(out_dir) / f"step-{step:07d}.png")
        log.info("samples: %s", path)
        return path

    def _sample_rows(self, ds, uncond) -> list[torch.Tensor]:
        import torch.nn.functional as F

        from ..hosts.diffusers.e4t import e4t_tune
        from ..hosts.diffusers.common import encode_prompt
        from ..hosts.diffusers.sampling import sample

        rows = []
        for i in range(min(self.s.validation_images, len(ds))):
            word = self.val_set["words"][i]
            concept = e4t_tune(self.model, self.vision, self.e4t, ds.images[i], ds.masks[i], word, steps=0)
            row = [ds.images[i].to(self.device)]
            for k, template in enumerate(self.s.sample_prompts):
                cond = encode_prompt(self.model, template.format(noun=word), concept.embedding)
                with concept.applied(self.model):
                    img = sample(self.model, cond, uncond, seed=k, steps=self.s.sample_steps,
                                 guidance=self.s.sample_guidance)
                row.append(img[0] if img.shape[-1] == row[0].shape[-1] else
                           F.interpolate(img, size=row[0].shape[-2:], mode="bilinear")[0])
            rows.append(torch.cat(row, dim=-1))
        return rows
