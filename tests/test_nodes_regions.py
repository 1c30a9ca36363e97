"""Several InstantBooth concepts in one image, ComfyUI side (issue #29), without ComfyUI: the InstantBooth Region and
Concept Hook schemas, the region on the middle_patch (nothing added outside it, an empty region bit-identical, a
whole-image region equal to no region, at every block's grid from the latent's shape), two chained Apply patches,
and each concept token at its own identifier. ComfyUI's modules are stubbed (tests/comfy_stubs.py); the real tier
runs the same nodes in ComfyUI (tests/comfyui/test_regions_real.py)."""
from __future__ import annotations

import pytest
import torch
from test_nodes_schema import (LAYOUT, FakeClip, FakeModel, booth_concept, comfy_like_unet, make_patch,  # noqa: F401
                               models_dir, pack, schemas, tiny_config)

from boothkit.backend.instantbooth import Concept, InstantBooth
from boothkit.backend.regions import block_grid

pytestmark = pytest.mark.usefixtures("one_thread")

# LAYOUT: transformer 0 (level 0, width 8), transformer 1 (level 1, width 16, two blocks), transformer 2 (level 0)
SHAPE = [2, 4, 4, 6]  # latent [B, C, H, W]: level 0 is a 4x6 grid (24 tokens), level 1 a 2x3 grid (6 tokens)
LEFT = (0.0, 0.0, 0.5, 1.0)


def opts(transformer_index, block_index=0, shape=SHAPE):
    return {"transformer_index": transformer_index, "block_index": block_index, "original_shape": list(shape)}


def grid_x(tokens, width, seed=0):
    return torch.randn(2, tokens, width, generator=torch.Generator().manual_seed(seed))


def test_region_node_schema(pack):
    s = schemas(pack)
    region = s["BoothKitInstantBoothRegion"]
    assert region.category == "BoothKit/InstantBooth" and region.display_name == "InstantBooth Region"
    inputs = {i.id: i for i in region.inputs}
    assert [i.id for i in region.inputs] == ["concept", "mask", "x0", "y0", "x1", "y1", "identifier"]
    assert inputs["concept"].io_type == "BOOTHKIT_INSTANTBOOTH_CONCEPT" and not inputs["concept"].optional
    assert inputs["mask"].io_type == "MASK" and inputs["mask"].optional
    assert [inputs[k].kwargs["default"] for k in ("x0", "y0", "x1", "y1")] == [0.0, 0.0, 1.0, 1.0]
    assert inputs["identifier"].io_type == "STRING" and inputs["identifier"].kwargs["default"] == ""
    assert [o.io_type for o in region.outputs] == ["BOOTHKIT_INSTANTBOOTH_CONCEPT"]
    hook = s["BoothKitConceptHook"]
    assert hook.category == "BoothKit/concepts" and [o.io_type for o in hook.outputs] == ["HOOKS"]
    assert {i.id: i.io_type for i in hook.inputs} == {"lora": "LORA_MODEL", "e4t_concept": "BOOTHKIT_E4T_CONCEPT",
                                                      "model": "MODEL", "strength": "FLOAT", "prev_hooks": "HOOKS"}
    assert all(i.optional for i in hook.inputs if i.id != "strength")


def test_region_node_makes_the_region_and_the_identifier(pack):
    nodes, ib_nodes, host = pack
    concept = booth_concept(host)
    out = ib_nodes.InstantBoothRegion.execute(concept, 0.0, 0.0, 1.0, 1.0, "").args[0]
    assert out.region is None and out.concept is concept.concept, "the whole image and no mask: no region"
    out = ib_nodes.InstantBoothRegion.execute(concept, *LEFT, " zwx ").args[0]
    assert out.region.box == LEFT and out.region.mask is None and out.concept.identifier == "zwx"
    assert torch.equal(out.concept.f_c, concept.concept.f_c) and concept.concept.identifier == "sks", "input unchanged"
    mask = torch.zeros(1, 8, 12)
    mask[:, :, 6:] = 1
    out = ib_nodes.InstantBoothRegion.execute(concept, *LEFT, "", mask=mask).args[0]
    assert out.region.mask.shape == (8, 12) and out.concept.identifier == "sks"
    assert out.region.at(4, 6).sum() == 0, "mask (right) times box (left): nothing"
    with pytest.raises(ValueError, match="batch of 2 masks"):
        host.with_region(concept, torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="region box"):
        host.with_region(concept, None, (0.6, 0.0, 0.4, 1.0))
    with pytest.raises(ValueError, match="one word"):
        host.with_region(concept, None, LEFT, "zwx robot")


