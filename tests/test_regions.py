"""Several concepts in one image (issue #29, first part): an InstantBooth concept's adapter term limited to a region,
at every block's resolution, in the diffusers host."""
import pytest
import torch
from test_diffusers_host import make_instantbooth, run
from tiny_models import tiny_unet

from boothkit.backend.regions import block_grid, box_mask, check_mask, token_mask
from boothkit.hosts.diffusers.instantbooth import InstantBoothHooks, transformer_blocks


def test_box_masks_cover_each_pixel_by_its_overlap_and_boxes_that_meet_share_nothing():
    left, right = box_mask((0, 0, 0.5, 1), 8, 8), box_mask((0.5, 0, 1, 1), 8, 8)
    assert torch.equal(left + right, torch.ones(8, 8)) and float((left * right).sum()) == 0
    assert box_mask((0.1, 0, 0.3, 1), 1, 10)[0].tolist() == pytest.approx([0, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    assert box_mask((0.15, 0, 0.3, 1), 1, 10)[0, 1] == pytest.approx(0.5), "a pixel half inside weighs half"
    with pytest.raises(ValueError, match="x0 < x1"):
        box_mask((0.6, 0, 0.4, 1), 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_mask(torch.full((4, 4), 2.0))


@pytest.mark.parametrize("side", [64, 16, 8, 4, 2])
def test_the_region_at_every_resolution_level_keeps_its_place_and_area(side):
    """A left-third box seen by a block of side x side tokens: the token grid's left columns, the area preserved."""
    mask = box_mask((0, 0, 1 / 3, 1), 64, 64)
    m = token_mask(mask, side * side, 64, 64).view(side, side)
    assert torch.allclose(m.mean(), mask.mean(), atol=1e-6), "area resampling keeps the region's share"
    assert torch.equal(m, m[:1].expand(side, side)), "rows alike: the box spans the whole height"
    assert bool((m[:, : side // 3] == 1).all()) and bool((m[:, -(side // 2):] == 0).all())


def test_the_adapter_term_stays_inside_the_region_in_every_block():
    """In one forward pass, each block's attn1 output is recorded before and after the adapter's hook: the term it
    adds is zero on the tokens outside the region and non-zero inside, at every block's resolution."""
    unet = tiny_unet()
    ib = make_instantbooth(unet, 32, gate=0.8)
    region = box_mask((0, 0, 0.5, 1), 16, 16)
    before, after = [], []
    attn1 = [b.attn1 for b, _, _ in transformer_blocks(unet)]
    handles = [m.register_forward_hook(lambda m, a, out: before.append(out)) for m in attn1]  # run before ours
    try:
        with InstantBoothHooks(unet, ib, torch.randn(10, 32), beta=1.0, region=region):
            handles += [m.register_forward_hook(lambda m, a, out: after.append(out)) for m in attn1]  # after ours
            run(unet, 32)
    finally:
        for h in handles:
            h.remove()
    assert len(before) == len(after) == len(attn1)
    sides = set()
    for raw, patched in zip(before, after):
        side = int(raw.shape[1] ** 0.5)
        sides.add(side)
        term = (patched - raw).view(raw.shape[0], side, side, -1)
        assert float(term[:, :, side // 2:].abs().max()) == 0, f"nothing outside the region ({side}x{side} block)"
        assert float(term[:, :, : side // 2].abs().max()) > 0, f"the concept inside it ({side}x{side} block)"
    assert len(sides) > 1, "blocks at more than one resolution were checked"


@pytest.mark.parametrize("rows,cols", [(12, 20), (9, 13)])
def test_a_square_region_on_a_wide_or_odd_latent_is_read_at_each_blocks_own_grid(rows, cols):
    """The region's grid comes from the latent the UNet runs on, not from the mask's aspect: a square left-half mask
    on a 12x20 latent (whose 240 tokens the mask's square aspect would read as 15x16) or a 9x13 one (levels 9x13, 5x7,
    3x4: odd sides round up) still leaves every block's right half alone."""
    unet = tiny_unet()
    ib = make_instantbooth(unet, 32, gate=0.8)
    before, after = [], []
    attn1 = [b.attn1 for b, _, _ in transformer_blocks(unet)]
    handles = [m.register_forward_hook(lambda m, a, out: before.append(out)) for m in attn1]
    x = torch.randn(2, 4, rows, cols, generator=torch.Generator().manual_seed(0))
    try:
        with InstantBoothHooks(unet, ib, torch.randn(10, 32), beta=1.0, region=box_mask((0, 0, 0.5, 1), 16, 16)):
            handles += [m.register_forward_hook(lambda m, a, out: after.append(out)) for m in attn1]
            with torch.no_grad():
                unet(x, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 77, 32)).sample
    finally:
        for h in handles:
            h.remove()
    grids = set()
    for raw, patched in zip(before, after):
        h, w = block_grid(raw.shape[1], rows, cols)
        grids.add((h, w))
        term = (patched - raw).view(raw.shape[0], h, w, -1)
        inside = token_mask(box_mask((0, 0, 0.5, 1), 16, 16), raw.shape[1], rows, cols).view(h, w)
        assert float(term[:, inside == 0].abs().max()) == 0, f"nothing outside the region ({h}x{w} block)"
        assert float(term[:, inside == 1].abs().max()) > 0, f"the concept inside it ({h}x{w} block)"
    assert len(grids) > 1


def test_an_empty_region_changes_nothing_and_a_full_one_is_the_single_concept_path():
    unet = tiny_unet()
    ib = make_instantbooth(unet, 32, gate=0.8)
    f_p = torch.randn(10, 32)
    base = run(unet, 32)
    with InstantBoothHooks(unet, ib, f_p, beta=1.0, region=torch.zeros(16, 16)):
        assert torch.equal(run(unet, 32), base), "an empty region adds nothing: bit-identical"
    with InstantBoothHooks(unet, ib, f_p, beta=1.0):
        whole = run(unet, 32)
    with InstantBoothHooks(unet, ib, f_p, beta=1.0, region=torch.ones(16, 16)):
        assert torch.equal(run(unet, 32), whole), "one concept over the whole image is today's path"
    assert not torch.equal(whole, base)


def test_two_concepts_in_two_regions_each_change_their_own_side():
    """Two concepts (two files, two f_p) side by side; each region's first block output moves only where its own
    concept acts, so swapping one concept's f_p changes only its side of that block."""
    unet = tiny_unet()
    a, b = make_instantbooth(unet, 32, gate=0.8), make_instantbooth(unet, 32, gate=0.8)
    fa, fb, fc = torch.randn(10, 32), torch.randn(10, 32), torch.randn(10, 32)
    left, right = box_mask((0, 0, 0.5, 1), 16, 16), box_mask((0.5, 0, 1, 1), 16, 16)
    first = transformer_blocks(unet)[0][0]
    seen = []
    for f_right in (fb, fc):
        with InstantBoothHooks(unet, a, fa, beta=1.0, region=left), \
                InstantBoothHooks(unet, b, f_right, beta=1.0, region=right):
            rec = first.attn1.register_forward_hook(lambda m, a_, out: seen.append(out))  # after both concepts
            try:
                run(unet, 32)
            finally:
                rec.remove()
    one, two = (s.view(s.shape[0], 16, 16, -1) for s in seen)
    assert torch.equal(one[:, :, :8], two[:, :, :8]), "the left concept's side is the same"
    assert not torch.equal(one[:, :, 8:], two[:, :, 8:]), "the right concept's side follows its own f_p"


def test_block_grid_follows_the_unets_rounding():
    assert block_grid(24, 4, 6) == (4, 6) and block_grid(6, 4, 6) == (2, 3)
    assert block_grid(12, 5, 7) == (3, 4) and block_grid(4, 5, 7) == (2, 2)  # odd sides round up
    assert block_grid(8 * 12, 64, 96) == (8, 12)
    with pytest.raises(ValueError, match="no level"):
        block_grid(7, 4, 6)
