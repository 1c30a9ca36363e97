import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from checkpoints import adam_steps, tamper, trained_weights
from tiny_models import training_world, write_config, write_image_folder

from boothkit.backend.instantbooth import load_instantbooth
from boothkit.backend.files import read_safetensors
from boothkit.commands.train import main as train_main
from boothkit.training.data import DataError, FolderDataset
from boothkit.training.trainer import TrainingStopped


def write_dataset(folder, n=6, size=32):
    return write_image_folder(folder, n, size, (4, 24, 6, 28), ["a photo of a cat on grass", "a cat on the beach"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = write_config(root / "ib.toml", *training_world(root, validation=2),
                       method=dict(category="cat", lr_adapters=1e-3, sample_steps=2, validation_images=1),
                       train=dict(batch_size=2, steps=2, checkpoint_every=2, log_every=1))
    return root, cfg


def weights(path):
    return read_safetensors(path)[0]


def test_two_steps_write_the_file_the_nodes_load(setup, tmp_path):
    root, cfg = setup
    out = tmp_path / "run"
    assert train_main(["instantbooth", "--config", str(cfg), "--output-dir", str(out)]) == 0
    path = out / "instantbooth.safetensors"
    tensors, meta = read_safetensors(path)
    assert meta["format"] == "boothkit.instantbooth" and meta["family"] == "toy"
    assert all(k.startswith(("concept_encoder.", "patch_encoder.", "adapters.")) for k in tensors), "heads+adapters only"
    training = json.loads(meta["training"])
    assert training["config"]["train"]["steps"] == 2 and training["settings"]["lr_heads"] == 1e-4
    ib = load_instantbooth(path, family="toy", ctx_dim=32)
    assert any(float(a.gate) != 0 for a in ib.adapters), "the gates were trained"
    assert (out / "checkpoints" / "checkpoint-0000002.safetensors").exists()
    assert list((out / "samples").glob("*.png")), "sample grid written"


def test_bf16_training_writes_fp32_weights_near_the_fp32_run(setup, tmp_path):
    """mixed_precision = bf16 on the real method: the forward runs in bf16 (another result than fp32), the trained
    weights and the file stay fp32 and finite; from the same initial weights, 2 Adam steps of lr ≤ 1e-3 keep them
    within 2 · 2 · 1e-3 of the fp32 run's (a bound on the optimizer, not on bf16: this guards against a blow-up)."""
    root, cfg = setup
    common = ["instantbooth", "--config", str(cfg), "--steps", "2"]
    train_main(common + ["--output-dir", str(tmp_path / "fp32")])
    train_main(common + ["--output-dir", str(tmp_path / "bf16"), "--set", "train.mixed_precision=bf16"])
    a = weights(tmp_path / "fp32" / "instantbooth.safetensors")
    b = weights(tmp_path / "bf16" / "instantbooth.safetensors")
    assert a.keys() == b.keys()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a), "bf16 autocast was on"
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 4e-3 + 1e-6


def test_validation_and_samples_once_per_step(setup, tmp_path, monkeypatch):
    """The loop validates and samples at its intervals; the end of the run adds its own only where the loop's last
    step did not (a run of 2 steps, validation every step, samples every 2: 2 validations and 1 grid, not 3 and 2),
    and a resumed run that has nothing left to train still validates and samples once."""
    from boothkit.training.instantbooth import InstantBoothTraining

    calls = []
    monkeypatch.setattr(InstantBoothTraining, "validate", lambda self: calls.append("validate") or {"x": 1.0})
    monkeypatch.setattr(InstantBoothTraining, "sample", lambda self, out, step: calls.append(f"sample {step}"))
    root, cfg = setup
    args = ["instantbooth", "--config", str(cfg), "--output-dir", str(tmp_path / "run"),
            "--set", "train.validate_every=1", "--set", "train.sample_every=2"]
    assert train_main(args) == 0
    assert calls == ["validate", "validate", "sample 2"]
    calls.clear()
    assert train_main(args + ["--resume"]) == 0
    assert calls == ["validate", "sample 2"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(setup, tmp_path, caplog):
    """2 steps + resume to 4 == 4 steps, with an EMA (the exported weights are the EMA's). Training is deterministic
    per (seed, step), so a run that ignored its checkpoint would also match: the log must name the checkpoint and
    the step it resumed at, and the next test changes a checkpoint and finds the change in the result."""
    root, cfg = setup
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["instantbooth", "--config", str(cfg), "--set", "train.checkpoint_every=2", "--set", "train.ema_decay=0.5"]
    train_main(common + ["--output-dir", str(full), "--steps", "4"])
    train_main(common + ["--output-dir", str(part), "--steps", "2"])
    with caplog.at_level(logging.INFO, logger="boothkit.training.trainer"):
        train_main(common + ["--output-dir", str(part), "--steps", "4", "--resume"])
    assert f"resumed from {part / 'checkpoints' / 'checkpoint-0000002.safetensors'} at step 2" in caplog.text
    a, b = weights(full / "instantbooth.safetensors"), weights(part / "instantbooth.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    last = part / "checkpoints" / "checkpoint-0000004.safetensors"
    assert adam_steps(last) == {4.0}
    assert any(not torch.equal(a[k], v) for k, v in trained_weights(last).items()), "the EMA is exported"


def test_resume_reads_the_checkpoint(setup, tmp_path):
    """Checkpoint 2 changed in a known way (every trained weight +0.5, Adam's step count 100): resuming with nothing
    left to train exports exactly the changed weights; one more step counts Adam's step 101 and stays within one
    step (lr ≤ 1e-3) of them."""
    root, cfg = setup
    out = tmp_path / "run"
    common = ["instantbooth", "--config", str(cfg), "--output-dir", str(out)]
    train_main(common + ["--steps", "2"])
    ckpt = out / "checkpoints" / "checkpoint-0000002.safetensors"
    changed = tamper(ckpt, shift=0.5, adam_step=100)
    train_main(common + ["--steps", "2", "--resume"])
    exported = weights(out / "instantbooth.safetensors")
    for k, v in changed.items():
        assert torch.equal(exported[k], v), k
    train_main(common + ["--steps", "3", "--resume"])
    assert adam_steps(out / "checkpoints" / "checkpoint-0000003.safetensors") == {101.0}
    exported = weights(out / "instantbooth.safetensors")
    assert max(float((exported[k] - v).abs().max()) for k, v in changed.items()) < 4e-3


@pytest.mark.slow
def test_sigkill_then_resume_matches(setup, tmp_path):
    """Kill the trainer process hard while it waits right after writing checkpoint 2 of 4 (a test hook holds it
    there, so the kill never races the run), resume in a new process, compare with an uninterrupted run: the resumed
    process must say it resumed at step 2."""
    root, cfg = setup
    args = ["train", "instantbooth", "--config", str(cfg), "--set", "train.checkpoint_every=1", "--steps", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = tmp_path / "killed"
    marker = tmp_path / "held"
    hold = (
        "import sys, time; from pathlib import Path\n"
        "from boothkit.training import trainer\n"
        "real = trainer.Trainer.checkpoint\n"
        "def held(self):\n"
        "    path = real(self)\n"
        "    if self.step == 2:\n"
        f"        Path({str(marker)!r}).write_text(str(path)); time.sleep(600)\n"
        "    return path\n"
        "trainer.Trainer.checkpoint = held\n"
        "from boothkit.cli import main; sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", hold] + args + ["--output-dir", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300  # generous: on a loaded machine the child's imports alone take a while
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the trainer exited before checkpoint 2: {proc.stderr.read()[-2000:]}"
        assert marker.exists(), "the trainer did not reach checkpoint 2"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == ["checkpoint-0000001.safetensors", "checkpoint-0000002.safetensors"], names
    assert not (killed / "instantbooth.safetensors").exists(), "killed before the end"
    # same thread count in every run: float reductions depend on it
    cmd = [sys.executable, "-m", "boothkit.cli"] + args
    resumed = subprocess.run(cmd + ["--output-dir", str(killed), "--resume"], env=env, check=True,
                             capture_output=True, text=True)
    assert f"resumed from {killed / 'checkpoints' / 'checkpoint-0000002.safetensors'} at step 2" in resumed.stderr
    subprocess.run(cmd + ["--output-dir", str(tmp_path / "straight")], env=env, check=True, capture_output=True)
    a = weights(killed / "instantbooth.safetensors")
    b = weights(tmp_path / "straight" / "instantbooth.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_cpu_processes_with_accelerate_launch(tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo): each process trains on its own half of the batch and the
    gradients are averaged, so 2 processes × batch 2 end where one process with batch 4 does (the regression method
    of test_trainer.py: no noise, so the two are comparable); the main process alone writes the file."""
    from pathlib import Path

    from test_trainer import Regression, Rows

    from boothkit.training.trainer import Trainer, TrainSettings

    script = tmp_path / "two.py"
    script.write_text(f"""
import logging, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
logging.basicConfig(level=logging.INFO, format="%(message)s")
from test_trainer import Regression, Rows
from boothkit.training.trainer import Trainer, TrainSettings
settings = TrainSettings(output_dir=sys.argv[1], steps=3, batch_size=2, checkpoint_every=3, max_grad_norm=0.0)
Trainer(Regression(), Rows(), settings, {{}}).train()
""")
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes: 2 (MULTI_CPU)" in done.stderr, done.stderr[-2000:]
    two = read_safetensors(out / "regression.safetensors")[0]
    one = Trainer(Regression(), Rows(), TrainSettings(output_dir=str(tmp_path / "one"), steps=3, batch_size=4,
                                                      checkpoint_every=3, max_grad_norm=0.0), {})
    one.train()
    half = Trainer(Regression(), Rows(), TrainSettings(output_dir=str(tmp_path / "half"), steps=3, batch_size=2,
                                                       checkpoint_every=3, max_grad_norm=0.0), {})
    half.train()
    for k, v in one.method.exported.items():
        assert torch.allclose(two[k], v, atol=1e-6), k
    assert max(float((half.method.exported[k] - v).abs().max()) for k, v in one.method.exported.items()) > 1e-3, \
        "one process's half of the batch alone ends elsewhere"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    root, cfg = setup
    from boothkit.training import instantbooth

    real = instantbooth.InstantBoothTraining.loss
    calls = {"n": 0}

    def flaky(self, indices, g):
        calls["n"] += 1
        loss = real(self, indices, g)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(instantbooth.InstantBoothTraining, "loss", flaky)
    out = tmp_path / "nan"
    with pytest.raises(TrainingStopped, match=r"loss became \[nan\] at step 2.*checkpoint-0000002"):
        train_main(["instantbooth", "--config", str(cfg), "--output-dir", str(out), "--steps", "4"])
    assert not (out / "instantbooth.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-0000002.safetensors"]


def test_frozen_base_is_untouched(setup, tmp_path, monkeypatch):
    """The base model the trainer trained on, compared in memory after the run (the trainer never writes the base's
    files, so reloading them proves nothing): every tensor of the UNet, text encoder, VAE and CLIP vision backbone
    equal, and nothing left trainable."""
    from boothkit.commands import train as train_cmd

    root, cfg = setup
    seen = {}
    real = train_cmd._load

    def spy(config):
        loaded = real(config)
        model, vision = loaded[0], loaded[1]
        seen["model"], seen["vision"] = model, vision
        seen["before"] = {f"{i}.{k}": v.clone() for i, part in enumerate(model.parts() + [vision])
                          for k, v in part.state_dict().items()}
        return loaded

    monkeypatch.setattr(train_cmd, "_load", spy)
    train_main(["instantbooth", "--config", str(cfg), "--output-dir", str(tmp_path / "r")])
    model, vision = seen["model"], seen["vision"]
    parts = model.parts() + [vision]
    assert len(parts) == 4, "unet, text encoder, vae, vision"
    after = {f"{i}.{k}": v for i, part in enumerate(parts) for k, v in part.state_dict().items()}
    assert after.keys() == seen["before"].keys()
    changed = [k for k, v in seen["before"].items() if not torch.equal(v, after[k])]
    assert not changed, changed[:5]
    assert not any(p.requires_grad for part in parts for p in part.parameters())


def test_dataset_errors_name_the_files(tmp_path):
    d = write_dataset(tmp_path / "d", n=4)
    (d / "001.txt").unlink()
    (d / "002.txt").write_text("   ")
    (d / "003.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "000_mask.png")
    with pytest.raises(DataError) as e:
        FolderDataset(d, 32)
    msg = str(e.value)
    assert "4 bad item(s)" in msg and "--set data.skip_bad=true" in msg
    assert "001.png: no caption" in msg and "002.png: empty caption" in msg
    assert "003.png: cannot read the image" in msg and "000_mask.png: mask is 8x8 but its image is 32x32" in msg
    write_dataset(tmp_path / "ok", n=3)
    (tmp_path / "ok" / "002.txt").unlink()
    ds = FolderDataset(tmp_path / "ok", 32, skip_bad=True)
    assert len(ds) == 2


def test_config_errors(setup, tmp_path):
    root, cfg = setup
    with pytest.raises(ValueError, match=r"\[train\] has unknown key\(s\) \['stepz'\]"):
        train_main(["instantbooth", "--config", str(cfg), "--set", "train.stepz=3"])
    with pytest.raises(ValueError, match="must look like section.key=value"):
        train_main(["instantbooth", "--config", str(cfg), "--set", "steps=3"])


def _metadata_jsonl(folder, identities):
    """Give the test folder's images identities (metadata.jsonl), so other images of one identity can condition."""
    rows = [{"file": f"{i:03d}.png", "caption": (folder / f"{i:03d}.txt").read_text(), "identity": ident}
            for i, ident in enumerate(identities)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_issue_30_options_train_and_are_written_into_the_file(setup, tmp_path):
    """augment_order (both), hue_jitter, N = 2 other images of the identity, adapters_on_uncond = False in the file,
    and init_from: a run that starts from another run's file starts from its weights."""
    root, cfg = setup
    data = write_dataset(tmp_path / "data")
    _metadata_jsonl(data, [0, 0, 0, 1, 1, 1])
    first = tmp_path / "first"
    common = ["instantbooth", "--config", str(cfg), "--set", f"data.train={data}"]
    assert train_main(common + ["--output-dir", str(first), "--set", "method.augment_order=before_crop"]) == 0
    second = tmp_path / "second"
    assert train_main(common + ["--output-dir", str(second), "--set", "method.augment_order=after_crop",
                                "--set", "method.hue_jitter=0.0", "--set", "method.num_images=2",
                                "--set", "method.same_image=false", "--set", "method.adapters_on_uncond=false",
                                "--set", f"method.init_from={first / 'instantbooth.safetensors'}",
                                "--set", "method.lr_heads=0", "--set", "method.lr_adapters=0"]) == 0
    _, meta = read_safetensors(second / "instantbooth.safetensors")
    assert meta["adapters_on_uncond"] == "false"
    settings = json.loads(meta["training"])["settings"]
    assert settings["augment_order"] == "after_crop" and settings["num_images"] == 2 and not settings["same_image"]
    ib = load_instantbooth(second / "instantbooth.safetensors", family="toy", ctx_dim=32)
    assert not ib.config.adapters_on_uncond
    a, b = weights(first / "instantbooth.safetensors"), weights(second / "instantbooth.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "learning rate 0: the init_from weights unchanged"
    with pytest.raises(ValueError, match="augment_order"):
        train_main(common + ["--output-dir", str(tmp_path / "bad"), "--set", "method.augment_order=sideways"])


def test_max_timestep_keeps_training_noise_low_and_the_start_goes_into_the_file(setup, tmp_path, monkeypatch):
    """max_timestep 0.05: every timestep the run noises at (training and validation) is below 50 of the 1000;
    start_percent_inference is the file's start_percent."""
    from diffusers import DDPMScheduler

    seen = []
    add_noise = DDPMScheduler.add_noise

    def recording(self, original, noise, timesteps):
        seen.extend(timesteps.tolist())
        return add_noise(self, original, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", recording)
    root, cfg = setup
    out = tmp_path / "low"
    assert train_main(["instantbooth", "--config", str(cfg), "--output-dir", str(out), "--set",
                       "method.max_timestep=0.05", "--set", "method.start_percent_inference=0.2"]) == 0
    assert seen and max(seen) < 50, seen
    assert load_instantbooth(out / "instantbooth.safetensors").config.start_percent == 0.2
    with pytest.raises(ValueError, match="max_timestep is a share of the noise schedule in \\(0, 1\\], got 0"):
        train_main(["instantbooth", "--config", str(cfg), "--output-dir", str(tmp_path / "bad"), "--set",
                    "method.max_timestep=0"])


def test_files_without_the_guidance_field_load_with_the_adapters_on_both_halves(setup, tmp_path):
    from boothkit.backend.files import write_safetensors

    root, cfg = setup
    out = tmp_path / "run"
    assert train_main(["instantbooth", "--config", str(cfg), "--output-dir", str(out)]) == 0
    tensors, meta = read_safetensors(out / "instantbooth.safetensors")
    assert meta["adapters_on_uncond"] == "true", "the default: the old behaviour"
    del meta["adapters_on_uncond"]
    old = write_safetensors(tmp_path / "old.safetensors", tensors, meta)
    assert load_instantbooth(old, family="toy", ctx_dim=32).config.adapters_on_uncond
