"""The toy base model: a 2-step training run (files, metadata, manifest, resume, export) and the shipped weights."""
import json

import pytest
import torch

from boothkit.backend.files import read_metadata
from boothkit.toyworld import base as tb
from boothkit.toyworld import store
from boothkit.toyworld import train_base as ttb


def _run(tmp_path, *extra):
    return ttb.main(["--out", str(tmp_path / "w"), "--run-dir", str(tmp_path / "run"), "--batch-size", "2",
                     "--tiny", "--threads", "1", "--no-samples", "--log-every", "1", *extra])


def test_two_step_training_writes_base_folder_with_metadata(tmp_path):
    assert _run(tmp_path, "--steps", "2") == 0
    out = tmp_path / "w"
    for rel in ("base/model_index.json", "base/unet/config.json", "base/text_encoder/config.json",
                "base/scheduler/scheduler_config.json", "base/" + tb.UNET_FILE, "base/" + tb.TEXT_ENCODER_FILE,
                "tokenizer/tokenizer.json"):
        assert (out / rel).is_file(), rel
    meta = read_metadata(out / "base" / tb.UNET_FILE)
    assert meta["format"] == tb.BASE_FORMAT and meta["version"] == tb.BASE_VERSION and meta["component"] == "unet"
    assert meta["steps"] == "2" and meta["seed"] == "0" and "--steps 2" in meta["command"]
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["base/" + tb.UNET_FILE]["reproduce"] == meta["command"]
    assert store.verified_dir("base", out) == out / "base"
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*.safetensors")] == ["checkpoint-0000002.safetensors"]

    base = tb.load_base(path=out / "base")
    assert base.vae is None and base.family == "toy" and base.resolution == 32
    assert base.scheduler.config.num_train_timesteps == 1000
    assert base.scheduler.config.prediction_type == "epsilon"
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size
    imgs = tb.sample(base, ["a photo of a cat on grass at day", "a robot on snow at night"], seed=0, steps=2)
    assert imgs.shape == (2, 3, 32, 32) and 0 <= imgs.min() and imgs.max() <= 1
    assert torch.equal(imgs, tb.sample(base, ["a photo of a cat on grass at day", "a robot on snow at night"],
                                       seed=0, steps=2))

    # resume continues from the checkpoint (step 2 -> 3), a hand-edited file fails the sha256 check
    assert _run(tmp_path, "--steps", "3", "--resume") == 0
    assert read_metadata(out / "base" / tb.UNET_FILE)["steps"] == "3"
    with pytest.raises(ValueError, match="different settings"):
        _run(tmp_path, "--steps", "4", "--resume", "--lr", "1e-3")
    (out / "base/unet/config.json").write_text((out / "base/unet/config.json").read_text() + " ")
    with pytest.raises(store.WeightsError, match="sha256"):
        store.verified_dir("base", out)


def test_resumed_run_matches_uninterrupted(tmp_path):
    """Data and noise are functions of (seed, step), so 1 step + resume 1 step == 2 steps."""
    _run(tmp_path / "a", "--steps", "2")
    _run(tmp_path / "b", "--steps", "1")
    _run(tmp_path / "b", "--steps", "2", "--resume")
    a = tb.load_base(path=tmp_path / "a/w/base")
    b = tb.load_base(path=tmp_path / "b/w/base")
    for (k, va), vb in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-3), k


def test_load_base_rejects_wrong_metadata(tmp_path):
    _run(tmp_path, "--steps", "1")
    from boothkit.backend.files import read_safetensors, write_safetensors
    path = tmp_path / "w/base" / tb.TEXT_ENCODER_FILE
    tensors, meta = read_safetensors(path)
    write_safetensors(path, tensors, {**meta, "component": "unet"})
    with pytest.raises(tb.BaseModelError, match="component"):
        tb.load_base(path=tmp_path / "w/base")


def test_sample_accepts_encoder_hidden_states_and_unet(tmp_path):
    _run(tmp_path, "--steps", "1")
    base = tb.load_base(path=tmp_path / "w/base")
    prompts = ["a photo of a cat on grass at day"]
    ehs = tb.encode_prompts(base, prompts)
    assert ehs.shape == (1, 77, base.text_encoder.config.hidden_size)
    ref = tb.sample(base, prompts, seed=3, steps=2)
    assert torch.allclose(tb.sample(base, None, seed=3, steps=2, encoder_hidden_states=ehs), ref, atol=1e-6)
    other = tb.sample(base, None, seed=3, steps=2, encoder_hidden_states=ehs + 1.0)
    assert not torch.allclose(other, ref, atol=1e-3)
    import copy
    unet2 = copy.deepcopy(base.unet)
    with torch.no_grad():
        unet2.conv_out.bias.add_(0.5)
    assert not torch.allclose(tb.sample(base, prompts, seed=3, steps=2, unet=unet2), ref, atol=1e-3)


def _shipped():
    try:
        store.verified_dir("base")
        return True
    except store.WeightsError:
        return False


@pytest.mark.skipif(not _shipped(), reason="toy base weights not trained yet")
def test_shipped_base_loads_and_samples():
    base = tb.load_base()
    meta = base.metadata
    assert meta["format"] == tb.BASE_FORMAT and int(meta["steps"]) > 0 and meta["command"].startswith("python -m")
    assert base.unet.config.block_out_channels == [32, 64, 128] or tuple(base.unet.config.block_out_channels) == \
        (32, 64, 128)
    imgs = tb.sample(base, ["a photo of a cat on grass at day"], seed=0, steps=2)
    assert imgs.shape == (1, 3, 32, 32)
