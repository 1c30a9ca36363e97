import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from tiny_models import tiny_clip_vision, tiny_sd_folder, write_image_folder

from boothkit.hosts.diffusers.loading import load_sd
from boothkit.training.data import FolderDataset
from boothkit.training.e4t import E4TSettings, E4TTraining
from boothkit.training.frozen import attention_kind
from boothkit.training.instantbooth import InstantBoothSettings, InstantBoothTraining


def test_auto_attention_is_eager_on_cpu_and_sdpa_on_gpu():
    assert attention_kind("auto", "cpu") == "eager"
    assert attention_kind("auto", torch.device("cuda", 0)) == "sdpa"
    assert attention_kind("sdpa", "cpu") == "sdpa" and attention_kind("xformers", "cuda") == "xformers"
    with pytest.raises(ValueError, match="attention is 'flash'; expected one of auto, sdpa, eager, xformers"):
        attention_kind("flash", "cpu")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    sd = tiny_sd_folder(root / "sd", with_vae=False)
    data = write_image_folder(root / "data", 2, 32, (4, 24, 6, 28), ["a photo of a cat on grass"])
    return sd, FolderDataset(data, 32)


@pytest.mark.parametrize("kind, processor, eager", [("auto", AttnProcessor, True), ("sdpa", AttnProcessor2_0, False)])
def test_both_trainers_freeze_the_base_and_set_the_kernel(parts, kind, processor, eager):
    sd, ds = parts
    for training, settings in ((InstantBoothTraining, InstantBoothSettings), (E4TTraining, E4TSettings)):
        model, vision = load_sd(sd), tiny_clip_vision()
        method = training(model, vision, ds, settings(category="cat", attention=kind))
        assert method.attention == ("eager" if eager else "sdpa")
        procs = model.unet.attn_processors.values()
        assert procs and all(type(p) is processor for p in procs)
        assert not any(p.requires_grad for part in model.parts() + [vision] for p in part.parameters())
        if training is InstantBoothTraining:
            assert all(a.eager_attention is eager for a in method.ib.adapters)
    with pytest.raises(ValueError, match="attention is 'flash'"):
        E4TTraining(load_sd(sd), tiny_clip_vision(), ds, E4TSettings(category="cat", attention="flash"))
