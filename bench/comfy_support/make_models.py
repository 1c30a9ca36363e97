"""Random-weight models that a real ComfyUI recognises, for the real-ComfyUI test tier and `boothkit bench
comfy-memory`. Run with ComfyUI's python:

    python make_models.py --comfyui COMFYUI_PATH --out MODELS_DIR [--shape tiny|sd15]

writes MODELS_DIR/checkpoints/boothkit_tiny_sd15.safetensors (SD1.5 layout: full-width UNet with 2 levels, 1 res
block and 1 transformer block each, so ComfyUI detects SD15; full CLIP-L text encoder and SD VAE, whose configs
ComfyUI fixes; ``--shape sd15``: boothkit_random_sd15.safetensors, the whole SD1.5 UNet) and
MODELS_DIR/clip_vision/boothkit_vitl14.safetensors (ViT-L/14, the smallest CLIP vision ComfyUI accepts). Key names
and shapes come from ComfyUI's own modules built on the meta device. Seeded, so every build is the same; writes
atomically, skips files that exist. Logic after the project's comfyrig make_ckpt.py."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

CHECKPOINT = "boothkit_tiny_sd15.safetensors"
CLIP_VISION = "boothkit_vitl14.safetensors"

# what comfy.model_detection reads back as SD15 (context 768, model_channels 320, conv proj, no adm); depth is free
UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1], channel_mult=[1, 1],
    transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=768,
    use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None, num_heads=8,
    num_head_channels=-1, use_checkpoint=False, use_temporal_resblock=False, use_temporal_attention=False,
)
# the whole SD1.5 UNet (860M), as comfy.model_detection reads it from an SD1.5 checkpoint: 4 levels of 2 res blocks,
# transformers on the first three (transformer_depth_output is consumed from its end: the first output blocks, at the
# lowest resolution, have none)
SD15_UNET_CONFIG = dict(UNET_CONFIG, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3)
CHECKPOINTS = {"tiny": CHECKPOINT, "sd15": "boothkit_random_sd15.safetensors"}
UNETS = {"tiny": UNET_CONFIG, "sd15": SD15_UNET_CONFIG}
VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def setup_comfy(comfy_path: str, pytorch_attention: bool = False, cpu: bool = True):
    """Import ComfyUI as main.py --cpu would (``cpu`` off: as plain main.py, on the GPU it finds), and
    --use-pytorch-cross-attention: on CPU ComfyUI otherwise picks its chunked sub-quadratic attention, which is
    several times slower; GPUs get PyTorch attention by default."""
    comfy_path = os.path.abspath(comfy_path)
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.use_pytorch_cross_attention = pytorch_attention
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    return comfy_path


def _shapes(module) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def unet_shapes(config=UNET_CONFIG) -> dict:
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        return _shapes(UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init))


def random_state_dict(shapes: dict, prefix: str, gen, dtype) -> dict:
    """LeCun-normal matrices/convs, ones for norm scales, zeros for biases: finite, deterministic outputs."""
    import torch

    out = {}
    for k, (shape, sdt) in sorted(shapes.items()):
        if not sdt.is_floating_point:
            t = torch.zeros(shape, dtype=sdt)
        elif k.endswith("bias") or len(shape) == 0:
            t = torch.zeros(shape)
        elif len(shape) == 1:
            t = torch.ones(shape) if ("norm" in k or "ln" in k) else torch.randn(shape, generator=gen) * 0.02
        else:
            std = 0.02 if ("embedding" in k and len(shape) == 2) else 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
            t = torch.randn(shape, generator=gen) * std
        out[prefix + k] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def _save(path: str, tensors: dict, what: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt", "boothkit_test": what})
    os.replace(tmp, path)


def make_checkpoint(comfy_path: str, path: str, seed: int = 1234, shape: str = "tiny") -> None:
    import torch
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.models.autoencoder import AutoencoderKL

    gen = torch.Generator().manual_seed(seed)
    with open(os.path.join(comfy_path, "comfy", "sd1_clip_config.json")) as f:
        clip_config = json.load(f)
    with torch.device("meta"):
        clip_shapes = _shapes(CLIPTextModel(clip_config, torch.float32, "meta", comfy.ops.disable_weight_init))
        vae_shapes = _shapes(AutoencoderKL(ddconfig=dict(VAE_CONFIG), embed_dim=4))
    clip_shapes.pop("text_projection.weight", None)  # SD1.5 checkpoints carry none
    sd = random_state_dict(unet_shapes(UNETS[shape]), "model.diffusion_model.", gen, torch.float16)
    sd.update(random_state_dict(clip_shapes, "cond_stage_model.transformer.", gen, torch.float16))
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd.update(random_state_dict(vae_shapes, "first_stage_model.", gen, torch.float16))
    _save(path, sd, f"random {shape} sd15")


def make_clip_vision(comfy_path: str, path: str, seed: int = 1235) -> None:
    import torch
    import comfy.ops
    from comfy.clip_model import CLIPVisionModelProjection

    with open(os.path.join(comfy_path, "comfy", "clip_vision_config_vitl.json")) as f:
        config = json.load(f)
    with torch.device("meta"):
        shapes = _shapes(CLIPVisionModelProjection(config, torch.float32, "meta", comfy.ops.disable_weight_init))
    _save(path, random_state_dict(shapes, "", torch.Generator().manual_seed(seed), torch.float16),
          "random vit-l/14 clip vision")


def random_e4t(model, clip_vision, host, backend, seed: int = 0, pretrained: float = 0.0, **config):
    """An untrained E4T (``backend.E4T``) for ComfyUI's ``model`` (SD1) and ``clip_vision``, sized from ComfyUI's own
    UNet: offsets on its Linear layers, named by their diffusers paths as files store them, and the widths of its
    pooled encoder features from one forward pass (``host``: the pack's hosts.comfy.e4t). ``pretrained`` > 0 adds that
    much standard normal noise to every parameter: a "pre-trained" state, with a prediction and offsets that are not
    zero. ``config``: E4TConfig fields to set. Returns (E4T, {target: ComfyUI module}). Call outside inference mode."""
    import comfy.model_management as mm
    import comfy.utils
    import torch

    dm = model.get_model_object("diffusion_model")
    to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    from_ldm = {v[: -len(".weight")]: k[: -len(".weight")] for k, v in to_ldm.items() if k.endswith(".weight")}
    targets = sorted(from_ldm[p] for p in backend.offset_targets(dm))
    modules = host.offset_modules(model, targets)
    with torch.inference_mode():
        mm.load_models_gpu([model])
    with torch.no_grad():
        feats = backend.denoiser_features(host.common.make_predict(model), host.encoder_blocks(dm))(
            torch.zeros(1, 4, 8, 8), torch.tensor([10]), {"context": torch.zeros(1, 77, 768)})
    layers = len(clip_vision.model.vision_model.encoder.layers)
    width = int(clip_vision.model.vision_model.embeddings.position_embedding.weight.shape[1])
    config = backend.E4TConfig(**{
        "family": "sd1", "word_dims": [768], "vision_dim": width,
        "vision_layers": sorted({max(1, round(layers * k / 4)) for k in (1, 2, 3, 4)}),
        "unet_dims": [int(f.shape[-1]) for f in feats], "targets": targets,
        "target_shapes": [list(modules[t].weight.shape) for t in targets], **config})
    torch.manual_seed(seed)
    e4t = backend.E4T(config)
    if pretrained:
        with torch.no_grad():
            for param in e4t.parameters():
                param.add_(pretrained * torch.randn_like(param))
    return e4t, modules


def random_booth(model, host, ibm, gate: float = 0.5, seed: int = 0):
    """An InstantBooth with random weights for ComfyUI's SD1 ``model``, its adapter layout read from ComfyUI's own UNet
    (``host``: the pack's hosts.comfy.instantbooth, ``ibm``: backend.instantbooth) and every gate at ``gate``, so the
    adapters really compute; wrapped as the Load node hands it on (``host.BoothModel``)."""
    import torch

    layout = host.unet_adapter_layout(model.get_model_object("diffusion_model"))
    torch.manual_seed(seed)
    ib = ibm.InstantBooth(ibm.InstantBoothConfig(vision_global_dim=768, vision_token_dim=1024, tokens_per_image=257,
                                                 ctx_dim=768, layout=layout, family="sd1")).eval()
    with torch.no_grad():
        for adapter in ib.adapters:
            adapter.gate.fill_(gate)
    return host.BoothModel(ib, "random.safetensors")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--comfyui", required=True)
    p.add_argument("--out", required=True, help="models dir to write checkpoints/ and clip_vision/ into")
    p.add_argument("--shape", choices=list(UNETS), default="tiny")
    a = p.parse_args(argv)
    comfy_path = setup_comfy(a.comfyui)
    ckpt = os.path.join(a.out, "checkpoints", CHECKPOINTS[a.shape])
    clipv = os.path.join(a.out, "clip_vision", CLIP_VISION)
    if not os.path.exists(ckpt):
        make_checkpoint(comfy_path, ckpt, shape=a.shape)
    if not os.path.exists(clipv):
        make_clip_vision(comfy_path, clipv)
    print(json.dumps({"checkpoint": ckpt, "clip_vision": clipv}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
