import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_unet

from boothkit.backend.files import FormatError, read_safetensors
from boothkit.backend.lora import LoRA, find_targets, kohya_name, load_lora, save_lora

pytestmark = pytest.mark.usefixtures("one_thread")



def run(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample


def randomize(lora, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return lora


def test_kohya_names_follow_module_paths():
    unet = tiny_unet()
    names = LoRA.for_model(unet).names()
    path = "down_blocks.0.attentions.0.proj_in"
    assert kohya_name("lora_unet", path) == "lora_unet_down_blocks_0_attentions_0_proj_in"
    for want in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_attentions_0_proj_out",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v"):
        assert want in names, want
    # kohya's default selects only the transformer containers' layers; with conv_rank also the ResNets
    assert not any("resnets" in n for n in names)
    conv_names = LoRA.for_model(unet, conv_rank=2).names()
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in conv_names
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in conv_names
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in conv_names
    every_path = {kohya_name("lora_unet", p) for p, _ in unet.named_modules()}
    assert set(conv_names) <= every_path
    assert len(find_targets(unet)) == len(names)


@pytest.mark.parametrize("conv_rank", [0, 2])
def test_attach_changes_output_and_detach_restores_exactly(conv_rank):
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    base = run(unet)
    lora = LoRA.for_model(unet, rank=2, conv_rank=conv_rank)
    with lora.attach(unet):
        assert torch.equal(run(unet), base), "a fresh LoRA (up = 0) must give the base output exactly"
    randomize(lora)
    with lora.attach(unet):
        patched = run(unet)
        lora.multiplier = 0.0
        assert torch.equal(run(unet), base), "multiplier 0 must give the base output exactly"
        lora.multiplier = 1.0
    assert not torch.allclose(patched, base, atol=1e-4), "an active LoRA changes the output"
    assert torch.equal(run(unet), base), "leaving attach() restores the exact output"
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), f"base weight {k} changed"
    assert set(unet.state_dict()) == set(before), "attach must not register anything in the base model"


def test_hook_equals_merged_weights_for_linear_and_strided_conv():
    unet = tiny_unet()
    lora = randomize(LoRA.for_model(unet, rank=3, alpha=1.5, conv_rank=2, conv_alpha=4.0))
    with lora.attach(unet):
        hooked = run(unet)
    merged = tiny_unet()
    merged.load_state_dict(unet.state_dict())
    modules = dict(merged.named_modules())
    deltas = lora.delta_weights()
    with torch.no_grad():
        for path, _ in find_targets(merged, conv=True).items():
            modules[path].weight += deltas[kohya_name("lora_unet", path)]
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in deltas  # stride 2: the hook must use the module's stride
    torch.testing.assert_close(run(merged), hooked, rtol=1e-4, atol=1e-5)


