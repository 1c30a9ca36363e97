"""The toy world inside ComfyUI: its shipped base model, text encoder, pixel-space "VAE" and CLIP vision stand-in as
ordinary ComfyUI MODEL / CLIP / VAE / CLIP_VISION objects, so ComfyUI's own CLIPTextEncode, KSampler, VAE Decode and
Save Image run the toy world, and the pack's method nodes run on it unchanged. Also the toy subjects' photos.

Nothing in ComfyUI is changed; its public classes are used or subclassed:

- MODEL: ``comfy.model_base.BaseModel`` built from a ``supported_models_base.BASE`` subclass whose ``unet_config`` is
  the toy diffusers UNet's config translated to ComfyUI's openaimodel (weights renamed with ComfyUI's own
  ``unet_to_diffusers`` map); GroupNorm groups set to the toy's (openaimodel hard-codes 32); the toy's DDPM schedule
  (diffusers "linear" is ComfyUI's "sqrt_linear"); epsilon prediction. The toy base was trained with x0 clipped to
  [-1, 1] (diffusers ``clip_sample``), so the MODEL carries that as a post-CFG function: every sampler sees it.
- CLIP: ``comfy.sd.CLIP`` around ``sd1_clip`` subclasses with the toy text encoder's config and tokenizer.
- VAE: ComfyUI's pixel-space VAE (``pixel_space_vae``: the toy model works on pixels in -1..1, 3 channels), so
  latents come from ``EmptyChromaRadianceLatentImage`` (3 channels).
- CLIP_VISION: ``comfy.clip_vision.ClipVisionModel`` from the toy CLIP's vision config.

The base family is declared on the model config (``boothkit_family = "toy"``), which is how the pack's nodes accept
the toy files for it and refuse them for any Stable Diffusion model (and the other way round)."""
from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from ...toyworld import domain
from ...toyworld.store import verified, verified_dir

FAMILY = "toy"
# the shipped method files, as the pack's loaders list them (beside the user's files in models/instantbooth, models/e4t)
TOY_FILES = {"instantbooth": ("toy_instantbooth.safetensors", "instantbooth.safetensors"),
             "e4t": ("toy_e4t.safetensors", "e4t.safetensors")}


def toy_file(folder: str, name: str) -> Path | None:
    """The shipped toy file behind a loader's option ``name`` (sha-checked), or None when it is not the toy's."""
    entry = TOY_FILES.get(folder)
    if entry is None or name != entry[0]:
        return None
    return verified(entry[1])


def _read(path: Path) -> dict[str, torch.Tensor]:
    import comfy.utils

    return comfy.utils.load_torch_file(str(path), safe_load=True)


# ----------------------------------------------------------------------------------------------------------------------
# MODEL


