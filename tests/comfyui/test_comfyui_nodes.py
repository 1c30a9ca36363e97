"""Real ComfyUI, in process (driver.py in ComfyUI's python): the pack loads through ComfyUI's loader, the nodes run as
ComfyUI's executor runs them, and sampling goes through ComfyUI's KSampler code."""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                 reason="COMFYUI_PATH is not set: the real-ComfyUI tier needs a ComfyUI checkout "
                                        "(docs/tests.md)")]

NODE_IDS = {"BoothKitLoadInstantBooth", "BoothKitInstantBoothEncodeConcept", "BoothKitInstantBoothApply",
            "BoothKitInstantBoothCondition", "BoothKitInstantBoothTextEncode", "BoothKitInstantBoothInsertIdentifier",
            "BoothKitQuickTuneConcept", "BoothKitSaveConcept", "BoothKitLoadE4T", "BoothKitE4TTune",
            "BoothKitLoadE4TConcept", "BoothKitToyWorldLoader", "BoothKitToySubjectPhotos",
            "BoothKitInstantBoothRegion", "BoothKitConceptHook"}


def test_pack_loads_through_comfyuis_loader_without_heavy_imports(driver_run):
    results, _, _ = driver_run
    assert results["pack_loaded"], "nodes.load_custom_node returned False (see ComfyUI's log)"
    assert set(results["nodes"]) == NODE_IDS
    assert all(v["category"].startswith("BoothKit/") for v in results["nodes"].values())
    heavy = {"kornia", "diffusers", "einops"} & set(results["modules_imported_at_load"])
    assert not heavy, f"loading the pack imported {heavy}"
    loaded = results["pack_modules_before_first_run"]
    assert {"", ".nodes", ".nodes.instantbooth", ".nodes.quicktune"} <= set(loaded)
    assert all(m in ("", ".nodes") or m.startswith(".nodes.") and not m.endswith("_host") for m in loaded), \
        f"only the node definitions load at start-up; backend/ and the hosts load when a node runs: {loaded}"
    assert ".backend.preprocess" in results["pack_modules_after_run"]


def test_beta_zero_and_gamma_zero_give_the_unpatched_latent_exactly(driver_run):
    _, t, _ = driver_run
    assert torch.equal(t["gamma0"], t["plain"]), "γ=0 adapters must leave the sampled latent bit-identical"
    assert torch.equal(t["beta0"], t["plain"]), "β=0 must leave the sampled latent bit-identical"
    assert torch.equal(t["patched_window_empty"], t["plain"]), "an empty step range is no patch"
    change = (t["patched"] - t["plain"]).abs().max().item()
    assert change > 1e-2, f"β=0.3 with γ=0.5 adapters should change the latent (max change {change})"


def test_the_unpatched_model_is_unchanged_after_the_patched_one_ran(driver_run):
    results, t, _ = driver_run
    assert torch.equal(t["plain_after"], t["plain"]), "sampling the patched clone changed the input MODEL's output"
    assert results["model_options_unchanged"] and not results["original_has_middle_patch"]
    assert results["patched_has_middle_patch"]
    assert torch.equal(t["patched_again"], t["patched"]), "second run with cached f_p keys/values differs"


def test_skip_and_step_range_options_act(driver_run):
    _, t, _ = driver_run
    for name in ("patched_skip0", "patched_late"):
        assert not torch.equal(t[name], t["patched"]) and not torch.equal(t[name], t["plain"]), name


def test_condition_replaces_the_identifier_rows_by_alpha_f_c(driver_run):
    results, t, _ = driver_run
    rows = results["rows"]
    assert rows == [4], "'a photo of sks person ...': start token, a, photo, of, sks"
    cond, personal = t["cond"], t["cond_personal"]
    assert torch.allclose(personal[0, rows[0]], 0.4 * t["f_c"], atol=1e-6)
    keep = [i for i in range(cond.shape[1]) if i not in rows]
    assert torch.equal(personal[:, keep], cond[:, keep])
    # the Text Encode node inserts the identifier into "a photo of a person ..." and gives the same concept row
    assert results["inserted"] == "a photo of a sks person on the beach"
    assert torch.allclose(t["cond_personal_te"][0, 5], 0.4 * t["f_c"], atol=1e-6)


def test_condition_on_a_prompt_longer_than_77_tokens(driver_run):
    results, t, _ = driver_run
    rows = results["long_rows"]
    assert t["long_cond"].shape[1] % 77 == 0 and t["long_cond"].shape[1] > 77
    assert rows and all(r >= 77 for r in rows), f"the identifier is in the second chunk, rows {rows}"
    for r in rows:
        assert torch.allclose(t["long_personal"][0, r], 0.4 * t["f_c"], atol=1e-6)
    keep = [i for i in range(t["long_cond"].shape[1]) if i not in rows]
    assert torch.equal(t["long_personal"][:, keep], t["long_cond"][:, keep])


def test_errors_are_clear_messages(driver_run):
    r, _, _ = driver_run
    assert "missing.safetensors" in r["validate_missing"]
    assert "ib_sd2.safetensors" in r["error_load_wrong_family"] and "'sd2'" in r["error_load_wrong_family"]
    assert "ib_sd2.safetensors" in r["error_apply_wrong_family"] and "SD15" in r["error_apply_wrong_family"]
    assert "'blurry'" in r["error_no_identifier"] and "'sks'" in r["error_no_identifier"]
    assert "same text" in r["error_text_mismatch"]
    assert "is empty" in r["error_empty_mask"]
    assert "skip_levels: 'zero' is not a number" in r["error_bad_skip"]
    for key in [k for k in r if k.startswith("error_")]:
        assert r[key].startswith(("ValueError", "FormatError")), f"{key}: {r[key]}"


def test_encode_concept_with_masks_and_several_images(driver_run):
    results, t, _ = driver_run
    assert results["concept2"] == {"num_images": 2, "f_p_shape": [2 * 257, 768]}
    assert t["f_p"].shape == (257, 768) and t["f_c"].shape == (768,)
    assert results["loader_options"] == ["ib_gamma0.safetensors", "ib_random.safetensors", "ib_sd2.safetensors",
                                         "toy_instantbooth.safetensors"], "the folder's files, then the toy's"


def test_sdxl_shaped_unet_two_block_transformers(driver_run):
    """An SDXL-shaped UNet (text width 2048, pooled output, no transformer at level 0, depth-2 transformers in the
    input, middle and output blocks): every adapter is reached through (transformer_index, block_index), β=0 is
    exact, the input model stays untouched."""
    s = driver_run[0]["sdxl"]
    n = len(s["layout"]["dims"])
    assert s["layout"]["depths"] == [2, 2, 2, 2] and s["adapters_seen_per_forward"] == list(range(n))
    assert s["calls"] % n == 0 and s["calls"] > 0
    assert s["beta0_exact"] and s["plain_after_exact"] and s["patched_max_change"] > 1e-3
