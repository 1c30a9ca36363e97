"""`boothkit bench comfy-memory` runs in a real ComfyUI (the test tier's tiny models, 64 px, one step of each method)
and hands back its figures: the JSON last line, both runs finished. Memory is not asserted here (a bench, not a
timed test); the same-result and bytes-held checks of gradient checkpointing are in test_e4t_real.py and
test_quicktune_real.py."""
from __future__ import annotations

import json
import os

import pytest

from boothkit.bench import comfy_memory

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                 reason="COMFYUI_PATH is not set: the real-ComfyUI tier needs a ComfyUI checkout "
                                        "(docs/tests.md)")]


@pytest.mark.parametrize("method", ["e4t", "quicktune"])
def test_bench_comfy_memory_prints_its_figures(comfy, comfy_models, method, capsys):
    assert comfy_memory.main(["--method", method, "--shape", "tiny", "--resolution", "64", "--steps", "1",
                              "--photos", "2", "--threads", "1", "--comfyui", str(comfy["path"]),
                              "--python", comfy["python"], "--models", str(comfy_models)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["method"] == method and figures["device"] == "cpu"
    assert figures["ratio"] == pytest.approx(figures["above_gb_on"] / figures["above_gb_off"], abs=1e-3)
    assert figures["peak_gb_on"] > 0 and figures["peak_gb_off"] > 0 and figures["wall_s_on"] > 0
    table = "\n".join(lines)
    assert "gradient checkpointing" in table and "\noff " in table and "\non " in table
