"""Bad input answered at every depth (docs/robustness.md): files whose metadata lies, non-finite tensors, image
bombs and odd image modes, outputs that would be replaced, numeric options out of range."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from boothkit.backend.files import FormatError, NonFiniteError, read_safetensors, write_safetensors
from boothkit.toyworld.store import verified

HERE = Path(__file__).resolve().parent


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(__import__("boothkit").__file__).parents[1]),
                                                   env.get("PYTHONPATH", "")] if p)
    return env


def test_fuzzed_metadata_of_the_shipped_files_is_refused_cleanly_within_2gb(tmp_path):
    """Every one-field metadata mutation of instantbooth.safetensors and e4t.safetensors either loads or is refused
    with a one-line message naming the file, with the address space capped at 2 GB above the imported interpreter
    (a loader that built a module from a lying width would die here)."""
    r = subprocess.run([sys.executable, "-W", "ignore", str(HERE / "fuzz_files.py"), str(tmp_path), "2048"],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["failures"] == []
    assert report["tried"] > 200 and report["refused"] > report["tried"] // 2


def _mutate(src, dst, tensors=None, **meta_changes):
    t = load_file(str(src)) if tensors is None else tensors
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    meta.update(meta_changes)
    save_file(t, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("field,value", [("vision_token_dim", "10000000"), ("vision_token_dim", "65536"),
                                         ("ctx_dim", "65536"), ("tokens_per_image", "100000")])
def test_instantbooth_lying_dimension_is_refused_before_building(tmp_path, field, value):
    from boothkit.backend.instantbooth import load_instantbooth

    bad = _mutate(verified("instantbooth.safetensors"), tmp_path / "ib.safetensors", **{field: value})
    with pytest.raises(FormatError) as e:
        load_instantbooth(bad, family="toy")
    assert str(e.value).startswith(str(bad)) and (field in str(e.value) or "shape" in str(e.value))


def test_e4t_lying_config_is_refused_before_building(tmp_path):
    from boothkit.backend.e4t import load_e4t

    src = verified("e4t.safetensors")
    _, meta = read_safetensors(src)
    config = json.loads(meta["config"])
    config["target_shapes"][0] = [60000, 60000]  # 3.6e9 parameters per offset if built
    bad = _mutate(src, tmp_path / "e4t.safetensors", config=json.dumps(config))
    with pytest.raises(FormatError, match=r"tensor '.*' has shape .* implies"):
        load_e4t(bad, family="toy")


def test_non_finite_weights_are_refused_on_load_naming_the_tensor(tmp_path):
    from boothkit.backend.e4t import load_e4t
    from boothkit.backend.instantbooth import load_instantbooth

    for name, loader in (("instantbooth", load_instantbooth), ("e4t", load_e4t)):
        src = verified(f"{name}.safetensors")
        t = load_file(str(src))
        key = sorted(k for k, v in t.items() if v.is_floating_point())[0]
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("inf") if name == "e4t" else float("nan")
        bad = _mutate(src, tmp_path / f"{name}.safetensors", tensors=t)
        with pytest.raises(NonFiniteError, match=key.replace(".", r"\.")):
            loader(bad, family="toy")


def test_write_safetensors_refuses_non_finite_and_keeps_the_old_file(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", {"w": torch.ones(3)}, {"format": "t"})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteError, match=r"x\.safetensors.*'?w"):
            write_safetensors(path, {"w": torch.tensor([1.0, bad, 2.0])}, {"format": "t"})
    assert torch.equal(load_file(str(path))["w"], torch.ones(3))
    assert not list(tmp_path.glob(".*tmp"))
    write_safetensors(tmp_path / "ints.safetensors", {"i": torch.arange(3)}, {})  # integer tensors pass


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path, umask):
    from boothkit.backend.imageio import save_png

    old = os.umask(umask)
    try:
        path = write_safetensors(tmp_path / "x.safetensors", {"w": torch.ones(2)}, {})
        png = save_png(torch.zeros(3, 8, 8), tmp_path / "x.png")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask
    assert (png.stat().st_mode & 0o777) == 0o666 & ~umask


# ----------------------------------------------------------------------------------------------------------------
# commands: one-line errors, exit 2, nothing written


def run_cli(argv, capsys):
    """(exit code, stderr lines) of `boothkit ARGV` run in-process."""
    from boothkit.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def one_line_error(argv, capsys, *needles):
    code, err = run_cli(argv, capsys)
    errors = [line for line in err if line.startswith(f"boothkit {argv[0]}") and ": error: " in line]
    assert code == 2 and len(errors) == 1, (code, err)
    assert "Traceback" not in "\n".join(err)
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


GEN = ["generate", "--images", "x.png", "--prompt", "a photo of a cat"]
TUNE = ["tune", "--images", "d", "--class-noun", "cat", "--out", "o"]


@pytest.mark.parametrize("argv,needle", [
    (GEN + ["--steps", "0"], "--steps"), (GEN + ["--steps", "-3"], "--steps"),
    (GEN + ["--num-images", "0"], "--num-images"), (GEN + ["--alpha", "nan"], "--alpha"),
    (GEN + ["--beta", "inf"], "--beta"), (GEN + ["--guidance", "-1"], "--guidance"),
    (["eval", "--steps", "0"], "--steps"), (["eval", "--subjects", "0"], "--subjects"),
    (["eval", "--subjects", "-2"], "--subjects"), (["eval", "--beta", "nan"], "--beta"),
    (["demo", "--subject", "-1"], "--subject"), (["demo", "--steps", "0"], "--steps"),
    (TUNE + ["--alpha", "nan"], "--alpha"), (TUNE + ["--stage1-lr", "inf"], "--stage1-lr"),
    (TUNE + ["--rank", "0"], "--rank"), (TUNE + ["--stage2-steps", "-1"], "--stage2-steps"),
    (["train", "instantbooth", "--config", "c.toml", "--steps", "0"], "--steps"),
    (["toyworld", "export", "--out", "o", "--n", "0"], "--n"),
])
def test_numeric_options_are_checked_when_parsed(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(argv, capsys, f"argument {needle}")
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_generate_out_is_not_replaced_and_not_written_under_a_file(tmp_path, capsys):
    existing = tmp_path / "out.png"
    existing.write_bytes(b"keep")
    one_line_error(GEN + ["--out", str(existing)], capsys, str(existing), "--overwrite")
    assert existing.read_bytes() == b"keep"
    one_line_error(GEN + ["--out", str(existing / "x.png")], capsys, "is a file")


def test_tune_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(["tune", "--images", str(tmp_path), "--class-noun", "cat", "--out", str(f)], capsys,
                   str(f), "is a file")


def test_eval_tables_are_read_before_the_evaluation(tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "eval.json").write_text("{not json")
    one_line_error(["eval", "--methods", "base", "--update", "--out", str(out)], capsys, "eval.json", "not an eval")
    assert (out / "eval.json").read_text() == "{not json", "the table is left as it was"
    (out / "eval.json").write_text(json.dumps({"settings": {}, "methods": {}}))
    one_line_error(["eval", "--methods", "base", "--out", str(out)], capsys, "exists", "--update", "--overwrite")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"settings": {"subject_ids": [1, 2]}, "methods": {"a": {"identity_per_subject": [0.1]}}}))
    one_line_error(["eval", "--paired", "a", "b", "--tables", str(bad)], capsys, str(bad), "identity_per_subject")
    one_line_error(["eval", "--methods", "instantbooth", "--base-from", str(bad), "--out", str(tmp_path / "b")],
                   capsys, str(bad), "identity_per_subject")
    one_line_error(["eval", "--methods", "instantbooth", "--base-from", str(tmp_path / "none.json"),
                    "--out", str(tmp_path / "b")], capsys, "none.json", "no such table")
    one_line_error(["eval", "--methods", "instantbooth", "--update", "--base-from", str(bad), "--out", str(out)],
                   capsys, "--base-from", "--update")
    assert not (tmp_path / "b").exists()


def test_eval_refuses_to_write_non_finite_scores():
    from boothkit.commands.eval import nonfinite_fields

    assert nonfinite_fields({"methods": {"a": {"identity": float("nan"), "per": [0.1, float("inf")]}}}) == \
        ["methods.a.identity", "methods.a.per[1]"]
    assert nonfinite_fields({"a": 1.0, "b": [0, 2.5], "c": "x"}) == []


# ----------------------------------------------------------------------------------------------------------------
# images


def png_header_only(path, width, height):
    """A PNG whose header claims width x height (1-bit greyscale) with a few bytes of data: an image bomb that costs
    nothing to write."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [8193, 12000, 30000])
