"""Load E4T, E4T Tune and Save Concept in a real ComfyUI (e4t_driver.py in ComfyUI's python, nodes called as the
executor calls them, under inference mode): the tune changes exactly the offsets' target layers of the returned MODEL
and the identifier's row of the returned CLIP, the saved weight-diff file loads in stock LoraLoader with no unloaded
keys and gives the same weights, the embedding works as ``embedding:name``, and neither a finished nor a cancelled
run changes the input MODEL and CLIP."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                 reason="COMFYUI_PATH is not set: the real-ComfyUI tier needs a ComfyUI checkout "
                                        "(docs/tests.md)")]

UNTOUCHED = {"unet_state_identical": True, "model_patches_identical": True, "clip_patches_identical": True,
             "token_table_identical": True, "forward_hooks_left": 0}


def test_nodes_register_with_their_types(e4t_run):
    r, _ = e4t_run
    assert r["pack_loaded"] and r["listed"] == ["e4t_random.safetensors"]
    tune = r["schemas"]["BoothKitE4TTune"]
    assert tune["outputs"] == ["MODEL", "CLIP", "BOOTHKIT_EMBEDDING", "LORA_MODEL", "STRING", "BOOTHKIT_E4T_CONCEPT"]
    req = tune["inputs"]["required"]
    assert [req[k][0] for k in ("e4t", "model", "clip", "clip_vision", "vae", "image")] == \
        ["BOOTHKIT_E4T", "MODEL", "CLIP", "CLIP_VISION", "VAE", "IMAGE"]
    assert req["steps"][1]["default"] == 15
    assert r["schemas"]["BoothKitLoadE4T"]["outputs"] == ["BOOTHKIT_E4T"]


def test_tune_applies_offsets_and_embedding_to_clones_only(e4t_run):
    r, _ = e4t_run
    # the preparation phases first (the bar moves from the first second), then each step
    assert r["progress"] == list(range(1, r["phases"] + 3)) and r["report"].startswith("E4T finished: 2/2 steps")
    assert "resized" not in r["report"]
    assert r["embedding"] == {"keys": ["emb_params"], "shape": [1, 768], "identifier": "sks"}
    assert r["lora"] == {"num": r["num_targets"], "all_diff": True, "method": "e4t"}
    assert r["changed_are_targets"] and r["num_changed"] == r["num_targets"] > 0, \
        "exactly the target layers change"
    # every attention projection (8 per transformer block) and the 2 feed-forward layers of each block; SD1's
    # proj_in/out are 1x1 convolutions and get none
    blocks = r["num_attention"] // 8
    assert blocks > 0 and r["num_attention"] == 8 * blocks and r["num_targets"] == 10 * blocks
    assert r["clip_rows"]["others_identical"] and r["clip_rows"]["identifier_is_embedding"]
    assert r["untouched_after_run"] == UNTOUCHED


def test_saved_files_load_in_stock_nodes(e4t_run):
    r, t = e4t_run
    assert [Path(p).name for p in r["saved"]] == ["e4t_cat.safetensors", "e4t_cat_lora.safetensors"]
    assert r["lora_loader_warnings"] == [], "stock LoraLoader must load every key"
    # the stock export is fp16 weight diffs: the same weights as the tune's up to fp16 rounding of the changes
    assert r["lora_dtypes"] == ["torch.float16"] and r["max_weight_change"] > 0
    assert r["lora_loader_max_diff"] <= 2e-3 * r["max_weight_change"]
    assert torch.equal(t["cond_emb"], t["cond_e"]), "embedding:name == the tuned CLIP with the identifier"
    assert not torch.equal(t["cond_plain"], t["cond_e"])


def test_the_compact_concept_is_small_and_loads_to_the_tunes_weights(e4t_run):
    """E4T's default save: offsets, scales and embedding (no weight diffs); Load E4T Concept gives back exactly the
    weights and token row E4T Tune gave; an existing file is kept."""
    c = e4t_run[0]["concept"]
    assert c["file"] == "e4t_cat_e4t.safetensors" and c["listed"] == ["e4t_cat_e4t.safetensors"]
    assert c["bytes"] < c["stock_bytes"] / 2, (c["bytes"], c["stock_bytes"])
    assert c["weights_equal_tune"], (c["weights_differing"], c["weights_max_diff"])
    assert c["token_table_equal_tune"], c["token_max_diff"]
    assert "'sks cat'" in c["report"]
    assert "already exist" in c["again_without_overwrite"]
    assert c["hook_diffs_equal_tune"], "Load E4T Concept's concept output is E4T Tune's concept (Concept Hook)"
    assert "saved already" in c["save_loaded_error"]
    assert e4t_run[0]["untouched_after_concept"] == UNTOUCHED


def test_cancel_stops_within_a_phase_or_step_and_leaves_the_inputs(e4t_run):
    r, _ = e4t_run
    assert r["cancel_phase_error"].startswith("InterruptProcessingException") and r["cancel_phase_progress"] == [1]
    assert r["cancel_step_error"].startswith("InterruptProcessingException")
    assert r["cancel_step_progress"] == list(range(1, r["phases"] + 2))
    assert "e4t.safetensors" in r["errors"]["toy_file_on_sd15"] and "'toy'" in r["errors"]["toy_file_on_sd15"]
    assert r["untouched_at_end"] == UNTOUCHED
    assert "'orange cat' is 2 tokens" in r["errors"]["class_multi_token"]
    assert "nope.safetensors" in r["errors"]["missing_file"]


def test_tune_flip_and_cross_kv_settings_of_the_file(e4t_run):
    """A file with tune_flip on draws the mirror image of the one image as the second entry of each step; with
    tune_cross_kv off the cross-attention keys' and values' offsets keep their pre-trained values, the rest move."""
    r, _ = e4t_run
    f = r["flip"]
    assert f["report"].startswith("E4T finished: 2/2 steps")
    assert f["encoded_mirror"] == [True], "the VAE encodes the image and its mirror image"
    assert f["draws"] == [[True, True]] * 2, "each step's draws alternate the two, the next step shifted by one"
    assert f["kv"] > 0 and f["kv_kept"] and f["others_moved"]
    assert r["untouched_after_flip"] == UNTOUCHED


def test_tune_in_low_vram_sees_the_weight_patches_applied_in_the_forward(e4t_run):
    """With a LoRA loaded before E4T Tune and the model loaded partially (low-VRAM), ComfyUI applies the LoRA in each
    layer's forward, not to the stored weight: the tune must read the weight as the forward computes it, and so give
    the same losses and weight diffs as with the model fully loaded (the partial run gradient-checkpointed, as the
    node runs by default)."""
    r, _ = e4t_run
    low = r["lowvram"]
    assert low["targets_with_weight_functions"] == low["num_targets"] > 0, "every target carries the LoRA per forward"
    assert len(low["losses_low"]) == len(low["losses_full"]) == 2
    assert low["losses_low"] == pytest.approx(low["losses_full"], rel=1e-4)
    assert low["diffs_max_abs"] <= 1e-4 * low["diffs_scale"] and low["diffs_scale"] > 0
    assert low["weight_functions_left"] == 0


def test_gradient_checkpointing_gives_the_same_tune_with_less_held_for_backward(e4t_run):
    """The E4T Tune node's gradient_checkpointing: the same losses and weight diffs, far fewer bytes held between the
    forward and the backward pass, recorded in the metadata, and every layer's own forward back afterwards."""
    r, _ = e4t_run
    c = r["checkpointing"]
    assert len(c["losses"]) == 2 and c["losses_checkpointed"] == pytest.approx(c["losses"], rel=1e-5)
    assert c["diffs_max_abs"] <= 1e-5 * c["diffs_scale"] and c["diffs_scale"] > 0
    assert 0 < c["saved_bytes_checkpointed"] < 0.2 * c["saved_bytes"]
    assert '"gradient_checkpointing": true' in c["recorded"]
    assert c["forwards_after"] == c["forwards_before"] == 0, "no forward left set on a layer, cancelled runs included"
    assert r["untouched_after_checkpointing"] == UNTOUCHED
