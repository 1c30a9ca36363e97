"""Fixtures of the real-ComfyUI tier (pytest -m comfyui, needs COMFYUI_PATH).

pytest runs in the BoothKit environment (which has diffusers for the cross-host check); everything that needs
ComfyUI runs in ComfyUI's own python in subprocesses: $COMFYUI_PYTHON, else the venv next to or inside the ComfyUI
checkout (../venv, venv, .venv), else this python. Test models (random-weight SD1.5-shaped checkpoint, ViT-L/14 CLIP
vision, ~1.1 GB) are built once by make_models.py into $BOOTHKIT_COMFY_TEST_MODELS (default
~/.cache/boothkit/comfyui-test-models) and reused; the InstantBooth files and everything else go to pytest's tmp."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from boothkit.bench.comfy_overhead import comfyui_python  # one lookup of ComfyUI's python for bench and tests
from comfy_server import PACK_FOLDER

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="session")
def comfy():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set")
    path = Path(path).resolve()
    if not (path / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no main.py)")
    return {"path": path, "python": comfyui_python(path)}


def run_logged(cmd, what: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if out.returncode != 0:
        pytest.fail(f"{what} failed (exit {out.returncode}):\n{out.stderr[-4000:]}\n{out.stdout[-2000:]}")
    return out


@pytest.fixture(scope="session")
def comfy_models(comfy):
    """models dir with checkpoints/boothkit_tiny_sd15.safetensors and clip_vision/boothkit_vitl14.safetensors."""
    default = Path.home() / ".cache" / "boothkit" / "comfyui-test-models"
    out = Path(os.environ.get("BOOTHKIT_COMFY_TEST_MODELS", default))
    run_logged([comfy["python"], str(HERE.parents[1] / "bench" / "comfy_support" / "make_models.py"), "--comfyui", str(comfy["path"]), "--out", str(out)],
               "building the test models", timeout=900)
    return out


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory, comfy_models):
    """A ComfyUI --base-directory: models (the test models + instantbooth/), custom_nodes/ComfyUI-BoothKit -> this repo
    (a hyphenated folder, as a git clone names it),
    input/, output/, temp/, user/. Nothing is written into the ComfyUI checkout."""
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "models").mkdir()
    for sub in ("checkpoints", "clip_vision"):
        (base / "models" / sub).symlink_to(comfy_models / sub, target_is_directory=True)
    for sub in ("models/instantbooth", "custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    return base


@pytest.fixture(scope="session")
def driver_run(comfy, comfy_base, tmp_path_factory):
    """tests/comfyui/driver.py run once in ComfyUI's python: (results dict, tensors dict, InstantBooth dir)."""
    out = tmp_path_factory.mktemp("driver_out")
    ib_dir = comfy_base / "models" / "instantbooth"
    run_logged([comfy["python"], str(HERE / "driver.py"), "--comfyui", str(comfy["path"]),
                "--pack", str(comfy_base / "custom_nodes" / PACK_FOLDER), "--models", str(comfy_base / "models"),
                "--instantbooth-dir", str(ib_dir), "--out", str(out)],
               "the ComfyUI driver", timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    from safetensors.torch import load_file

    results = json.loads((out / "results.json").read_text())
    return results, load_file(out / "tensors.safetensors"), ib_dir


def run_tuning_driver(comfy, comfy_models, comfy_base, script: str, work, out, what: str) -> None:
    """A tuning driver (node_runner.start's arguments) run in ComfyUI's python, one thread, offline."""
    run_logged([comfy["python"], str(HERE / script), "--comfyui", str(comfy["path"]),
                "--pack", str(comfy_base / "custom_nodes" / PACK_FOLDER), "--models", str(comfy_models),
                "--work", str(work), "--out", str(out)],
               what, timeout=900, cwd=comfy["path"], env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="session")
def e4t_run(comfy, comfy_models, comfy_base, tmp_path_factory):
    """tests/comfyui/e4t_driver.py run once in ComfyUI's python: (results, tensors). Its random E4T file, embedding
    and LoRA go into the base directory's models/ (e4t/, embeddings/, loras/), where the server test finds them."""
    out = tmp_path_factory.mktemp("e4t_out")
    run_tuning_driver(comfy, comfy_models, comfy_base, "e4t_driver.py", comfy_base / "models", out, "the E4T driver")
    from safetensors.torch import load_file

    return json.loads((out / "results.json").read_text()), load_file(out / "tensors.safetensors")


@pytest.fixture(scope="session")
def qt_run(comfy, comfy_models, comfy_base, tmp_path_factory):
    """tests/comfyui/quicktune_driver.py run once: (results, tensors, work dir with embeddings/ and loras/)."""
    work, out = tmp_path_factory.mktemp("qt_work"), tmp_path_factory.mktemp("qt_out")
    run_tuning_driver(comfy, comfy_models, comfy_base, "quicktune_driver.py", work, out, "the quick-tune driver")
    from safetensors.torch import load_file

    return json.loads((out / "results.json").read_text()), load_file(out / "tensors.safetensors"), work


@pytest.fixture(scope="session")
def half_run(comfy, comfy_models, comfy_base, tmp_path_factory):
    """tests/comfyui/half_driver.py run once: its results."""
    work, out = tmp_path_factory.mktemp("half_work"), tmp_path_factory.mktemp("half_out")
    run_tuning_driver(comfy, comfy_models, comfy_base, "half_driver.py", work, out, "the half-precision driver")
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="session")
def regions_run(comfy, comfy_models, comfy_base, tmp_path_factory):
    """tests/comfyui/regions_driver.py run once (the toy world, several concepts in one image): (results, tensors)."""
    work, out = tmp_path_factory.mktemp("regions_work"), tmp_path_factory.mktemp("regions_out")
    run_tuning_driver(comfy, comfy_models, comfy_base, "regions_driver.py", work, out, "the regions driver")
    from safetensors.torch import load_file

    return json.loads((out / "results.json").read_text()), load_file(out / "tensors.safetensors")