def test_image_bombs_are_refused_before_decoding(tmp_path, side):
    from boothkit.backend.imageio import read_images_and_masks

    png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(ValueError, match=rf"bomb\.png: image (is {side}x{side}|too large)"):
        read_images_and_masks(tmp_path)


def test_large_photos_are_reduced_on_load_keeping_their_aspect_and_values(tmp_path, caplog, monkeypatch):
    from PIL import Image

    from boothkit.backend import imageio

    monkeypatch.setattr(imageio, "MAX_KEPT", 60 * 40)  # the 16.8 MP kept, scaled down so that the test is small
    Image.new("L", (300, 200), 77).save(tmp_path / "big.png")
    with caplog.at_level("INFO"):
        t, alpha = imageio.read_image_alpha(tmp_path / "big.png")
    assert tuple(t.shape) == (3, 40, 60), "reduced to fit, aspect kept"
    assert torch.allclose(t, torch.full_like(t, 77 / 255), atol=1e-6) and alpha is None
    assert "reduced on load to 60x40" in caplog.text
    Image.fromarray(np.full((200, 300), 40000, np.uint16)).save(tmp_path / "big16.png")
    t, _ = imageio.read_image_alpha(tmp_path / "big16.png")
    assert tuple(t.shape) == (3, 40, 60) and torch.allclose(t, torch.full_like(t, 40000 / 65535), atol=1e-4)
    rgba = np.zeros((200, 300, 4), np.uint8)
    rgba[:100, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "cut.png")
    _, alpha = imageio.read_image_alpha(tmp_path / "cut.png")
    assert tuple(alpha.shape) == (1, 40, 60) and float(alpha[0, :18].min()) > 0.99 and float(alpha[0, 22:].max()) < 0.01


