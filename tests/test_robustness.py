"""Bad input answered at every depth (docs/robustness.md): files whose metadata lies, non-finite tensors, image
bombs and odd image modes, outputs that would be replaced, numeric options out of range."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert report["tried"] > 300 and report["refused"] > report["tried"] // 2


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
    old = os.umask(umask)
    try:
        path = write_safetensors(tmp_path / "x.safetensors", {"w": torch.ones(2)}, {})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask
