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
        generate(common[:-6] + ["--prompt", "a photo of grass", "--out", str(tmp_path / "grass.png")])


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
    assert np.asarray(Image.open(out)).shape == (256, 256, 3), "the toy world's 32x32 written 8x, nearest"
    from boothkit.backend.instantbooth import load_instantbooth
    from boothkit.toyworld.store import verified

    c = load_instantbooth(verified("instantbooth.safetensors")).config
    assert (f"a photo of a sks cat on snow at night  (α={c.alpha:.2f}, β={c.beta:.2f}, adapters from "
            f"{c.start_percent:.2f} to 1.00 of sampling, 2 image(s))") in caplog.text, \
        "the identifier is inserted and the file's α, β and start are used"
    assert (c.beta, c.start_percent) == (1.5, 0.2), "the shipped file's β and start, chosen on the development set"


def test_generate_applies_the_adapters_in_the_share_of_sampling_asked_for(tmp_path):
    """--start-percent / --end-percent reach the adapters: an empty share is exactly β 0 (the concept token alone),
    and the shipped file's own start (0.2: the first of 10 steps, at t = 900, goes without) differs from starting at
    the first step."""
    from boothkit.backend.imageio import save_png
    from boothkit.toyworld import domain

    s = domain.identity_renders(domain.identities("heldout")[3], 1, 1)[0]
    save_png(s.image, tmp_path / "0.png")

    def image(*extra):
        out = tmp_path / f"o{len(list(tmp_path.glob('o*.png')))}.png"
        assert generate(["--images", str(tmp_path / "0.png"), "--prompt", "a photo of a cat on snow", "--steps", "10",
                         "--out", str(out), *extra]) == 0
        return np.asarray(Image.open(out))

    assert np.array_equal(image("--start-percent", "0.5", "--end-percent", "0.5"), image("--beta", "0"))
    assert not np.array_equal(image(), image("--start-percent", "0"))


@pytest.mark.parametrize("argv,message", [
    (["--images", "x", "--embedding", "e.safetensors"], "--images and --embedding each give the identifier"),
    (["--e4t-concept", "c.safetensors", "--embedding", "e.safetensors"], "--embedding and --e4t-concept"),
    (["--alpha", "0.5"], "--alpha belong(s) to InstantBooth, which needs --images"),
    (["--start-percent", "0.3"], "--start-percent belong(s) to InstantBooth, which needs --images"),
    (["--end-percent", "0.5"], "--end-percent belong(s) to InstantBooth, which needs --images"),
    (["--images", "x", "--start-percent", "1.5"], "argument --start-percent: 1.5 is out of range"),
    (["--scale", "0"], "argument --scale: 0 is out of range"),
    (["--out", "x.jpg"], "give a .png file"),
])
def test_generate_refuses_options_that_do_not_go_together(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        generate(["--prompt", "a cat"] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_generate_reports_a_typo_of_the_identifier_and_unknown_toy_words(tmp_path, caplog):
    import logging

    from boothkit.backend.imageio import save_png
    from boothkit.toyworld import domain

    s = domain.identity_renders(domain.identities("heldout")[3], 1, 1)[0]
    save_png(s.image, tmp_path / "0.png")
    with pytest.raises(ValueError, match="prompt word 'skz' looks like the identifier 'sks'"):
        generate(["--images", str(tmp_path), "--prompt", "a photo of a skz cat on snow", "--out", str(tmp_path / "o.png")])
    assert not (tmp_path / "o.png").exists()
    with caplog.at_level(logging.INFO):
        assert generate(["--images", str(tmp_path), "--prompt", "a photo of a cat on the beach", "--steps", "1",
                         "--scale", "1", "--out", str(tmp_path / "o.png")]) == 0
    assert "note: the toy world's captions never use 'beach'" in caplog.text
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (32, 32, 3)


def test_generate_with_an_embedding_on_sdxl_goes_through_its_pipeline(tmp_path, monkeypatch):
    """SDXL: an embedding's two vectors (clip_l, clip_g) reach diffusers' SDXL pipeline as prompt embeddings (tiny
    random SDXL with a VAE); another embedding gives another image from the same seed."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from test_quicktune import make_sdxl
    from tiny_models import tiny_unet, tiny_vae

    from boothkit.backend.embedding import Embedding, save_embedding
    import boothkit.commands.models as models

    base = make_sdxl(tmp_path)
    cfg = {k: v for k, v in tiny_unet(cross_attention_dim=80).config.items() if k != "_use_default_values"}
    cfg.update(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4)
    model = SimpleNamespace(**{**vars(base), "unet": UNet2DConditionModel.from_config(cfg).eval(), "vae": tiny_vae(),
                               "scheduler": DDPMScheduler(num_train_timesteps=100)})
    model.to = lambda device: model
    monkeypatch.setattr(models, "load_model", lambda name, config=None: model)
    outs = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        emb = Embedding({"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 48, generator=g)},
                        "sdxl", "sks")
        path = save_embedding(tmp_path / f"e{seed}.safetensors", emb, {"class_noun": "cat"})
        out = tmp_path / f"o{seed}.png"
        assert generate(["--model", "sdxl-test", "--embedding", str(path), "--prompt", "a photo of a cat", "--steps", "2",
                         "--out", str(out)]) == 0
        outs.append(np.asarray(Image.open(out)))
    assert outs[0].shape == (32, 32, 3), "the SDXL pipeline's size: sample_size x the VAE's factor, not enlarged"
    assert not np.array_equal(outs[0], outs[1])


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
    args = Namespace(height=None, width=None, negative_prompt="", skip_levels=[], steps=2, num_images=1, seed=1,
                     start_percent=None, end_percent=1.0)

    def run(alpha, beta):
        return _generate_sdxl(model, ib, concept, "a photo of sks cat on grass", args, alpha, beta, 5.0)

    out = run(0.4, 0.3)
    assert out.shape == (1, 3, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(out, run(0.4, 0.3)), "one seed, one image"
    assert not torch.allclose(out, run(0.0, 0.3), atol=1e-4), "α: the concept row reaches the UNet"
    assert not torch.allclose(out, run(0.4, 0.0), atol=1e-4), "β: the adapters run inside the SDXL pipeline"
