"""Quick-Tune Concept and Save Concept in a real ComfyUI (quicktune_driver.py in ComfyUI's python, nodes called as the
executor calls them, under inference mode): the returned MODEL/CLIP carry exactly the learned LoRA and vector, the
saved files load in stock LoraLoader (no unloaded keys) and as ``embedding:name`` in stock CLIPTextEncode with the
same result, and neither a finished nor a cancelled run changes anything of the input MODEL and CLIP."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                 reason="COMFYUI_PATH is not set: the real-ComfyUI tier needs a ComfyUI checkout "
                                        "(docs/tests.md)")]

STEPS = 3  # per stage, as in the driver
UNTOUCHED = {"unet_state_identical": True, "model_patches_identical": True, "model_options_identical": True,
             "clip_patches_identical": True, "token_table_identical": True, "forward_hooks_left": 0,
             "weight_functions_left": 0}


def test_nodes_register_with_their_types(qt_run):
    r, _, _ = qt_run
    assert r["pack_loaded"]
    tune, save = r["schemas"]["BoothKitQuickTuneConcept"], r["schemas"]["BoothKitSaveConcept"]
    assert tune["outputs"] == ["MODEL", "CLIP", "BOOTHKIT_EMBEDDING", "LORA_MODEL", "STRING"]
    assert [tune["inputs"]["required"][k][0] for k in ("model", "clip", "vae", "images")] == \
        ["MODEL", "CLIP", "VAE", "IMAGE"]
    assert tune["inputs"]["optional"]["mask"][0] == "MASK"
    assert save["output_node"] and set(save["inputs"]["optional"]) == {"embedding", "lora", "e4t_concept"}
    assert save["inputs"]["optional"]["lora"][0] == "LORA_MODEL"
    assert save["inputs"]["optional"]["embedding"][0] == "BOOTHKIT_EMBEDDING"
    assert save["inputs"]["required"]["overwrite"][1]["default"] is False


def test_training_runs_both_stages_on_inference_mode_weights(qt_run):
    r, t, _ = qt_run
    assert r["weights_are_inference_tensors"], "the driver must load models as ComfyUI's executor does"
    assert r["progress"] == list(range(1, 2 * STEPS + 1)), "one progress update per step over both stages"
    assert f"stage 1 (embedding): {STEPS}/{STEPS} steps" in r["report"]
    assert f"stage 2 (denoiser LoRA): {STEPS}/{STEPS} steps" in r["report"]
    assert "resized 2 image(s) of size 64x72 to 64x64" in r["report"], "differently sized photos come with a note"
    assert r["embedding"] == {"family": "sd1", "identifier": "sks", "init_word": "cat", "keys": ["emb_params"],
                              "shape": [1, 768], "metadata_format": "boothkit.embedding"}
    moved = (t["vector"][0] - t["init_row"]).abs().max().item()
    assert moved > 1e-3, f"stage 1 must move the vector away from the init word's row (max change {moved})"
    assert not torch.equal(t["vector"][0], t["identifier_row"])
    assert r["lora"]["metadata"] == {"format": "boothkit.lora", "method": "quicktune", "family": "sd1",
                                     "identifier": "sks", "ss_network_dim": "4", "ss_steps": str(STEPS)}
    assert all(k.startswith("lora_unet_down_blocks_") for k in r["lora"]["keys_sample"]), \
        "kohya's diffusers-style names, as `boothkit tune` writes them"


def test_the_input_model_and_clip_are_never_changed(qt_run):
    r, _, _ = qt_run
    for when in ("untouched_after_run", "untouched_after_use", "untouched_at_end"):
        assert r[when] == UNTOUCHED, when
    assert r["requires_grad_kept_run"], "every weight's requires_grad flag is put back"


def test_returned_model_differs_only_in_the_lora_layers(qt_run):
    r, _, _ = qt_run
    changed = r["qt_changed_keys"]
    assert len(changed) == r["lora_file"]["layers"] == r["lora_loader_patched_keys"], \
        "every LoRA layer changes its weight, no other weight changes"
    assert all(".transformer_blocks." in k or k.endswith((".proj_in.weight", ".proj_out.weight")) for k in changed)


def test_returned_clip_changes_only_the_identifier_row(qt_run):
    r, _, _ = qt_run
    assert r["qt_clip"]["other_rows_identical"], "the rest of the vocabulary is bit-identical"
    assert r["qt_clip"]["identifier_row_is_vector"], "the identifier's row is exactly the learned vector"


def test_saved_lora_loads_in_stock_loraloader_like_the_returned_model(qt_run):
    r, _, _ = qt_run
    assert r["lora_loader_warnings"] == [], "stock LoraLoader: no 'lora key not loaded' / 'NOT LOADED'"
    assert r["lora_loader_patched_keys"] == r["lora_file"]["layers"] == 84
    assert r["lora_loader_changed_keys"] == r["qt_changed_keys"]
    assert r["lora_loader_equals_quick_tune"], "LoraLoader + the file gives the returned MODEL's weights exactly"
    assert r["max_weight_change"] > 1e-5


def test_saved_embedding_encodes_like_the_returned_clip(qt_run):
    r, t, _ = qt_run
    assert torch.equal(t["cond_emb"], t["cond_qt"]), \
        "'embedding:sks_cat' with the stock CLIP must equal 'sks' with the returned CLIP"
    assert (t["cond_qt"] - t["cond_plain"]).abs().max() > 1e-2, "the learned vector changes the conditioning"
    assert r["embedding_file"] == {"identifier": "sks", "equal": True, "format": "boothkit.embedding"}


def test_save_concept_names_refuses_overwrite_and_stays_in_its_folder(qt_run):
    r, _, work = qt_run
    assert [Path(p).relative_to(work).as_posix() for p in r["saved"]] == \
        ["embeddings/sks_cat.safetensors", "loras/sks_cat_lora.safetensors"]
    assert r["resaved"] == r["saved"]
    assert r["error_exists"].startswith("FileExistsError") and "overwrite" in r["error_exists"]
    assert "nothing was written" in r["error_exists"]
    assert Path(r["traversal"]) == work / "embeddings" / "outside.safetensors", "'../../outside' stays inside"
    assert r["files"] == {"embeddings": ["outside.safetensors", "sks_cat.safetensors"],
                          "loras": ["sks_cat_lora.safetensors"]}
    assert "nothing to save" in r["error_nothing"]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_cancel_stops_within_one_step_and_leaves_everything_as_it_was(qt_run, stage):
    r, _, _ = qt_run
    c = r[f"cancel_{stage}"]
    assert c["error"].startswith("InterruptProcessingException"), c["error"]
    assert c["progress"] == list(range(1, c["k"] + 1)), "no step after the one during which Cancel came"
    assert {k: c[k] for k in UNTOUCHED} == UNTOUCHED
    assert r[f"requires_grad_kept_{stage}"]


def test_nan_loss_stops_and_keeps_the_last_good_lora(qt_run):
    r, _, _ = qt_run
    n = r["nan"]
    assert "stopped (nan)" in n["report"] and "loss is nan at step 2" in n["report"]
    assert n["steps"] == "1" and n["lora_finite"] and n["lora_changed"], "the LoRA after step 1, finite"


def test_bad_input_gives_clear_messages(qt_run):
    e = qt_run[0]["errors"]
    assert "no images" in e["zero_images"]
    assert "'qzxvbkw' is 6 tokens" in e["identifier_multi_token"] and "single token" in e["identifier_multi_token"]
    assert "init word 'orange cat' is 2 tokens" in e["init_word_multi_token"]
    assert "equals the class noun" in e["identifier_is_class"]
    assert "mask 0 is empty" in e["empty_mask"]
    assert "nothing to do" in e["no_steps"]
    assert all(v.startswith("ValueError") for v in e.values()), e


def test_sdxl_learns_both_text_encoders_and_feeds_the_pooled_output(qt_run):
    """An SDXL-shaped UNet with a real two-encoder SDXL CLIP (3 layers each): one vector per encoder, both tables
    patched, the saved clip_l/clip_g file encodes (cond and pooled output) exactly like the returned CLIP, and the
    LoRA loads in stock LoraLoader without a warning."""
    s = qt_run[0]["sdxl"]
    assert "stage 1 (embedding): 2/2 steps" in s["report"] and "stage 2 (denoiser LoRA): 2/2 steps" in s["report"]
    assert s["embedding_shapes"] == {"clip_l": [1, 768], "clip_g": [1, 1280]}
    assert s["cond_equal"] and s["pooled_equal"], "'embedding:sdxl_cat' with the stock CLIP equals 'sks' returned"
    assert s["cond_changed"] > 1e-2
    assert s["lora_loader_warnings"] == [] and s["lora_loader_patched_keys"] == s["lora_layers"] == s["changed_keys"]
    assert s["lora_loader_equals_quick_tune"]
    assert s["unet_state_identical"] and s["token_tables_identical"], "the input SDXL MODEL and CLIP are unchanged"


def test_gradient_checkpointing_gives_the_same_run_with_less_held_for_backward(qt_run):
    """The node's gradient_checkpointing: both stages give the same losses, embedding and LoRA, far fewer bytes are held
    between the forward and the backward pass, the LoRA's kohya metadata says so, and every layer's own forward is
    back afterwards."""
    r, _, _ = qt_run
    c = r["checkpointing"]
    assert [len(x) for x in c["losses"]] == [STEPS, STEPS]
    for plain, ckpt in zip(c["losses"], c["losses_checkpointed"]):
        assert ckpt == pytest.approx(plain, rel=1e-5)
    assert c["vector_max_abs"] <= 1e-6 and c["lora_max_abs"] <= 1e-5 * c["lora_scale"] and c["lora_scale"] > 0
    assert 0 < c["saved_bytes_checkpointed"] < 0.2 * c["saved_bytes"]
    assert c["recorded"] == ["False", "True"]
    assert c["forwards_after"] == c["forwards_before"] == 0, "no forward left set on a layer, cancelled runs included"
    assert r["untouched_after_checkpointing"] == UNTOUCHED
