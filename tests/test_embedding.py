import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from boothkit.backend.embedding import Embedding, load_embedding, save_embedding
from boothkit.backend.files import FormatError, read_safetensors, write_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")



def sd1(n=1):
    return Embedding({"emb_params": torch.randn(n, 768)}, "sd1", "sks", "rare")


def sdxl(n=2):
    return Embedding({"clip_l": torch.randn(n, 768), "clip_g": torch.randn(n, 1280)}, "sdxl", "sks", "red car")


@pytest.mark.parametrize("make,keys", [(sd1, {"emb_params"}), (sdxl, {"clip_l", "clip_g"})])
def test_round_trip_keys_and_metadata(tmp_path, make, keys):
    e = make()
    path = save_embedding(tmp_path / "sks.safetensors", e, {"stage1_lr": 5e-3, "stage1_steps": 100, "resolution": 512})
    raw = load_file(path)  # what stock loaders see: only the standard keys
    assert set(raw) == keys
    for k in keys:
        assert torch.equal(raw[k], e.vectors[k])
    _, meta = read_safetensors(path)
    assert meta["format"] == "boothkit.embedding" and meta["version"] == "1" and meta["method"] == "quicktune"
    assert meta["family"] == e.family and meta["identifier"] == "sks" and meta["init_word"] == e.init_word
    assert meta["num_vectors"] == str(e.num_vectors) and json.loads(meta["widths"]) == e.widths()
    assert meta["ss_learning_rate"] == "0.005" and meta["ss_max_train_steps"] == "100"
    assert meta["modelspec.architecture"].endswith("/textual-inversion")
    back = load_embedding(path, family=e.family, widths=e.widths())
    assert back.identifier == "sks" and back.init_word == e.init_word and back.num_vectors == e.num_vectors
    for k in keys:
        assert torch.equal(back.vectors[k], e.vectors[k])


def test_toy_family_takes_its_width_from_the_model(tmp_path):
    e = Embedding({"emb_params": torch.randn(1, 48)}, "toy", "sks")
    path = save_embedding(tmp_path / "t.safetensors", e)
    assert load_embedding(path, family="toy", widths={"emb_params": 48}).vectors["emb_params"].shape == (1, 48)
    with pytest.raises(FormatError, match="'emb_params' is 48 wide, but the model's text encoder is 32"):
        load_embedding(path, widths={"emb_params": 32})


def test_refusals(tmp_path):
    path = save_embedding(tmp_path / "sks.safetensors", sd1())
    with pytest.raises(FileExistsError, match="overwrite"):
        save_embedding(path, sd1())
    save_embedding(path, sd1(), overwrite=True)
    with pytest.raises(FormatError, match="for a 'sd1' model, but the model is 'sdxl'"):
        load_embedding(path, family="sdxl")
    tensors, meta = read_safetensors(path)
    write_safetensors(tmp_path / "bad.safetensors", tensors, {**meta, "format": "boothkit.lora"})
    with pytest.raises(FormatError, match="bad.safetensors: metadata field 'format' is 'boothkit.lora'"):
        load_embedding(tmp_path / "bad.safetensors")
    write_safetensors(tmp_path / "v9.safetensors", tensors, {**meta, "version": "9"})
    with pytest.raises(FormatError, match="'version' is 9"):
        load_embedding(tmp_path / "v9.safetensors")
    with pytest.raises(FormatError, match="'emb_params' is 768 wide, but the model's text encoder is 1024 wide"):
        load_embedding(path, widths={"emb_params": 1024})
    with pytest.raises(ValueError, match=r"\[num_vectors, width\]"):
        Embedding({"emb_params": torch.randn(768)}, "sd1", "sks")
    with pytest.raises(ValueError, match="same number of vectors"):
        Embedding({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(2, 1280)}, "sdxl", "sks")


def test_stock_file_without_metadata_is_read(tmp_path):
    save_file({"emb_params": torch.randn(3, 1024)}, str(tmp_path / "thing.safetensors"))
    e = load_embedding(tmp_path / "thing.safetensors")
    assert e.family == "sd2" and e.num_vectors == 3 and e.identifier == "thing"
    save_file({"string_to_param": torch.randn(1, 768)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(FormatError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "odd.safetensors")


COMFY_LOAD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
from comfy.sd1_clip import load_embed
out = {}
for name, size, key in [("sks1", 768, "clip_l"), ("sksxl", 768, "clip_l"), ("sksxl", 1280, "clip_g")]:
    e = load_embed(name, sys.argv[2], size, key)
    out[f"{name}/{key}"] = e.tolist()
print(json.dumps(out))
"""


@pytest.mark.comfyui
@pytest.mark.slow
def test_comfyui_load_embed_reads_both_layouts(tmp_path):
    """Stock ComfyUI's ``load_embed`` (what ``embedding:name`` uses) returns our vectors for SD1 and SDXL files."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("COMFYUI_PATH not set")
    e1, ex = sd1(2), sdxl(2)
    save_embedding(tmp_path / "sks1.safetensors", e1)
    save_embedding(tmp_path / "sksxl.safetensors", ex)
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(root).parent / "venv" / "bin" / "python")
    python = python if Path(python).exists() else sys.executable
    out = subprocess.run([python, "-c", COMFY_LOAD, root, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got["sks1/clip_l"]), e1.vectors["emb_params"])
    torch.testing.assert_close(torch.tensor(got["sksxl/clip_l"]), ex.vectors["clip_l"])
    torch.testing.assert_close(torch.tensor(got["sksxl/clip_g"]), ex.vectors["clip_g"])