def test_save_load_round_trip_and_metadata(tmp_path):
    unet = tiny_unet()
    lora = randomize(LoRA.for_model(unet, rank=2, alpha=1.0, conv_rank=2))
    path = save_lora(tmp_path / "subject_lora.safetensors", lora, "sd1", "sks",
                     {"stage2_lr": 1e-4, "stage2_steps": 300, "num_images": 5, "resolution": 512, "seed": 3})
    tensors = load_file(path)
    assert set(tensors) == {f"{n}.{s}" for n in lora.names() for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(k.startswith("lora_unet_") for k in tensors)
    _, meta = read_safetensors(path)
    assert meta["format"] == "boothkit.lora" and meta["version"] == "1" and meta["method"] == "quicktune"
    assert meta["family"] == "sd1" and meta["identifier"] == "sks"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == "1.0" and json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_num_train_images"] == "5"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8
    loaded = load_lora(path, family="sd1")
    assert loaded.identifier == "sks" and loaded.lora.names() == sorted(lora.names())
    with lora.attach(unet):
        want = run(unet)
    with loaded.lora.attach(unet):
        assert torch.equal(run(unet), want), "a loaded LoRA must act exactly like the saved one"


def test_refusals(tmp_path):
    unet = tiny_unet()
    lora = LoRA.for_model(unet)
    path = save_lora(tmp_path / "a.safetensors", lora, "sd1", "sks")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_lora(path, lora, "sd1", "sks")
    save_lora(path, lora, "sd1", "sks", overwrite=True)
    with pytest.raises(FormatError, match="'family' is 'sd1'.*'sdxl'"):
        load_lora(path, family="sdxl")
    other = tiny_unet(cross_attention_dim=24)
    with pytest.raises(ValueError, match="another shape"):
        with lora.attach(other):
            pass
    tensors, meta = read_safetensors(path)
    from boothkit.backend.files import write_safetensors

    write_safetensors(tmp_path / "b.safetensors", tensors, {**meta, "format": "boothkit.instantbooth"})
    with pytest.raises(FormatError, match="b.safetensors: metadata field 'format' is 'boothkit.instantbooth'"):
        load_lora(tmp_path / "b.safetensors")
    write_safetensors(tmp_path / "c.safetensors", {**tensors, "junk": torch.zeros(1)}, meta)
    with pytest.raises(FormatError, match="junk"):
        load_lora(tmp_path / "c.safetensors")


SD15_UNET = dict(  # diffusers' SD1.5 UNet config (v1-5/unet/config.json)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8)

COMFY_CHECK = r"""
import json, logging, sys
import torch
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.lora, comfy.supported_models, comfy.model_base, comfy.ops
from safetensors.torch import load_file
records = []
class H(logging.Handler):
    def emit(self, r): records.append(r.getMessage())
logging.getLogger().addHandler(H()); logging.getLogger().setLevel(logging.WARNING)
import comfy.model_detection
shapes = json.load(open(sys.argv[3]))  # the diffusers SD1.5 UNet's state-dict shapes: ComfyUI detects the model
meta_sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
cfg = comfy.model_detection.model_config_from_diffusers_unet(meta_sd)
assert type(cfg).__name__ == "SD15", type(cfg).__name__
cfg.set_inference_dtype(torch.float32, torch.float32)
cfg.custom_operations = comfy.ops.disable_weight_init
with torch.device("meta"):
    model = comfy.model_base.BaseModel(cfg, device=torch.device("meta"))
key_map = comfy.lora.model_lora_keys_unet(model, {})
lora = load_file(sys.argv[2])
patches = comfy.lora.load_lora(lora, key_map)
sd = model.state_dict()
# lora_up [out, r, ...]: each patch must target a weight with that output width
shapes_ok = all(sd[k].shape[0] == p.weights[0].shape[0] for k, p in patches.items())
print(json.dumps({"patched": len(patches), "not_loaded": [m for m in records if "not loaded" in m],
                  "targets": sorted(set(patches)), "shapes_ok": shapes_ok}))
"""


@pytest.mark.comfyui
@pytest.mark.slow
def test_comfyui_maps_every_key_of_an_sd15_lora(tmp_path):
    """Stock ComfyUI's own key mapping (comfy/lora.py) loads every layer of our SD1.5 LoRA, with none reported as
    'lora key not loaded', and each patch targets a weight of the matching output width."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("COMFYUI_PATH not set")
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    lora = LoRA.for_model(unet, rank=2, conv_rank=2, device="cpu")
    path = save_lora(tmp_path / "sd15_lora.safetensors", lora, "sd1", "sks")
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({k: list(v.shape) for k, v in unet.state_dict().items()}))
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(root).parent / "venv" / "bin" / "python")
    python = python if Path(python).exists() else sys.executable
    out = subprocess.run([python, "-c", COMFY_CHECK, root, str(path), str(shapes)], capture_output=True, text=True,
                         timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["not_loaded"] == [], report["not_loaded"][:5]
    assert report["patched"] == len(lora.pairs), f"{report['patched']} of {len(lora.pairs)} layers mapped"
    assert report["shapes_ok"]
    assert all(t.startswith("diffusion_model.") for t in report["targets"])