@pytest.mark.parametrize("where", [(0, 0, 8, 24), (1, 1, 16, 6)])
def test_region_patch_adds_nothing_outside_and_the_same_inside(pack, where):
    _, _, host = pack
    t_index, b_index, width, tokens = where
    plain, _, _ = make_patch(host)
    region = host.Region(box=LEFT)
    patched, _, _ = make_patch(host, region=region)
    x = grid_x(tokens, width)
    full = plain(x, opts(t_index, b_index))
    got = patched(x, opts(t_index, b_index))
    h, w = block_grid(tokens, SHAPE[2], SHAPE[3])
    cover = region.at(h, w).flatten()
    inside, outside = cover == 1, cover == 0
    assert inside.any() and outside.any()
    assert torch.equal(got[:, outside], x[:, outside]), "outside the region: the input, bit for bit"
    assert torch.equal(got[:, inside], full[:, inside]), "inside the region: the unlimited patch"
    assert not torch.equal(got[:, inside], x[:, inside])
    edge = (cover > 0) & (cover < 1)  # a 2x3 grid: the box's edge halves the middle column
    if edge.any():
        assert torch.allclose(got[:, edge] - x[:, edge], 0.5 * (full[:, edge] - x[:, edge]), atol=1e-6)


def test_soft_region_weighs_the_term(pack):
    _, _, host = pack
    mask = torch.full((4, 6), 0.25)
    plain, _, _ = make_patch(host)
    soft, _, _ = make_patch(host, region=host.Region(mask=mask))
    x = grid_x(24, 8)
    assert torch.allclose(soft(x, opts(0)) - x, 0.25 * (plain(x, opts(0)) - x), atol=1e-6)


def test_empty_region_is_bit_identical_and_whole_region_equals_no_region(pack):
    _, _, host = pack
    unet = comfy_like_unet()
    layout = host.unet_adapter_layout(unet)
    model = FakeModel(unet, 32)
    booth = host.BoothModel(InstantBooth(tiny_config(layout)), "t.safetensors")
    concept = host.BoothConcept(Concept(torch.zeros(32), torch.randn(10, 32), "sks", "person", 2), booth)
    empty = host.with_region(concept, torch.zeros(1, 16, 16))
    assert host.apply(model, empty, 0.3).model_options == model.model_options, "an empty region adds no patch"
    # and the patch itself, given an empty region, returns its input bit for bit
    patch, _, _ = make_patch(host, region=host.Region(mask=torch.zeros(4, 6)))
    x = grid_x(24, 8)
    assert torch.equal(patch(x, opts(0)), x)
    # a whole-image mask: the same as no region, bit for bit, at every block
    plain, _, _ = make_patch(host)
    whole, _, _ = make_patch(host, region=host.Region(mask=torch.ones(9, 13)))
    for t_index, b_index, width, tokens in [(0, 0, 8, 24), (1, 0, 16, 6), (1, 1, 16, 6), (2, 0, 8, 24)]:
        x = grid_x(tokens, width, t_index)
        assert torch.equal(whole(x, opts(t_index, b_index)), plain(x, opts(t_index, b_index)))
    # the region reaches the patch through apply
    (patch,) = host.apply(model, host.with_region(concept, None, LEFT), 0.3
                          ).model_options["transformer_options"]["patches"]["middle_patch"]
    assert patch.region.box == LEFT


def test_region_needs_the_latent_shape(pack):
    _, _, host = pack
    patch, _, _ = make_patch(host, region=host.Region(box=LEFT))
    with pytest.raises(ValueError, match="original_shape"):
        patch(grid_x(24, 8), {"transformer_index": 0, "block_index": 0})