def test_an_image_bomb_in_a_training_folder_is_skipped_with_skip_bad(tmp_path):
    from PIL import Image

    from boothkit.training.data import DataError, FolderDataset

    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a cat")
    png_header_only(tmp_path / "2.png", 30000, 30000)
    (tmp_path / "2.txt").write_text("a cat")
    with pytest.raises(DataError, match=r"(?s)1 bad item.*--set data\.skip_bad=true.*2\.png: image too large"):
        FolderDataset(tmp_path, 32)
    ds = FolderDataset(tmp_path, 32, skip_bad=True)
    assert len(ds) == 2


def test_16_bit_png_keeps_its_values(tmp_path):
    from PIL import Image

    from boothkit.backend.imageio import read_images_and_masks

    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(values).save(tmp_path / "a.png")
    images, _ = read_images_and_masks(tmp_path)
    assert images.shape == (1, 3, 32, 32)
    assert torch.allclose(images[0, 0], torch.from_numpy(values / 65535.0).float(), atol=1e-6)
    assert torch.equal(images[0, 0], images[0, 2]) and float(images.mean()) < 0.6, "not clipped to white"


def test_alpha_is_the_mask_where_no_mask_file_is_given(tmp_path, caplog):
    from PIL import Image

    from boothkit.backend.imageio import read_images_and_masks

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[4:20, 8:24, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with caplog.at_level("INFO"):
        images, masks = read_images_and_masks(tmp_path)
    assert "alpha channel as the subject's mask" in caplog.text
    want = torch.zeros(32, 32)
    want[4:20, 8:24] = 1
    assert torch.equal(masks[0, 0], want)
    assert torch.allclose(images[0, 1], torch.full((32, 32), 200 / 255))
    # a mask file wins over the alpha
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "a_mask.png")
    _, masks = read_images_and_masks(tmp_path)
    assert bool((masks == 1).all())


