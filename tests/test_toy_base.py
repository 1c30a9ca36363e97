"""The toy base model: a 2-step training run (files, metadata, manifest, resume, export) and the shipped weights."""
import json
import logging

import pytest
import torch
from checkpoints import adam_steps, tamper

from boothkit.backend.files import read_metadata, read_safetensors
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


def _checkpoint(tmp_path, step):
    return tmp_path / "run" / f"checkpoint-{step:07d}.safetensors"


def test_resumed_run_matches_uninterrupted(tmp_path, caplog):
    """Data and noise are functions of (seed, step), so 1 step + resume 1 step == 2 steps: every tensor of the final
    checkpoint (weights, EMA, Adam's state) equal, bit for bit (one step moves a weight by up to ~1e-4, so any
    tolerance near that would hide a lost or repeated step). A run that ignored the checkpoint would match too: the
    log must name the checkpoint and step, and the next test changes a checkpoint and finds the change."""
    _run(tmp_path / "a", "--steps", "2")
    _run(tmp_path / "b", "--steps", "1")
    with caplog.at_level(logging.INFO, logger="boothkit.toyworld.train_base"):
        _run(tmp_path / "b", "--steps", "2", "--resume")
    assert f"loaded {_checkpoint(tmp_path / 'b', 1)} (step 1)" in caplog.text
    a, _ = read_safetensors(_checkpoint(tmp_path / "a", 2))
    b, _ = read_safetensors(_checkpoint(tmp_path / "b", 2))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a) and any(k.startswith("optimizer.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    one, _ = read_safetensors(_checkpoint(tmp_path / "b", 1))
    assert any(not torch.equal(one[k], a[k]) for k in a if k.startswith("weights.")), "step 2 changed the weights"
    ea, eb = tb.load_base(path=tmp_path / "a/w/base"), tb.load_base(path=tmp_path / "b/w/base")
    for (k, va), vb in zip(ea.unet.state_dict().items(), eb.unet.state_dict().values()):
        assert torch.equal(va, vb), k


def test_resume_reads_the_checkpoint(tmp_path):
    """Checkpoint 1 changed in a known way (weights +0.5, EMA 0.25, Adam's step 100): the resumed step counts
    Adam's step 101, keeps the weights within one step of the changed ones, and blends the EMA from 0.25 (decay at
    step 2: min(ema_decay, 3/12) = 0.25)."""
    _run(tmp_path, "--steps", "1")
    changed = tamper(_checkpoint(tmp_path, 1), shift=0.5, adam_step=100, ema=0.25)
    _run(tmp_path, "--steps", "2", "--resume")
    last = _checkpoint(tmp_path, 2)
    assert adam_steps(last) == {101.0}
    tensors, _ = read_safetensors(last)
    for k, v in changed.items():
        w = tensors[f"weights.{k}"]
        assert (w - v).abs().max() < 4 * 3e-4, k
        assert torch.allclose(tensors[f"ema.{k}"], 0.25 * 0.25 + 0.75 * w, atol=1e-6), k


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


def test_shipped_base_loads_and_samples():
    """The shipped base is part of the package: a missing or changed file fails here (no skip)."""
    assert store.verified_dir("base") == store.WEIGHTS_DIR / "base"
    base = tb.load_base()
    meta = base.metadata
    assert meta["format"] == tb.BASE_FORMAT and int(meta["steps"]) > 0 and meta["command"].startswith("python -m")
    assert base.unet.config.block_out_channels == [32, 64, 128] or tuple(base.unet.config.block_out_channels) == \
        (32, 64, 128)
    imgs = tb.sample(base, ["a photo of a cat on grass at day"], seed=0, steps=2)
    assert imgs.shape == (1, 3, 32, 32)
