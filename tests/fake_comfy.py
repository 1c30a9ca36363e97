"""A stand-in for the part of ComfyUI the tuning nodes train on (``comfy.model_management``, ``comfy.utils``,
``comfy.lora``, ``comfy.clip_vision``, openaimodel's ``Downsample`` and the MODEL / CLIP / VAE / CLIP_VISION
objects), small enough to run Quick-Tune Concept's and E4T Tune's ``execute()`` in the default tier in a second.
It keeps ComfyUI's shapes and calling conventions as hosts/comfy/common.py uses them (ModelPatcher: ``model``,
``clone``, ``add_patches``, ``get_model_object``, ``load_device``; CLIP: ``tokenize`` with word ids,
``cond_stage_model.encode_token_weights`` with embedding tensors in the token lists; VAE: ``encode`` of
[N, H, W, 3]; LoRA keys ``lora_unet_<path>`` -> ``diffusion_model.<path>.weight``). It does not reproduce ComfyUI's
numerics; the real-ComfyUI tier does (tests/comfyui)."""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

CTX = 768  # SD1.x's text width: the host reads the family from it


class InterruptProcessingException(Exception):
    """ComfyUI's Cancel (comfy.model_management raises it at the next check)."""


class SpatialTransformer(nn.Module):
    """Named like ComfyUI's: the LoRA adapts the Linear layers inside a SpatialTransformer."""

    def __init__(self, ch: int, ctx: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ctx, ch), nn.Linear(ctx, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        att = torch.softmax(self.to_q(t) @ self.to_k(context).transpose(1, 2) / c ** 0.5, dim=-1)
        return x + self.proj_out(att @ self.to_v(context)).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Stands in for comfy.ldm.modules.diffusionmodules.openaimodel.Downsample (E4T finds the levels by it)."""

    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, context=None):
        return self.op(x)


class TinyUNet(nn.Module):
    """input_blocks / middle_block / output_blocks as ComfyUI's UNetModel has them (two levels: a Downsample ends
    the first); ``nan_after`` calls later every output is NaN (a diverging run)."""

    in_channels = 4

    def __init__(self, ch: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(4, ch, 3, padding=1)
        self.time_embed = nn.Linear(1, ch)
        self.input_blocks = nn.ModuleList([nn.ModuleList([SpatialTransformer(ch, CTX)]),
                                           nn.ModuleList([Downsample(ch)]),
                                           nn.ModuleList([SpatialTransformer(ch, CTX)])])
        self.middle_block = nn.ModuleList([SpatialTransformer(ch, CTX)])
        self.output_blocks = nn.ModuleList([nn.ModuleList([SpatialTransformer(ch, CTX)])])
        self.conv_out = nn.Conv2d(ch, 4, 3, padding=1)
        self.calls, self.nan_after = 0, None

    def forward(self, x, timesteps, context=None, y=None, transformer_options=None):
        self.calls += 1
        h = self.conv_in(x) + self.time_embed(timesteps.float()[:, None] / 1000)[..., None, None]
        for block in [*self.input_blocks, self.middle_block]:
            for layer in block:
                h = layer(h, context)
        h = F.interpolate(h, size=x.shape[-2:], mode="nearest")
        for block in self.output_blocks:
            for layer in block:
                h = layer(h, context)
        out = self.conv_out(h)
        if self.nan_after is not None and self.calls > self.nan_after:
            out = out * float("nan")
        return out


def attention_layers() -> dict[str, list[int]]:
    """Path -> [out, in] of every Linear inside a SpatialTransformer of the fake UNet."""
    unet = TinyUNet()
    return {n: list(m.weight.shape) for n, m in unet.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "proj_out")}


DIFFUSERS = "fake"  # the fake's "diffusers" names: fake.<ComfyUI path>


def unet_to_diffusers(unet_config) -> dict[str, str]:
    """diffusers key -> ComfyUI key, as comfy.utils.unet_to_diffusers maps them (for the attention layers)."""
    return {f"{DIFFUSERS}.{n}.weight": f"{n}.weight" for n in attention_layers()}


class ModelSampling:
    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.sigmas = ((1 - ac) / ac).sqrt().float()


class SD15Config:
    unet_config = {"context_dim": CTX}


class BaseModel(nn.Module):
    """ComfyUI's BaseModel: the UNet as ``diffusion_model`` (state-dict keys ``diffusion_model.…``)."""

    def __init__(self):
        super().__init__()
        self.diffusion_model = TinyUNet()
        self.model_sampling = ModelSampling()
        self.model_type = types.SimpleNamespace(name="EPS")
        self.latent_format = types.SimpleNamespace(latent_channels=4)
        self.model_config = SD15Config()
        self.manual_cast_dtype = None

    def get_dtype(self):
        return torch.float32

    def process_latent_in(self, latent):
        return latent * 0.18215

    def encode_adm(self, **kwargs):
        return None  # SD1.x has no ``y``