def unet_config_from_diffusers(dcfg: dict) -> dict:
    """ComfyUI's openaimodel UNetModel arguments equivalent to a diffusers UNet2DConditionModel config."""
    ch = list(dcfg["block_out_channels"])
    mc = ch[0]
    heads = dcfg["attention_head_dim"]  # diffusers: the number of heads per block
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(ch)
    head_dims = {c // h for c, h in zip(ch, heads)}
    if len(head_dims) != 1:
        raise ValueError(f"toy UNet config: head widths {sorted(head_dims)} differ per level; ComfyUI's UNet takes one")
    nrb = [int(dcfg["layers_per_block"])] * len(ch)
    down_attn = [t.startswith("CrossAttn") for t in dcfg["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in dcfg["up_block_types"]][::-1]  # level order (0 = full resolution)
    return dict(
        image_size=int(dcfg.get("sample_size", 32)), in_channels=int(dcfg["in_channels"]),
        out_channels=int(dcfg["out_channels"]), model_channels=mc, num_res_blocks=nrb,
        channel_mult=[c // mc for c in ch],
        transformer_depth=sum(([1 if a else 0] * n for a, n in zip(down_attn, nrb)), []),
        transformer_depth_output=sum(([1 if a else 0] * (n + 1) for a, n in zip(up_attn, nrb)), []),
        transformer_depth_middle=1 if dcfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") else -1,
        use_spatial_transformer=True, context_dim=int(dcfg["cross_attention_dim"]),
        num_heads=-1, num_head_channels=head_dims.pop(),
        use_linear_in_transformer=bool(dcfg.get("use_linear_projection", False)), legacy=False,
        adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False, use_checkpoint=False,
    )


@lru_cache(maxsize=None)
def _config_class():
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models_base

    class ToyLatentFormat(comfy.latent_formats.LatentFormat):
        """Pixel space: the "latent" is the image in -1..1 (what the pixel-space VAE gives)."""
        latent_channels = 3
        scale_factor = 1.0

        def __init__(self):
            self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
            self.latent_rgb_factors_bias = None
            self.taesd_decoder_name = None

    class ToyWorld(comfy.supported_models_base.BASE):
        unet_config = {"context_dim": 64, "in_channels": 3}  # never used for detection (not in ComfyUI's list)
        unet_extra_config = {}  # BASE's default would force 64-wide heads
        # diffusers DDPMScheduler(beta_schedule="linear"): ComfyUI's "linear" is SD's scaled-linear, its
        # "sqrt_linear" the plain linspace
        sampling_settings = {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 0.02,
                             "timesteps": 1000}
        latent_format = ToyLatentFormat
        memory_usage_factor = 0.05
        supported_inference_dtypes = [torch.float32, torch.bfloat16, torch.float16]
        boothkit_family = FAMILY  # hosts.comfy.common.model_family reads it

        def get_model(self, state_dict, prefix="", device=None):
            return comfy.model_base.BaseModel(self, model_type=comfy.model_base.ModelType.EPS, device=device)

    return ToyWorld


def set_group_norm_groups(module: torch.nn.Module, groups: int) -> int:
    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            if m.num_channels % groups:
                raise ValueError(f"toy UNet: {m.num_channels} channels are not divisible by {groups} groups")
            m.num_groups = groups
            n += 1
    return n


def clip_x0(args):
    """Post-CFG: the prediction of x0 clipped to [-1, 1], as the toy base was trained and samples (clip_sample)."""
    return args["denoised"].clamp(-1.0, 1.0)


def load_model():
    """The toy UNet as a ComfyUI MODEL (ModelPatcher) that samples like the toy world's own sampler."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    folder = verified_dir("base/unet")
    dcfg = json.loads((folder / "config.json").read_text())
    unet_config = unet_config_from_diffusers(dcfg)
    model_config = _config_class()(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device="cpu")
    set_group_norm_groups(model.diffusion_model, int(dcfg.get("norm_num_groups", 32)))
    to_comfy = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> ComfyUI key
    sd = _read(folder / "diffusion_pytorch_model.safetensors")
    unmapped = sorted(k for k in sd if k not in to_comfy)
    if unmapped:
        raise ValueError(f"{folder}: {len(unmapped)} toy UNet weights have no ComfyUI name, e.g. {unmapped[:3]}")
    missing, unexpected = model.diffusion_model.load_state_dict({to_comfy[k]: v for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: the toy UNet does not fit ComfyUI's UNet built from its config (missing "
                         f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    patcher.set_model_sampler_post_cfg_function(clip_x0)
    return patcher


# ----------------------------------------------------------------------------------------------------------------------
# CLIP


def load_clip(embedding_directory=None):
    import comfy.sd
    import comfy.sd1_clip as sd1_clip

    tcfg = json.loads((verified_dir("base/text_encoder") / "config.json").read_text())
    tok_dir = str(verified_dir("tokenizer"))
    special = {"start": tcfg["bos_token_id"], "end": tcfg["eos_token_id"], "pad": tcfg["pad_token_id"]}
    width = tcfg["hidden_size"]

    class ToySDTokenizer(sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(tokenizer_path=tok_dir, max_length=tcfg["max_position_embeddings"], pad_with_end=True,
                             embedding_directory=embedding_directory, embedding_size=width,
                             embedding_key="clip_l", tokenizer_data=tokenizer_data)

    class ToyTokenizer(sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             tokenizer=ToySDTokenizer)

    class ToyTextModel(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=dict(tcfg), special_tokens=special,
                             layer="last", return_projected_pooled=False, model_options=model_options)
            # ComfyUI's CLIPEmbeddings builds a 49408-row table whatever the config says: the toy's has its own size
            emb = self.transformer.text_model.embeddings
            old = emb.token_embedding
            emb.token_embedding = type(old)(tcfg["vocab_size"], old.weight.shape[1], dtype=old.weight.dtype,
                                            device=old.weight.device)

    class ToyClipModel(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=ToyTextModel)

    class Target:
        params = {}
        clip = ToyClipModel
        tokenizer = ToyTokenizer

    path = verified("base/text_encoder/model.safetensors")
    sd = _read(path)
    clip = comfy.sd.CLIP(target=Target(), embedding_directory=embedding_directory,
                         parameters=sum(v.numel() for v in sd.values()))
    # transformers saves CLIPTextModel without the "text_model." prefix ComfyUI's CLIPTextModel has
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v.float() for k, v in sd.items()}
    missing, unexpected = clip.load_sd(sd)
    missing = [k for k in missing if k != "text_projection.weight"]  # the toy encoder has no projection (unused)
    if missing or unexpected:
        raise ValueError(f"{path}: the toy text encoder does not fit ComfyUI's CLIP (missing {missing[:3]}, "
                         f"unexpected {list(unexpected)[:3]})")
    return clip


# ----------------------------------------------------------------------------------------------------------------------
# VAE, CLIP_VISION


def load_vae():
    import comfy.sd

    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


def load_clip_vision():
    import comfy.clip_vision

    cdir = verified_dir("clip")
    cfg = json.loads((cdir / "config.json").read_text())
    pre = json.loads((cdir / "preprocessor_config.json").read_text())
    vc = dict(cfg["vision_config"])
    vc.setdefault("model_type", "clip_vision_model")
    vc["projection_dim"] = cfg.get("projection_dim", vc.get("projection_dim"))
    vc["image_mean"], vc["image_std"] = pre["image_mean"], pre["image_std"]
    sd = {k: v for k, v in _read(cdir / "model.safetensors").items()
          if k.startswith(("vision_model.", "visual_projection."))}
    # ClipVisionModel reads its config from a json file
    fd, path = tempfile.mkstemp(suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(vc, f)
        cv = comfy.clip_vision.ClipVisionModel(path)
    finally:
        os.unlink(path)
    missing, unexpected = cv.load_sd(sd)
    if missing or unexpected:
        raise ValueError(f"{cdir}: the toy CLIP vision model does not fit ComfyUI's (missing {list(missing)[:3]}, "
                         f"unexpected {list(unexpected)[:3]})")
    return cv


def load_toy_world(embedding_directory=None):
    """(MODEL, CLIP, VAE, CLIP_VISION) of the toy world."""
    return load_model(), load_clip(embedding_directory), load_vae(), load_clip_vision()


# ----------------------------------------------------------------------------------------------------------------------
# photos


def subject_photos(identity_id: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``count`` photos of toy subject ``identity_id`` in random scenes: IMAGE [N, H, W, 3], MASK [N, H, W] (1 on the
    subject) and its class noun."""
    if count < 1:
        raise ValueError(f"count must be 1 or more, got {count}")
    identity = domain.identity_by_id(identity_id)
    samples = domain.identity_renders(identity, count, seed)
    images = torch.stack([s.image for s in samples]).movedim(1, -1).contiguous()
    masks = torch.stack([s.mask[0] for s in samples]).contiguous()
    return images, masks, identity.class_name
