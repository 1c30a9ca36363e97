"""The ComfyUI nodes and the diffusers host (hosts/diffusers/instantbooth.py) give the same result on the same weights: the
same checkpoint UNet (converted to diffusers with diffusers' own LDM converter), the same CLIP vision file (read by
transformers), the same InstantBooth file, the same image and encoded prompt.

Tolerances (fp32 on CPU both sides; attention kernels and summation order differ): relative to each tensor's largest
value, 1e-4 for f_c/f_p (through ViT-L's 24 layers), 1e-4 for the UNet without adapters, 1e-4 for the denoiser's eps
with InstantBooth (measured: about 2e-6), while the adapters change eps by about 3e-2, far beyond that."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                 reason="COMFYUI_PATH is not set: the real-ComfyUI tier needs a ComfyUI checkout "
                                        "(docs/tests.md)")]

PROMPT = "a photo of sks person on the beach"  # driver.PROMPT
# tests/comfyui/make_models.py UNET_CONFIG in diffusers' terms: 2 levels of 320, 1 res block + 1 transformer each
DIFFUSERS_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 320),
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                      attention_head_dim=8)


# the real base models in diffusers' terms (their published unet/config.json files)
REFERENCE_UNETS = {
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                 attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
    "sdxl": dict(block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def diffusers_side(comfy, comfy_models, driver_run, tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

    from boothkit.backend.instantbooth import load_instantbooth

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with safe_open(str(comfy_models / "checkpoints" / "boothkit_tiny_sd15.safetensors"), framework="pt") as f:
        ldm = {k: f.get_tensor(k).float() for k in f.keys() if k.startswith("model.diffusion_model.")}
    unet = UNet2DConditionModel(**DIFFUSERS_UNET).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, unet.config), strict=True)

    folder = tmp_path_factory.mktemp("hf_clip_vision")
    cfg = json.loads((comfy["path"] / "comfy" / "clip_vision_config_vitl.json").read_text())
    CLIPVisionConfig(**{k: v for k, v in cfg.items() if k != "torch_dtype"}).save_pretrained(folder)
    (folder / "model.safetensors").symlink_to(comfy_models / "clip_vision" / "boothkit_vitl14.safetensors")
    vision = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(comfy["path"] / "comfy" / "sd1_tokenizer")
    ib = load_instantbooth(driver_run[2] / "ib_random.safetensors").eval()
    return unet, vision, tokenizer, ib


def test_both_hosts_read_the_same_layout_from_real_base_models(driver_run):
    """A file trained on a diffusers SD1.5 / SD2.1 / SDXL UNet fits ComfyUI's UNet for the same model: same widths,
    heads, levels and depths in the same order (ComfyUI's transformer_index order)."""
    from diffusers import UNet2DConditionModel

    from boothkit.hosts.diffusers.instantbooth import adapter_layout

    comfy_layouts = driver_run[0]["reference_layouts"]
    for name, config in REFERENCE_UNETS.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        assert adapter_layout(unet).to_dict() == comfy_layouts[name], name
    assert len(comfy_layouts["sdxl"]["dims"]) == 70 and len(comfy_layouts["sd15"]["dims"]) == 16


def test_comfyui_matches_the_diffusers_host(driver_run, diffusers_side):
    from boothkit.hosts.diffusers.instantbooth import (InstantBoothHooks, adapter_layout, condition_with_concept,
                                                       encode_images, identifier_rows)

    results, t, _ = driver_run
    unet, vision, tokenizer, ib = diffusers_side
    assert adapter_layout(unet).to_dict() == results["layout"], "both hosts read the same adapter layout"

    with torch.no_grad():
        eps_plain = unet(t["x_in"], t["timestep"], encoder_hidden_states=t["context"]).sample
    assert rel(eps_plain, t["eps_plain"]) < 1e-4, "same UNet weights, no adapters: same eps"

    images = t["image"].movedim(-1, 1)  # IMAGE [N, H, W, 3] -> [N, 3, H, W]
    with torch.no_grad():
        concept = ib.encode(*encode_images(vision, images, None, ib))
    err_c, err_p = rel(concept.f_c, t["f_c"]), rel(concept.f_p, t["f_p"])
    print(f"f_c, f_p: ComfyUI vs diffusers host max rel. diff {err_c:.2e}, {err_p:.2e}")
    assert err_c < 1e-4 and err_p < 1e-4, (err_c, err_p)

    assert identifier_rows(tokenizer, PROMPT, "sks") == results["rows"]
    cond = condition_with_concept(t["cond"], tokenizer, PROMPT, concept, 0.4)
    assert torch.allclose(cond, t["cond_personal"], atol=1e-3 * float(t["f_c"].abs().max()))

    context = torch.cat([cond, t["uncond"]])
    with InstantBoothHooks(unet, ib, concept.f_p, beta=0.3), torch.no_grad():
        eps = unet(t["x_in"], t["timestep"], encoder_hidden_states=context).sample
    err, effect = rel(eps, t["eps"]), rel(t["eps"], t["eps_plain"])
    print(f"eps: ComfyUI vs diffusers host max rel. diff {err:.2e}; the adapters' effect {effect:.2e}")
    assert err < 1e-4, f"ComfyUI and diffusers hosts differ by {err:.2e} (relative)"
    assert effect > 100 * max(err, 1e-6), "the adapters must change eps far beyond the tolerance"