def test_tiny_photo_and_non_finite_png_are_refused(tmp_path):
    from PIL import Image

    from boothkit.backend.imageio import read_images_and_masks, save_png

    Image.new("RGB", (1, 1)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a\.png: image is 1x1, expected at least 8x8"):
        read_images_and_masks(tmp_path)
    with pytest.raises(NonFiniteError, match=r"out\.png.*holds 3 NaN"):
        save_png(torch.tensor([[[0.5, float("nan")]]]).expand(3, 1, 2), tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


# ----------------------------------------------------------------------------------------------------------------
# tune loop and trainer guards


def test_tune_loop_undoes_a_step_that_makes_the_parameters_non_finite():
    from boothkit.backend.tune import NAN, tune_loop

    p = torch.nn.Parameter(torch.zeros(1))
    seen = []

    def loss(step):
        seen.append(p.detach().clone())
        return p.sum()  # gradient 1: Adam moves p by about -lr per step, finite loss until p is -inf

    r = tune_loop([p], loss, steps=40, lr=3e37, max_grad_norm=0)
    assert r.status == NAN and "parameters became non-finite" in r.message
    assert bool(torch.isfinite(p).all()), "the last finite state is kept"
    assert torch.equal(p.detach(), seen[-1]) and r.steps == len(seen) - 1 >= 2
    with pytest.raises(ValueError, match="NaN or infinity before the first step"):
        tune_loop([torch.nn.Parameter(torch.tensor([float("inf")]))], lambda s: p.sum(), steps=1, lr=1e-3)


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    from tiny_models import training_world, write_config, write_image_folder

    root = tmp_path_factory.mktemp("robust_train")
    data = write_image_folder(root / "data", 4, 32, (4, 24, 6, 28), ["a photo of a cat on grass"])
    cfg = write_config(root / "ib.toml", *training_world(root, data),
                       method=dict(category="cat", lr_adapters=1e-3, sample_steps=1),
                       train=dict(batch_size=2, steps=2, checkpoint_every=1, keep_last=5))
    return root, cfg


def test_a_fresh_run_refuses_a_folder_of_another_run(train_setup, tmp_path, capsys):
    from boothkit.training.checkpoint import list_checkpoints

    root, cfg = train_setup
    out = tmp_path / "run"
    base = ["train", "instantbooth", "--config", str(cfg), "--output-dir", str(out)]
    assert run_cli(base + ["--steps", "3"], capsys)[0] == 0
    old = read_safetensors(out / "instantbooth.safetensors")[0]
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "checkpoint-0000003.safetensors"
    # a fresh run there: refused before anything is loaded, the old run's files untouched
    one_line_error(base + ["--steps", "2"], capsys, str(out), "3 checkpoint(s)", "--resume", "--overwrite")
    assert len(list_checkpoints(out / "checkpoints")) == 3
    one_line_error(base + ["--set", "method.lr_heads=NaN"], capsys, "lr_heads", "finite")
    one_line_error(base + ["--set", "train.warmup_steps=nan"], capsys, "warmup_steps", "expected a number")
    # --overwrite: the old checkpoints go, so keep_last and --resume see this run only
    assert run_cli(base + ["--steps", "2", "--overwrite"], capsys)[0] == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-0000001.safetensors",
                                                                      "checkpoint-0000002.safetensors"]
    new = read_safetensors(out / "instantbooth.safetensors")[0]
    assert any(not torch.equal(old[k], new[k]) for k in old)


def test_weights_going_non_finite_stop_the_run_and_no_checkpoint_holds_them(train_setup, tmp_path, monkeypatch):
    from boothkit.commands.train import main as train_main
    from boothkit.training.checkpoint import list_checkpoints, load_checkpoint
    from boothkit.training.trainer import TrainingStopped

    root, cfg = train_setup
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *a, **k):  # the loss stays finite; the step writes NaN into one weight at step 2
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingStopped, match=r"weights became non-finite at step 2.*checkpoint-0000001"):
        train_main(["instantbooth", "--config", str(cfg), "--output-dir", str(out), "--steps", "3"])
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-0000001.safetensors"]
    assert not (out / "instantbooth.safetensors").exists()
    step, weights, *_ = load_checkpoint(out / "checkpoints" / "checkpoint-0000001.safetensors")
    assert step == 1 and all(bool(torch.isfinite(v).all()) for v in weights.values())


