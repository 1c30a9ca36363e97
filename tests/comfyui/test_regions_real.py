"""Several concepts in one image in a real ComfyUI (issue #29), on the toy world (regions_driver.py runs the nodes as
ComfyUI's executor does): InstantBooth Region's empty and whole-image regions against the plain paths, two chained
InstantBooth Apply nodes composing in the real UNet (a spy middle_patch appended after them sees the first
transformer block), and tuned concepts as hooks (Concept Hook + Cond Set Props with masks) against each concept's own
MODEL."""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                                 reason="COMFYUI_PATH is not set: the real-ComfyUI tier needs a ComfyUI checkout "
                                        "(docs/tests.md)")]


def test_empty_region_is_the_base_and_whole_region_the_single_concept_path(regions_run):
    results, t = regions_run
    assert results["pack_loaded"]
    assert torch.equal(t["cat_region_empty"], t["base"]), "an empty region: the unpatched latent, bit for bit"
    assert torch.equal(t["cat_region_ones"], t["cat_whole"]), "a whole-image region: today's path, bit for bit"
    assert (t["cat_whole"] - t["base"]).abs().max() > 0.1, "the concept changes the image"


def test_two_chained_applies_compose_each_in_its_region(regions_run):
    results, t = regions_run
    assert results["patches"] == {"cat_left": 1, "both": 2}, "the second Apply appends to the first one's patches"
    base, left, both = t["block0_base"], t["block0_cat_left"], t["block0_both"]
    assert base.shape[1] == 16 * 32, "the toy UNet's first transformer block: a 16x32 grid for a 32x64 image"
    cols = torch.arange(base.shape[1]) % 32
    is_left = cols < 16
    assert torch.equal(left[:, ~is_left], base[:, ~is_left]), "the left concept adds nothing on the right"
    assert (left[:, is_left] - base[:, is_left]).abs().max() > 1e-4
    assert torch.equal(both[:, is_left], left[:, is_left]), "the right concept adds nothing on the left"
    assert (both[:, ~is_left] - left[:, ~is_left]).abs().max() > 1e-4
    img = t["two_subjects"]
    assert img.shape == (1, 3, 32, 64) and torch.isfinite(img).all()


def test_tuned_concepts_as_hooks_each_region_uses_only_its_lora(regions_run):
    results, t = regions_run
    # concept A's mask 1 everywhere, B's 0: exactly A alone (its own MODEL with the LoRA as weight patches)
    assert torch.equal(t["hooks_cat_everywhere"], t["cat_tuned_alone"])
    assert (t["cat_tuned_alone"] - t["base_cat_prompt"]).abs().max() > 1e-3, "the LoRA changes the image"
    # left / right: neither concept alone
    lr = t["hooks_left_right"]
    assert (lr - t["cat_tuned_alone"]).abs().max() > 1e-3 and (lr - t["robot_tuned_alone"]).abs().max() > 1e-3
    assert torch.isfinite(t["hooks_left_right_cfg"]).all()
    assert "connect either lora" in results["hooks_error"]


def test_an_e4t_concept_as_a_hook_gives_e4t_tunes_model(regions_run):
    _, t = regions_run
    assert torch.equal(t["e4t_hook_everywhere"], t["e4t_alone"]), "the hook's weight diffs are E4T Tune's"
    assert (t["e4t_alone"] - t["base_e4t_prompt"]).abs().max() > 1e-3, "the offsets change the image"
