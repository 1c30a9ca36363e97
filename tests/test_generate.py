import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_clip_vision, tiny_sd_folder, write_image_folder

from boothkit.backend.instantbooth import save_instantbooth
from boothkit.backend.instantbooth import InstantBooth, InstantBoothConfig
from boothkit.hosts.diffusers.instantbooth import adapter_layout
from boothkit.commands.generate import main as generate
from boothkit.hosts.diffusers.loading import load_sd


@pytest.mark.parametrize("with_vae", [True, False])
def test_generate_end_to_end_on_a_diffusers_folder(tmp_path, with_vae):
    sd = tiny_sd_folder(tmp_path / "sd", with_vae=with_vae)
    model = load_sd(sd)
    assert model.family == "toy" and (model.vae is not None) == with_vae
    vision = tiny_clip_vision()
    vision.save_pretrained(tmp_path / "vision")
    cfg = InstantBoothConfig(vision_global_dim=16, vision_token_dim=24, tokens_per_image=17, ctx_dim=32,
                             layout=adapter_layout(model.unet), family="toy", class_noun="cat", image_size=32)
    ib = InstantBooth(cfg)
    with torch.no_grad():
        for a in ib.adapters:
            a.gate.fill_(1.0)
    save_instantbooth(tmp_path / "ib.safetensors", ib)
    images = write_image_folder(tmp_path / "subject", 2, 40, (5, 30, 8, 33))
    out = tmp_path / "out.png"
    common = ["--model", str(sd), "--clip-vision", str(tmp_path / "vision"), "--instantbooth",
              str(tmp_path / "ib.safetensors"), "--images", str(images), "--prompt", "a photo of a cat on grass",
              "--steps", "3", "--seed", "1"]
    assert generate(common + ["--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    side = model.resolution
    assert img.shape == (side, side, 3)
    # β=0 switches the adapters off: a different image from the same seed
    generate(common + ["--beta", "0", "--out", str(tmp_path / "b0.png")])
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "b0.png")), img)
    with pytest.raises(ValueError, match="neither the identifier 'sks' nor a class noun"):
        generate(common[:-6] + ["--prompt", "a photo of grass", "--out", str(out)])


def test_generate_with_the_toy_defaults_uses_the_shipped_instantbooth(tmp_path, caplog):
    """No --model / --instantbooth / --clip-vision: the toy world's base, CLIP and shipped InstantBooth file."""
    import logging

    from boothkit.backend.imageio import save_png
    from boothkit.toyworld import domain

    for i, s in enumerate(domain.identity_renders(domain.identities("heldout")[3], 2, 1)):
        save_png(s.image, tmp_path / f"{i}.png")
        save_png(s.mask.expand(3, -1, -1), tmp_path / f"{i}_mask.png")
    out = tmp_path / "out.png"
    with caplog.at_level(logging.INFO):
        assert generate(["--images", str(tmp_path), "--prompt", "a photo of a cat on snow at night", "--steps", "3",
                         "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)
    assert "a photo of a sks cat on snow at night  (α=0.40, β=1.00, 2 image(s))" in caplog.text, \
        "the identifier is inserted and the file's α, β are used"


def test_generate_on_sdxl_goes_through_the_sdxl_pipeline_with_the_concept(tmp_path):
    """SDXL (two text encoders, pooled and time conditioning; ctx 768 + 1280 = 2048) in the diffusers host: the
    SDXL pipeline samples with the concept row and the adapters; the same seed gives the same image, and α and β
    each change it."""
    from argparse import Namespace

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from tiny_models import tiny_tokenizer, tiny_vae
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from boothkit.commands.generate import _generate_sdxl
    from boothkit.hosts.diffusers.instantbooth import encode_images
    from boothkit.hosts.diffusers.loading import SDModel, family_of

    tok = tiny_tokenizer(tmp_path / "tok")
    vocab = len(tok.get_vocab())

    def text(hidden, cls, **kw):
        return cls(CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                                  pad_token_id=1, **kw)).eval()

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=2048, attention_head_dim=2,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4,
    ).eval()
    assert family_of(unet) == "sdxl"
    model = SDModel(unet, text(768, CLIPTextModel), tok, DDPMScheduler(num_train_timesteps=1000), tiny_vae(), "sdxl",
                    16, text(1280, CLIPTextModelWithProjection, projection_dim=16), tok)
    vision = tiny_clip_vision()
    ib = InstantBooth(InstantBoothConfig(vision_global_dim=16, vision_token_dim=24, tokens_per_image=17,
                                         ctx_dim=2048, layout=adapter_layout(unet), family="sdxl", class_noun="cat",
                                         image_size=32))
    with torch.no_grad():
        for a in ib.adapters:
            a.gate.fill_(1.0)
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    masks = torch.ones(2, 1, 40, 40)
    concept = ib.encode(*encode_images(vision, images, masks, ib))
    args = Namespace(negative_prompt="", skip_levels=[], steps=2, num_images=1, seed=1)

    def run(alpha, beta):
        return _generate_sdxl(model, ib, concept, "a photo of sks cat on grass", args, alpha, beta, 5.0)

    out = run(0.4, 0.3)
    assert out.shape == (1, 3, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(out, run(0.4, 0.3)), "one seed, one image"
    assert not torch.allclose(out, run(0.0, 0.3), atol=1e-4), "α: the concept row reaches the UNet"
    assert not torch.allclose(out, run(0.4, 0.0), atol=1e-4), "β: the adapters run inside the SDXL pipeline"