def test_two_chained_applies_compose_each_on_its_side(pack):
    """Two InstantBooth Apply nodes in series: the second clone holds both patches (ComfyUI's list appends), and in a
    block the left concept changes only the left tokens, the right one only the right tokens."""
    _, _, host = pack
    unet = comfy_like_unet()
    layout = host.unet_adapter_layout(unet)
    model = FakeModel(unet, 32)
    torch.manual_seed(1)
    booth = host.BoothModel(InstantBooth(tiny_config(layout)), "t.safetensors")
    with torch.no_grad():
        for a in booth.model.adapters:
            a.gate.fill_(0.5)
    cat = host.BoothConcept(Concept(torch.zeros(32), torch.randn(10, 32), "sks", "cat", 2), booth)
    robot = host.BoothConcept(Concept(torch.zeros(32), torch.randn(10, 32), "sks", "robot", 2), booth)
    left = host.apply(model, host.with_region(cat, None, LEFT), 0.3)
    both = host.apply(left, host.with_region(robot, None, (0.5, 0.0, 1.0, 1.0), "zwx"), 0.3)
    first, second = both.model_options["transformer_options"]["patches"]["middle_patch"]
    assert len(left.model_options["transformer_options"]["patches"]["middle_patch"]) == 1, "the first clone kept"
    x = grid_x(24, 8)
    o = opts(0, shape=[2, 4, 4, 6])
    out = second(first(x, o), o)
    cols = torch.arange(24) % 6
    assert torch.equal(out[:, cols < 3], first(x, o)[:, cols < 3]), "the right concept adds nothing on the left"
    assert not torch.equal(out[:, cols < 3], x[:, cols < 3]) and not torch.equal(out[:, cols >= 3], x[:, cols >= 3])
    # on the right: only the second concept's term (its adapter attends over the whole block, left side included)
    assert torch.equal(first(x, o)[:, cols >= 3], x[:, cols >= 3])


def test_each_concept_token_goes_in_at_its_own_identifier(pack):
    """Two Condition nodes in series on one prompt: the file's identifier (sks) and a Region's (zwx)."""
    _, _, host = pack
    clip = FakeClip()
    cat = booth_concept(host)
    robot = host.with_region(booth_concept(host), None, (0.5, 0.0, 1.0, 1.0), "zwx")
    robot.concept.f_c = robot.concept.f_c * 10  # tell the two apart
    text = "a photo of a sks cat with a zwx robot"
    cond = torch.randn(1, 77, 8)
    once = host.condition([[cond, {}]], clip, text, cat, 1.0)
    (out,) = host.condition(once, clip, text, robot, 1.0)
    assert host.identifier_rows(clip, text, "sks")[0] == [5] and host.identifier_rows(clip, text, "zwx")[0] == [9]
    assert torch.equal(out[0][0, 5], cat.concept.f_c) and torch.equal(out[0][0, 9], robot.concept.f_c)
    keep = [i for i in range(77) if i not in (5, 9)]
    assert torch.equal(out[0][:, keep], cond[:, keep])
    assert host.with_identifier("a photo of a person", robot) == "a photo of a zwx person"


def test_apply_refuses_a_reversed_share_and_adds_nothing_for_an_empty_one(pack):
    _, _, host = pack
    unet = comfy_like_unet()
    model = FakeModel(unet, 32)
    booth = host.BoothModel(InstantBooth(tiny_config(host.unet_adapter_layout(unet))), "t.safetensors")
    concept = host.BoothConcept(Concept(torch.zeros(32), torch.randn(10, 32), "sks", "person", 2), booth)
    with pytest.raises(ValueError, match=r"start_percent 0.6 and end_percent 0.4 must satisfy 0 <= start <= end"):
        host.apply(model, concept, 0.3, start_percent=0.6, end_percent=0.4)
    with pytest.raises(ValueError, match="start_percent -0.1"):
        host.apply(model, concept, 0.3, start_percent=-0.1)
    assert host.apply(model, concept, 0.3, 0.5, 0.5).model_options == model.model_options, "an empty share: no patch"
    assert host.apply(model, concept, 0.3).model_options != model.model_options
