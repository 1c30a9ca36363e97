import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_clip_vision, tiny_sd_folder, write_image_folder

from boothkit.backend.formats import load_instantbooth, read_safetensors
from boothkit.training.cli import main as train_main
from boothkit.training.data import DataError, FolderDataset
from boothkit.training.trainer import TrainingStopped


def write_dataset(folder, n=6, size=32):
    return write_image_folder(folder, n, size, (4, 24, 6, 28), ["a photo of a cat on grass", "a cat on the beach"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    sd = tiny_sd_folder(root / "sd", with_vae=True)
    tiny_clip_vision().save_pretrained(root / "vision")
    data = write_dataset(root / "data")
    val = write_dataset(root / "val", n=2)
    cfg = root / "ib.toml"
    cfg.write_text(f"""
[model]
base = "{sd}"
clip_vision = "{root / 'vision'}"
[data]
train = "{data}"
validation = "{val}"
[method]
category = "cat"
lr_adapters = 1e-3
sample_steps = 2
validation_images = 1
[train]
batch_size = 2
steps = 2
checkpoint_every = 2
log_every = 1
""")
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


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(setup, tmp_path):
    root, cfg = setup
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["instantbooth", "--config", str(cfg), "--set", "train.checkpoint_every=2"]
    train_main(common + ["--output-dir", str(full), "--steps", "4"])
    train_main(common + ["--output-dir", str(part), "--steps", "2"])
    train_main(common + ["--output-dir", str(part), "--steps", "4", "--resume"])
    a, b = weights(full / "instantbooth.safetensors"), weights(part / "instantbooth.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_sigkill_then_resume_matches(setup, tmp_path):
    """Kill the trainer process hard right after a checkpoint, resume, and compare with an uninterrupted run."""
    root, cfg = setup
    args = ["instantbooth", "--config", str(cfg), "--set", "train.checkpoint_every=1", "--steps", "4"]
    cmd = [sys.executable, "-m", "boothkit.cli", "train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + args + ["--output-dir", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "checkpoint-0000002.safetensors").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "instantbooth.safetensors").exists(), "killed before the end"
    # same thread count in every run: float reductions depend on it
    subprocess.run(cmd + args + ["--output-dir", str(killed), "--resume"], env=env, check=True, capture_output=True)
    subprocess.run(cmd + args + ["--output-dir", str(tmp_path / "straight")], env=env, check=True,
                   capture_output=True)
    a = weights(killed / "instantbooth.safetensors")
    b = weights(tmp_path / "straight" / "instantbooth.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_cpu_processes_with_accelerate_launch(setup, tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo): both processes train on their own shard, gradients are
    averaged, the main process writes the same kind of file."""
    root, cfg = setup
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "boothkit.cli", "train",
           "instantbooth", "--config", str(cfg), "--output-dir", str(out), "--steps", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes: 2 (MULTI_CPU)" in done.stderr, done.stderr[-2000:]
    ib = load_instantbooth(out / "instantbooth.safetensors", family="toy", ctx_dim=32)
    assert any(float(a.gate) != 0 for a in ib.adapters)
    assert json.loads(read_safetensors(out / "instantbooth.safetensors")[1]["training"])["config"]["train"]["steps"] == 2


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


def test_frozen_base_is_untouched(setup, tmp_path):
    root, cfg = setup
    from boothkit.hosts.loading import load_sd

    before = {k: v.clone() for k, v in load_sd(root / "sd").unet.state_dict().items()}
    train_main(["instantbooth", "--config", str(cfg), "--output-dir", str(tmp_path / "r")])
    after = load_sd(root / "sd").unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dataset_errors_name_the_files(tmp_path):
    d = write_dataset(tmp_path / "d", n=4)
    (d / "001.txt").unlink()
    (d / "002.txt").write_text("   ")
    (d / "003.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "000_mask.png")
    with pytest.raises(DataError) as e:
        FolderDataset(d, 32)
    msg = str(e.value)
    assert "4 bad item(s)" in msg and "--skip-bad" in msg
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


def test_files_without_the_guidance_field_load_with_the_adapters_on_both_halves(setup, tmp_path):
    from boothkit.backend.formats import write_safetensors

    root, cfg = setup
    out = tmp_path / "run"
    assert train_main(["instantbooth", "--config", str(cfg), "--output-dir", str(out)]) == 0
    tensors, meta = read_safetensors(out / "instantbooth.safetensors")
    assert meta["adapters_on_uncond"] == "true", "the default: the old behaviour"
    del meta["adapters_on_uncond"]
    old = write_safetensors(tmp_path / "old.safetensors", tensors, meta)
    assert load_instantbooth(old, family="toy", ctx_dim=32).config.adapters_on_uncond