class ModelPatcher:
    def __init__(self, model: nn.Module, patches=None):
        self.model, self.patches = model, dict(patches or {})
        self.load_device = torch.device("cpu")

    def clone(self):
        return type(self)(self.model, {k: list(v) for k, v in self.patches.items()})

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        sd = self.model.state_dict()
        added = [k for k in patches if (k[0] if isinstance(k, tuple) else k) in sd]
        for k in added:
            self.patches.setdefault(k, []).append((strength_patch, patches[k], strength_model))
        return added

    def get_model_object(self, name):
        return getattr(self.model, name)


class TextModel(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(vocab, CTX)
        self.position = nn.Parameter(torch.randn(77, CTX) * 0.01)
        self.mix = nn.Linear(CTX, CTX)

    def get_input_embeddings(self):
        return self.embeddings.token_embedding


class ClipL(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.transformer = TextModel(vocab)


class CondStageModel(nn.Module):
    """ComfyUI's SD1ClipModel shape: ``clip_l.transformer``; token lists may carry embedding tensors for ids."""

    def __init__(self, vocab: int):
        super().__init__()
        self.clip_l = ClipL(vocab)
        self.options = {}

    def reset_clip_options(self):
        self.options = {}

    def set_clip_options(self, options):
        self.options.update(options)

    def encode_token_weights(self, tokens):
        t = self.clip_l.transformer
        table = t.get_input_embeddings().weight
        rows = [tok[0].reshape(-1).to(table.dtype) if isinstance(tok[0], torch.Tensor) else table[tok[0]]
                for tok in tokens["l"][0]]
        x = torch.stack(rows)[None] + t.position
        cond = x + t.mix(x)  # out of place, as a differentiable encoder must be
        return cond, cond[:, -1]


WORDS = ["<start>", "<end>", "a", "photo", "of", "sks", "cat", "dog", "rare", "on", "grass"]


class CLIP:
    """ComfyUI's CLIP: ``tokenize`` gives {"l": [[(id, weight[, word id]), ... 77]]}; patches go on clones."""

    def __init__(self, csm: CondStageModel | None = None, patches=None):
        self.cond_stage_model = csm or CondStageModel(len(WORDS))
        self.patcher = ModelPatcher(self.cond_stage_model)
        self.patcher.patches = dict(patches or {})
        self.layer_idx = None

    @property
    def patches(self):
        return self.patcher.patches

    def clone(self):
        return CLIP(self.cond_stage_model, {k: list(v) for k, v in self.patches.items()})

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def tokenize(self, text, return_word_ids=False):
        ids = [(WORDS.index(w), 1.0, i + 1) for i, w in enumerate(text.lower().split()) if w in WORDS]
        chunk = [(0, 1.0, 0)] + ids + [(1, 1.0, 0)]
        chunk += [(1, 1.0, 0)] * (77 - len(chunk))
        return {"l": [[tok if return_word_ids else tok[:2] for tok in chunk]]}


class VAE:
    """encode([N, H, W, 3] in 0..1) -> [N, 4, H/8, W/8]: a fixed 8x8 average and a fixed 3 -> 4 mix."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.mix = torch.randn(4, 3, generator=g)

    def encode(self, pixels):
        x = F.avg_pool2d(pixels.movedim(-1, 1).float() * 2 - 1, 8)
        return torch.einsum("oc,nchw->nohw", self.mix, x)


class ClipVision:
    """ComfyUI's CLIP_VISION: ``model(pixel_values, intermediate_output="all")`` -> (last, [B, layers, T, D])."""

    image_size, image_mean, image_std = 32, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

    def __init__(self, width: int = 16, layers: int = 2):
        g = torch.Generator().manual_seed(2)
        self.proj = [torch.randn(3 * 16, width, generator=g) * 0.3 for _ in range(layers)]
        self.patcher, self.load_device = object(), torch.device("cpu")

    def model(self, pixel_values, intermediate_output=None):
        patches = F.avg_pool2d(pixel_values, 8).flatten(2).transpose(1, 2)  # [B, 16, 3]
        x = patches.reshape(len(pixel_values), 1, -1)  # one token of all patches
        hidden = torch.stack([torch.cat([x @ p, torch.tanh(x @ p)], dim=1) for p in self.proj], dim=1)
        return hidden[:, -1], hidden


def clip_preprocess(image, size=224, mean=None, std=None, crop=True):
    x = F.interpolate(image.movedim(-1, 1), size=(size, size), mode="bilinear", align_corners=False)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def model_lora_keys_unet(model, key_map=None):
    """kohya names -> the model's keys, by ComfyUI path and by diffusers path, as ComfyUI maps both."""
    key_map = {} if key_map is None else key_map
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            path = k[len("diffusion_model."):-len(".weight")]
            key_map["lora_unet_" + path.replace(".", "_")] = k
            key_map["lora_unet_" + f"{DIFFUSERS}.{path}".replace(".", "_")] = k
    return key_map


def load_lora(lora, to_load, log_missing=True):
    """ComfyUI's patch tuples for the two kinds of file the nodes make: LoRA pairs and full weight diffs."""
    patches = {}
    for name, key in to_load.items():
        if f"{name}.lora_up.weight" in lora:
            patches[key] = ("lora", (lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"],
                                     lora.get(f"{name}.alpha"), None, None, None))
        elif f"{name}.diff" in lora:
            patches[key] = ("diff", (lora[f"{name}.diff"],))
    return patches


class Interrupt:
    """Cancel: ``after`` interrupt checks pass, the next one raises (None: never)."""

    def __init__(self):
        self.after, self.checks = None, 0

    def check(self):
        self.checks += 1
        if self.after is not None and self.checks > self.after:
            raise InterruptProcessingException()


def modules(interrupt: Interrupt) -> dict[str, types.ModuleType]:
    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.throw_exception_if_processing_interrupted = interrupt.check
    mm.load_models_gpu = lambda models, *a, **k: None
    mm.load_model_gpu = lambda model, *a, **k: None
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total, self.current = total, 0

        def update_absolute(self, value, total=None, preview=None):
            self.current = value

    utils.ProgressBar = ProgressBar
    utils.unet_to_diffusers = unet_to_diffusers
    lora = types.ModuleType("comfy.lora")
    lora.model_lora_keys_unet = model_lora_keys_unet
    lora.load_lora = load_lora
    clip_vision = types.ModuleType("comfy.clip_vision")
    clip_vision.clip_preprocess = clip_preprocess
    openaimodel = types.ModuleType("comfy.ldm.modules.diffusionmodules.openaimodel")
    openaimodel.Downsample = Downsample
    comfy.model_management, comfy.utils, comfy.lora, comfy.clip_vision = mm, utils, lora, clip_vision
    return {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils, "comfy.lora": lora,
            "comfy.clip_vision": clip_vision, "comfy.ldm": types.ModuleType("comfy.ldm"),
            "comfy.ldm.modules": types.ModuleType("comfy.ldm.modules"),
            "comfy.ldm.modules.diffusionmodules": types.ModuleType("comfy.ldm.modules.diffusionmodules"),
            "comfy.ldm.modules.diffusionmodules.openaimodel": openaimodel}


def e4t_file(**overrides):
    """An untrained E4T of the fake model's shape (a fresh one predicts the class word and has Δ = 0)."""
    from boothkit.backend.e4t import E4T, E4TConfig

    layers = attention_layers()
    cfg = dict(family="sd1", word_dims=[CTX], vision_dim=16, vision_layers=[1, 2], unet_dims=[8, 8, 8],
               targets=[f"{DIFFUSERS}.{n}" for n in layers], target_shapes=list(layers.values()), class_word="cat",
               hidden=16, tune_steps=2, tune_batch=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    return E4T(E4TConfig(**cfg))


@contextmanager
def fake_comfy(monkeypatch):
    """Inside: ``comfy.*`` are these fakes; yields the Interrupt that Cancel goes through."""
    interrupt = Interrupt()
    for name, module in modules(interrupt).items():
        monkeypatch.setitem(sys.modules, name, module)
    yield interrupt


def snapshot(*roots: nn.Module) -> list:
    """Everything of the inputs a node must leave alone: every tensor, requires_grad flags, hooks."""
    return [({k: v.clone() for k, v in r.state_dict().items()},
             [p.requires_grad for p in r.parameters()],
             sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in r.modules())) for r in roots]


def same(before: list, *roots: nn.Module) -> bool:
    after = snapshot(*roots)
    return all(b[0].keys() == a[0].keys() and all(torch.equal(b[0][k], a[0][k]) for k in b[0]) and b[1:] == a[1:]
               for b, a in zip(before, after))