def test_checkpoint_errors_name_the_file_and_field(train_setup, tmp_path, capsys):
    from boothkit.training.checkpoint import load_checkpoint

    root, cfg = train_setup
    out = tmp_path / "run"
    base = ["train", "instantbooth", "--config", str(cfg), "--output-dir", str(out)]
    assert run_cli(base + ["--steps", "1"], capsys)[0] == 0
    ck = out / "checkpoints" / "checkpoint-0000001.safetensors"
    tensors, meta = read_safetensors(ck)
    cases = {
        "step": ({k: v for k, v in meta.items() if k != "step"}, tensors, "'step' is None"),
        "absurd": ({**meta, "step": "99999999999"}, tensors, "'step' is 99999999999"),
        "json": ({**meta, "optimizer": "{oops"}, tensors, "'optimizer' is not JSON"),
        "no optimizer": (meta, {k: v for k, v in tensors.items() if not k.startswith("optimizer.")},
                         "no optimizer state"),
    }
    for name, (m, t, needle) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_file(t, str(bad), metadata=m)
        with pytest.raises(FormatError) as e:
            load_checkpoint(bad)
        assert str(e.value).startswith(str(bad)) and needle in str(e.value), (name, str(e.value))
    # a weight of the wrong shape, through --resume
    key = next(k for k in tensors if k.startswith("weights.") and tensors[k].ndim == 2)
    t = dict(tensors)
    t[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
    save_file(t, str(ck), metadata=meta)
    one_line_error(base + ["--steps", "2", "--resume"], capsys, str(ck), key[len("weights."):], "shape")


# ----------------------------------------------------------------------------------------------------------------
# node loaders and model folders


def test_node_loaders_refuse_lying_and_non_finite_files_naming_them(tmp_path):
    from comfy_stubs import stubbed_comfy

    models = tmp_path / "models"
    (models / "instantbooth").mkdir(parents=True)
    (models / "e4t").mkdir(parents=True)
    _mutate(verified("instantbooth.safetensors"), models / "instantbooth" / "bomb.safetensors",
            vision_token_dim="65536")
    src = verified("e4t.safetensors")
    t = load_file(str(src))
    key = sorted(t)[0]
    t[key] = torch.full_like(t[key], float("inf"))
    _mutate(src, models / "e4t" / "inf.safetensors", tensors=t)
    with stubbed_comfy(models, folders=("instantbooth", "e4t")):
        import boothkit.nodes.e4t as e4t_nodes
        import boothkit.nodes.instantbooth as ib_nodes

        with pytest.raises(FormatError, match=r"bomb\.safetensors: tensor '.*' has shape .* implies"):
            ib_nodes.LoadInstantBooth.execute(instantbooth_name="bomb.safetensors")
        with pytest.raises(NonFiniteError, match=rf"inf\.safetensors: .*{key}"):
            e4t_nodes.LoadE4T.execute(e4t_name="inf.safetensors")


def test_model_folders_load_safetensors_only_and_errors_are_one_line(tmp_path):
    from tiny_models import tiny_clip_vision

    from boothkit.hosts.diffusers.loading import load_clip_vision, load_sd

    folder = tmp_path / "vision"
    m = tiny_clip_vision()
    m.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(m.state_dict(), folder / "pytorch_model.bin")  # a pickle: never to be loaded
    with pytest.raises(ValueError) as e:
        load_clip_vision(folder)
    assert str(e.value).startswith(str(folder)) and "safetensors" in str(e.value) and "\n" not in str(e.value)
    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_sd(corrupt, config=tmp_path)


def test_embeddings_and_loras_with_non_finite_or_malformed_tensors_are_refused(tmp_path):
    from boothkit.backend.embedding import load_embedding
    from boothkit.backend.lora import load_lora

    emb = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.tensor([[0.1] * 767 + [float("inf")]])}, str(emb))
    with pytest.raises(NonFiniteError, match=r"emb\.safetensors: 1 tensor\(s\) hold NaN or infinity \(emb_params\)"):
        load_embedding(emb)
    kohya = {"ss_network_module": "networks.lora"}
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    good = {f"{layer}.lora_down.weight": torch.randn(4, 8), f"{layer}.lora_up.weight": torch.randn(8, 4)}
    nan = tmp_path / "nan.safetensors"
    save_file({**good, f"{layer}.alpha": torch.tensor(float("nan"))}, str(nan), metadata=kohya)
    with pytest.raises(NonFiniteError, match=rf"nan\.safetensors: .*{layer}\.alpha"):
        load_lora(nan)
    vec = tmp_path / "vec.safetensors"
    save_file({**good, f"{layer}.alpha": torch.ones(3)}, str(vec), metadata=kohya)
    with pytest.raises(FormatError, match=rf"vec\.safetensors: tensor '{layer}\.alpha' .*expected one finite number"):
        load_lora(vec)
    save_file({**good, f"{layer}.alpha": torch.tensor(2.0)}, str(vec), metadata=kohya)
    assert load_lora(vec).lora.pairs  # the same file, well-formed, loads
