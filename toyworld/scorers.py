"""The toy world's frozen backbones and evaluation scorers.

Two small networks stand in for the pretrained models the papers lean on:

* a toy **CLIP** (transformers ``CLIPModel``, ViT with 4×4 patches on 32×32 images → 65 tokens): the frozen vision
  backbone InstantBooth's concept and patch encoders read (``last_hidden_state`` and ``image_embeds``), and the
  CLIP-I / CLIP-T metrics;
* an **identity network** (small CNN → 64-d unit embedding trained with ArcFace): the analogue of the face-recognition
  network InstantBooth uses for its perceptual face distance.

Both are trained on the TRAIN identities only (``toyworld/train_scorers.py``); held-out identities measure how
well they generalise (:func:`validate`). Every shipped file is sha256-checked through :mod:`.store` before loading.
transformers is imported inside functions so that importing this module stays light.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import store

logger = logging.getLogger(__name__)

CLIP_FORMAT = "boothkit.toyworld.clip"
IDENTITY_FORMAT = "boothkit.toyworld.identity"
VERSION = "1"
CLIP_DIR = "clip"
IDENTITY_FILE = "identity.safetensors"

# The standard OpenAI CLIP normalisation, so the backend's CLIP preprocessing applies to the toy backbone unchanged.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ScorerFileError(ValueError):
    """A toy scorer file has missing or wrong metadata."""

    __module__ = "boothkit"  # its name in ComfyUI's error dialog, whatever folder the pack is cloned into


# ----------------------------------------------------------------------------------------------------------------
# identity network (the face-recognition analogue)


class IdentityNet(nn.Module):
    """Small CNN: images [B,3,R,R] in [0,1] → L2-normalised identity embeddings [B, embed_dim].

    GroupNorm (not BatchNorm) so an embedding never depends on what else is in the batch."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), embed_dim: int = 64, resolution: int = 32):
        super().__init__()
        self.config = {"channels": list(channels), "embed_dim": int(embed_dim), "resolution": int(resolution)}
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            if i < len(channels) - 1:
                layers.append(nn.AvgPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        # mean and max pooling: identity cues may sit anywhere in the frame (the subject moves between renders)
        self.head = nn.Sequential(nn.Linear(2 * c_in, 256), nn.SiLU(), nn.Linear(256, embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        r = self.config["resolution"]
        if images.shape[-2:] != (r, r):
            images = F.interpolate(images, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        h = self.features(images * 2.0 - 1.0)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return F.normalize(self.head(h), dim=-1)


def save_identity_net(net: IdentityNet, path: str | Path, **info: Any) -> Path:
    """Write ``net`` as safetensors with its architecture and training info in the metadata (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": IDENTITY_FORMAT, "version": VERSION,
            "what": "toy-world identity network (face-recognition analogue): images [B,3,R,R] in [0,1] -> "
                    "L2-normalised embedding",
            "architecture": json.dumps(net.config)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def _check_meta(path: Path, meta: dict | None, expected_format: str) -> dict:
    meta = meta or {}
    if meta.get("format") != expected_format:
        raise ScorerFileError(f"{path}: metadata field 'format' is {meta.get('format')!r}, expected "
                              f"{expected_format!r}.")
    if meta.get("version") != VERSION:
        raise ScorerFileError(f"{path}: metadata field 'version' is {meta.get('version')!r}, expected {VERSION!r}.")
    return meta


def load_identity_net(path: str | Path, device: str | torch.device = "cpu") -> IdentityNet:
    """Load an identity network written by :func:`save_identity_net` (no hash check; see :func:`load_scorers`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: identity network file not found.")
    with safe_open(str(path), framework="pt") as f:
        meta = _check_meta(path, f.metadata(), IDENTITY_FORMAT)
    if "architecture" not in meta:
        raise ScorerFileError(f"{path}: metadata field 'architecture' is missing, expected the IdentityNet config.")
    arch = json.loads(meta["architecture"])
    net = IdentityNet(channels=tuple(arch["channels"]), embed_dim=arch["embed_dim"], resolution=arch["resolution"])
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# toy CLIP


def clip_config(tokenizer, *, vision_hidden: int = 128, vision_layers: int = 4, vision_heads: int = 4,
                text_hidden: int = 64, text_layers: int = 2, text_heads: int = 4, projection_dim: int = 64,
                image_size: int = 32, patch_size: int = 4):
    """A tiny ``CLIPConfig`` whose text side fits the toy tokenizer (its vocabulary and special tokens)."""
    from transformers import CLIPConfig

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    text = dict(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=text_heads,
                max_position_embeddings=tokenizer.model_max_length, projection_dim=projection_dim, **special)
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden,
                  intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_heads, projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim, **special)


def tokenizer_digest(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary (token → id): tells whether two tokenizers give the same ids."""
    import hashlib

    return hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()


def preprocessor_config(image_size: int) -> dict:
    """The ``preprocessor_config.json`` of the toy CLIP: a standard CLIPImageProcessor at the toy resolution."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "do_convert_rgb": True}


def save_clip(model, folder: str | Path, tokenizer=None, **info: Any) -> list[Path]:
    """Save a toy ``CLIPModel`` as a folder ``CLIPModel.from_pretrained`` loads, with boothkit metadata in
    ``model.safetensors``, the CLIP normalisation in ``preprocessor_config.json`` and, when given, the tokenizer it
    was trained with (like a real CLIP folder). Returns the written files."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    weights = folder / "model.safetensors"
    meta = {"format": CLIP_FORMAT, "version": VERSION,
            "what": "toy-world CLIP (frozen vision backbone for InstantBooth encoders; CLIP-I/CLIP-T metrics)",
            "image_mean": json.dumps(list(CLIP_MEAN)), "image_std": json.dumps(list(CLIP_STD)),
            "image_size": str(model.config.vision_config.image_size)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    tmp = weights.with_name("model.safetensors.tmp")
    save_file(load_file(str(weights)), str(tmp), metadata=meta)
    tmp.replace(weights)
    pre = folder / "preprocessor_config.json"
    pre.write_text(json.dumps(preprocessor_config(model.config.vision_config.image_size), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return sorted(p for p in folder.iterdir() if p.is_file())


def _load_clip_parts(folder: Path, vision_only: bool, device):
    """Build the model from ``config.json`` and load the weights strictly after checking the metadata.

    Done by hand rather than with ``from_pretrained`` so the metadata check is ours and the vision-only load does not
    report the text weights as unexpected."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    weights = folder / "model.safetensors"
    for p in (folder / "config.json", weights):
        if not p.exists():
            raise FileNotFoundError(f"{p}: toy CLIP file not found.")
    with safe_open(str(weights), framework="pt") as f:
        _check_meta(weights, f.metadata(), CLIP_FORMAT)
    config = CLIPConfig.from_pretrained(folder)
    state = load_file(str(weights))
    if vision_only:
        model = CLIPVisionModelWithProjection(config.vision_config)
        state = {k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))}
    else:
        model = CLIPModel(config)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def load_clip_vision(device: str | torch.device = "cpu", weights_dir: str | Path = store.WEIGHTS_DIR):
    """The shipped toy CLIP vision backbone: ``(CLIPVisionModelWithProjection, folder)``, sha256-verified.

    The folder also loads with ``CLIPVisionModelWithProjection.from_pretrained(folder)``; inputs are 32×32 images
    normalised with :data:`CLIP_MEAN`/:data:`CLIP_STD` (also in the folder's ``preprocessor_config.json``)."""
    folder = store.verified_dir(CLIP_DIR, weights_dir)
    return _load_clip_parts(folder, True, device), folder


# ----------------------------------------------------------------------------------------------------------------
# scorers


def _check_images(images: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected an image tensor [B, 3, H, W], got {shape}.")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: got an empty batch.")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name}: expected values in [0, 1], got [{lo:.3f}, {hi:.3f}].")
    return images.float().clamp(0, 1)


@dataclass
class Scorers:
    """Evaluation metrics on the toy world: identity similarity (face-distance analogue), CLIP-I, CLIP-T and its
    context margin."""

    clip: Any  # transformers CLIPModel
    identity_net: IdentityNet
    tokenizer: Any
    device: torch.device
    clip_folder: Path | None = None

    def _clip_pixels(self, images: torch.Tensor) -> torch.Tensor:
        size = self.clip.config.vision_config.image_size
        x = images.to(self.device)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Unit CLIP image embeddings [B, projection_dim] of images [B,3,H,W] in [0,1]."""
        x = self._clip_pixels(_check_images(images, "images"))
        return F.normalize(self.clip.get_image_features(pixel_values=x).pooler_output, dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """Unit CLIP text embeddings [T, projection_dim]."""
        if isinstance(texts, str) or not texts:
            raise ValueError(f"texts: expected a non-empty list of strings, got {texts!r}.")
        tok = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        out = self.clip.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                          attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(out.pooler_output, dim=-1)

    @torch.no_grad()
    def identity_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Unit identity embeddings [B, 64] of images [B,3,H,W] in [0,1]."""
        return self.identity_net(_check_images(images, "images").to(self.device))

    def identity_similarity(self, generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Cosine between each generated image's identity embedding and the mean reference embedding → [B]."""
        ref = F.normalize(self.identity_embeds(_check_images(references, "references")).mean(0), dim=-1)
        return (self.identity_embeds(_check_images(generated, "generated")) @ ref).cpu()

    def clip_i(self, generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """CLIP-I as in DreamBooth: mean cosine between each generated image and every reference → [B]."""
        ref = self.image_embeds(_check_images(references, "references"))
        return (self.image_embeds(_check_images(generated, "generated")) @ ref.T).mean(1).cpu()

    def clip_t(self, generated: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CLIP-T: cosine between each generated image and its prompt (one text per image, or one for all) → [B]."""
        img = self.image_embeds(_check_images(generated, "generated"))
        if isinstance(texts, str):
            raise ValueError("texts: expected a list of strings, got a single string; wrap it in a list.")
        if len(texts) not in (1, img.shape[0]):
            raise ValueError(f"texts: expected 1 or {img.shape[0]} texts (one per image), got {len(texts)}.")
        txt = self.text_embeds(texts)
        return (img * txt).sum(-1).cpu()

    def context_margin(self, generated: torch.Tensor, texts: list[str], alternatives: list[list[str]]) -> torch.Tensor:
        """Alignment on the context words alone: each image's cosine with its prompt minus its mean cosine with
        ``alternatives[i]``, the same prompt with one context word changed (same class noun), → [B]. The class noun
        is in every text, so a clearer subject of the right class moves both terms alike and cancels out."""
        img = self.image_embeds(_check_images(generated, "generated"))
        if len(texts) != img.shape[0] or len(alternatives) != img.shape[0] or not all(alternatives):
            raise ValueError(f"context_margin: expected {img.shape[0]} texts and {img.shape[0]} non-empty lists of "
                             f"alternatives (one per image), got {len(texts)} and {len(alternatives)}.")
        true = (img * self.text_embeds(texts)).sum(-1)
        alt = torch.stack([self.text_embeds(a).mean(0) for a in alternatives])
        return (true - (img * alt).sum(-1)).cpu()


def load_scorers(device: str | torch.device = "cpu", weights_dir: str | Path = store.WEIGHTS_DIR) -> Scorers:
    """The shipped toy scorers, every file sha256-verified against the manifest first.

    The text side uses the tokenizer saved beside the CLIP weights (the one it was trained with)."""
    from transformers import CLIPTokenizer

    device = torch.device(device)
    folder = store.verified_dir(CLIP_DIR, weights_dir)
    clip = _load_clip_parts(folder, False, device)
    if not (folder / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{folder / 'tokenizer_config.json'}: the toy CLIP folder has no tokenizer; "
                                f"re-export it with toyworld/train_scorers.py.")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    if len(tokenizer) != clip.config.text_config.vocab_size:
        raise ScorerFileError(f"{folder}: tokenizer has {len(tokenizer)} tokens, expected the text model's "
                              f"vocab_size {clip.config.text_config.vocab_size}.")
    identity_net = load_identity_net(store.verified(IDENTITY_FILE, weights_dir), device)
    return Scorers(clip=clip, identity_net=identity_net, tokenizer=tokenizer, device=device, clip_folder=folder)


# ----------------------------------------------------------------------------------------------------------------
# validation on held-out identities


def roc_auc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """Area under the ROC curve = P(positive score > negative score), ties counting one half (Mann-Whitney)."""
    pos, neg = positives.flatten().double(), negatives.flatten().double()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("roc_auc: needs at least one positive and one negative score.")
    scores = torch.cat([pos, neg])
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    # average ranks over ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=scores.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=scores.dtype).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gaussian_blur(images: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [B,C,H,W] (``sigma`` a float or one value per image; 0 leaves an image as is)."""
    b = images.shape[0]
    sig = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).flatten().expand(b).clamp(min=1e-3)
    x = torch.arange(-3, 4, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x[None] / sig[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # [B,7]
    c, h, w = images.shape[1:]
    pad = F.pad(images, (3, 3, 3, 3), mode="replicate")
    # one kernel per image: fold the batch into channels and use a grouped convolution
    kx = k.repeat_interleave(c, 0)[:, None, None, :]
    ky = k.repeat_interleave(c, 0)[:, None, :, None]
    out = F.conv2d(pad.reshape(1, b * c, h + 6, w + 6), kx, groups=b * c)
    out = F.conv2d(out, ky, groups=b * c)
    return out.reshape(b, c, h, w)


def _pairs(n: int, cross: bool) -> torch.Tensor:
    """Index pairs (i, j): i<j within one set, or i≠j between two aligned sets (``cross``)."""
    if not cross:
        return torch.triu_indices(n, n, offset=1)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = i != j
    return torch.stack([i[keep], j[keep]])


def _verification(emb: torch.Tensor, ids: torch.Tensor, classes: list[str], other: torch.Tensor | None = None) -> dict:
    """Same- vs different-identity cosines over all pairs of distinct renders (``other``: the second image of each
    pair comes from these embeddings of the same renders, e.g. blurred ones)."""
    iu = _pairs(len(ids), other is not None)
    s = (emb[iu[0]] * (emb if other is None else other)[iu[1]]).sum(-1)
    same = ids[iu[0]] == ids[iu[1]]
    same_class = torch.tensor([classes[a] == classes[b] for a, b in zip(iu[0].tolist(), iu[1].tolist())])
    hard = ~same & same_class
    return {"same_mean": float(s[same].mean()), "diff_mean": float(s[~same].mean()),
            "auc": roc_auc(s[same], s[~same]),
            "diff_same_class_mean": float(s[hard].mean()) if hard.any() else float("nan"),
            "auc_same_class": roc_auc(s[same], s[hard]) if hard.any() else float("nan")}


def _by_attributes(emb: torch.Tensor, idents: list, per: int) -> dict:
    """Mean cosine between renders of two same-class identities, by how many identity attributes differ: a graded
    metric should fall as more attributes differ."""
    mean = F.normalize(emb.reshape(len(idents), per, -1).mean(1), dim=-1)
    sums: dict[int, list[float]] = {}
    for a in range(len(idents)):
        for b in range(a + 1, len(idents)):
            ia, ib = idents[a].attributes, idents[b].attributes
            if ia[0] != ib[0]:
                continue
            n = sum(x != y for x, y in zip(ia[1:], ib[1:]))
            sums.setdefault(n, []).append(float(mean[a] @ mean[b]))
    return {str(n): round(sum(v) / len(v), 4) for n, v in sorted(sums.items())}


def validate(scorers: Scorers, *, split: str = "heldout", renders_per_identity: int = 4, max_identities: int = 64,
             n_alternatives: int = 7, blur_sigma: float = 1.0, seed: int = 1234) -> dict:
    """Measure the scorers on ``split`` identities (held out from training by default).

    Identity network and CLIP-I: cosine of same-identity vs different-identity render pairs (means and verification
    ROC-AUC; also against different identities of the same class only; ``auc_blurred``: one image of each pair
    blurred, as generated images are soft), and the mean cosine by number of differing identity attributes.
    CLIP-T: how often the true context prompt beats ``n_alternatives`` prompts of other random contexts for the same
    class (chance = 1/(n_alternatives+1)), and beats every prompt that changes exactly one context field."""
    import random

    from . import domain

    rng = random.Random(seed)
    idents = list(domain.identities(split))[:max_identities]
    if len(idents) < 2:
        raise ValueError(f"validate: split {split!r} has {len(idents)} identities, need at least 2.")
    images, ids, classes, contexts = [], [], [], []
    for ident in idents:
        for _ in range(renders_per_identity):
            ctx = domain.random_context(rng)
            images.append(domain.render(ident, ctx, rng.randrange(2**31)).image)
            ids.append(ident.id)
            classes.append(ident.class_name)
            contexts.append(ctx)
    images_t = torch.stack(images).float()
    blurred = gaussian_blur(images_t, blur_sigma).clamp(0, 1)
    ids_t = torch.tensor(ids)
    results = {"split": split, "identities": len(idents), "renders": len(images), "blur_sigma": blur_sigma}

    def chunks(f, x):
        return torch.cat([f(x[i:i + 256]) for i in range(0, len(x), 256)]).cpu()

    for name, embed in (("identity", scorers.identity_embeds), ("clip_i", scorers.image_embeds)):
        emb = chunks(embed, images_t)
        r = _verification(emb, ids_t, classes)
        r["auc_blurred"] = _verification(emb, ids_t, classes, other=chunks(embed, blurred))["auc"]
        if hasattr(idents[0], "attributes"):
            r["cos_by_attributes_differing"] = _by_attributes(emb, idents, renders_per_identity)
        results[name] = r
    img_emb = chunks(scorers.image_embeds, images_t)

    correct, chance, correct_one, chance_one = 0, 0.0, 0, 0.0
    for k, (cls, ctx) in enumerate(zip(classes, contexts)):
        prompts = [domain.context_prompt(cls, ctx)]
        tries = 0
        while len(prompts) < n_alternatives + 1 and tries < 100 * n_alternatives:
            tries += 1
            alt = domain.context_prompt(cls, domain.random_context(rng))
            if alt not in prompts:
                prompts.append(alt)
        sims = img_emb[k] @ scorers.text_embeds(prompts).cpu().T
        correct += int(sims.argmax()) == 0
        chance += 1 / len(prompts)
        one = domain.one_field_changes(ctx)
        sims = img_emb[k] @ scorers.text_embeds([prompts[0]] + [domain.context_prompt(cls, c) for c in one]).cpu().T
        correct_one += int(sims.argmax()) == 0
        chance_one += 1 / (1 + len(one))
    results["clip_t"] = {"context_accuracy": correct / len(classes), "chance": chance / len(classes),
                         "n_alternatives": n_alternatives,
                         "one_change_accuracy": correct_one / len(classes),
                         "one_change_chance": chance_one / len(classes)}
    return results


def format_validation(results: dict) -> str:
    """One readable block of the numbers :func:`validate` returns."""
    lines = [f"validation on {results['split']} identities: {results['identities']} identities, "
             f"{results['renders']} renders"]
    for name in ("identity", "clip_i"):
        r = results[name]
        lines.append(f"  {name:8s} same-id cos {r['same_mean']:.3f}  diff-id cos {r['diff_mean']:.3f} "
                     f"(same class {r['diff_same_class_mean']:.3f})  AUC {r['auc']:.4f} "
                     f"(same class {r['auc_same_class']:.4f}, one side blurred {r['auc_blurred']:.4f})")
        if "cos_by_attributes_differing" in r:
            lines.append(f"           cos by attributes differing (same class): {r['cos_by_attributes_differing']}")
    t = results["clip_t"]
    lines.append(f"  clip_t   context accuracy {t['context_accuracy']:.3f} among {t['n_alternatives'] + 1} prompts "
                 f"(chance {t['chance']:.3f}); against all one-field changes {t['one_change_accuracy']:.3f} "
                 f"(chance {t['one_change_chance']:.3f})")
    return "\n".join(lines)
