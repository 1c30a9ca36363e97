"""InstantBooth Apply, E4T Tune and Quick-Tune Concept in a real ComfyUI whose UNet is stored and computes in fp16,
then bf16, as on a GPU (half_driver.py; the CPU's cast to fp32 switched off). The patched copy samples finite latents
that differ from the input model's; both tuning nodes run their steps with finite losses and results, and the tuned
copy's weights change in the model's own dtype (E4T's elementwise offsets survive fp16 storage); the input model is
left as it was."""
from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                 reason="COMFYUI_PATH is not set: the real-ComfyUI tier needs a ComfyUI checkout "
                                        "(docs/tests.md)")]

STEPS = 2  # as in the driver


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_tuning_nodes_run_on_a_half_precision_unet(half_run, dtype):
    r = half_run[dtype]
    torch_dtype = {"fp16": "torch.float16", "bf16": "torch.bfloat16"}[dtype]
    assert r["unet_dtype"] == torch_dtype and r["manual_cast"] == "None", "the UNet must compute in half precision"
    ib = r["instantbooth"]
    assert ib["finite"] and ib["changed"] > 0 and ib["plain_unchanged"]
    e = r["e4t"]
    assert e["report"].startswith(f"E4T finished: {STEPS}/{STEPS} steps")
    assert len(e["losses"]) == STEPS and e["losses_finite"] and e["diffs_finite"] and e["embedding_finite"]
    assert e["num_changed"] == e["num_targets"] > 0 and e["changed_dtype"] == torch_dtype, \
        "every target's weight changes, in the model's dtype"
    q = r["quicktune"]
    assert f"stage 1 (embedding): {STEPS}/{STEPS} steps" in q["report"]
    assert f"stage 2 (denoiser LoRA): {STEPS}/{STEPS} steps" in q["report"]
    assert q["embedding_finite"] and q["lora_finite"] and q["lora_up_moved"] and q["num_changed"] > 0
    assert r["input_unet_identical"] and r["forwards_left"] == 0
