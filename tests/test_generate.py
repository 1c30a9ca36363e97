import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_clip_vision, tiny_sd_folder, write_image_folder

from boothkit.backend.formats import save_instantbooth
from boothkit.backend.instantbooth import InstantBooth, InstantBoothConfig
from boothkit.hosts.diffusers_host import adapter_layout
from boothkit.hosts.generate import main as generate
from boothkit.hosts.loading import load_sd


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
    assert "a photo of a sks cat on snow at night  (α=0.40, β=1.50, 2 image(s))" in caplog.text, \
        "the identifier is inserted and the file's α, β are used"
