"""Several concepts in one image (issue #29): several InstantBooth concepts on one UNet, region compositing of the
noise prediction (hosts/diffusers/regions.py), non-square sampling, `boothkit generate --concept` and
`boothkit eval --pairs`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_diffusers_host import make_instantbooth, run
from tiny_models import tiny_sd_folder, tiny_unet

from boothkit.backend.lora import LoRA
from boothkit.backend.regions import box_mask, composite_weights, token_mask
from boothkit.commands.generate import main as generate
from boothkit.hosts.diffusers.instantbooth import InstantBoothHooks, transformer_blocks
from boothkit.hosts.diffusers.loading import load_sd
from boothkit.hosts.diffusers.quicktune import tuned
from boothkit.hosts.diffusers.regions import Region, sample_regions
from boothkit.hosts.diffusers.sampling import sample


@pytest.mark.parametrize("rows,cols", [(32, 64), (16, 32), (8, 16), (4, 8), (2, 4)])
def test_a_wide_region_at_every_resolution_level_keeps_its_place_and_area(rows, cols):
    mask = box_mask((0, 0, 0.5, 1), 32, 64)
    m = token_mask(mask, rows * cols, 32, 64).view(rows, cols)
    assert torch.allclose(m.mean(), mask.mean(), atol=1e-6)
    assert bool((m[:, : cols // 2] == 1).all()) and bool((m[:, cols // 2:] == 0).all()), "left half, at 2:1"


def test_composite_weights_share_overlaps_and_leave_the_rest_to_the_background():
    w, rest = composite_weights([box_mask((0, 0, 0.75, 1), 4, 4), box_mask((0.25, 0, 1, 1), 4, 4)], 4, 4)
    assert rest is None and torch.equal(w[0] + w[1], torch.ones(4, 4)) and float(w[0][0, 1]) == 0.5
    w, rest = composite_weights([box_mask((0, 0, 0.5, 1), 4, 4)], 4, 4)
    assert torch.equal(rest, 1 - w[0])


def test_two_instantbooth_concepts_on_one_unet_each_see_the_block_s_own_output():
    """The first block's output with both concepts is the sum of each one's term: neither adapter reads the other's
    term (with the hooks chained, the second concept's adapter would see y + the first's term)."""
    unet = tiny_unet()
    a, b = make_instantbooth(unet, 32, gate=0.8), make_instantbooth(unet, 32, gate=0.8)
    fa, fb = torch.randn(10, 32), torch.randn(10, 32)
    left, right = box_mask((0, 0, 0.75, 1), 16, 16), box_mask((0.25, 0, 1, 1), 16, 16)  # overlapping: both act
    first = transformer_blocks(unet)[0][0].attn1
    outs = {}
    for name, concepts in {"none": [], "a": [(a, fa, left)], "b": [(b, fb, right)],
                           "ab": [(a, fa, left), (b, fb, right)], "ba": [(b, fb, right), (a, fa, left)]}.items():
        hooks = [InstantBoothHooks(unet, ib, f, beta=1.0, region=r) for ib, f, r in concepts]
        rec = first.register_forward_hook(lambda m, a_, out: outs.setdefault(name, out))  # after the concepts
        try:
            run(unet, 32)
        finally:
            rec.remove()
            for h in hooks:
                h.remove()
    summed = outs["a"] + outs["b"] - outs["none"]
    assert torch.allclose(outs["ab"], summed, atol=1e-6) and torch.allclose(outs["ba"], summed, atol=1e-6)
    assert not torch.allclose(outs["ab"], outs["a"], atol=1e-3), "the second concept adds its term"


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    return load_sd(tiny_sd_folder(tmp_path_factory.mktemp("sd"), with_vae=False))


def _conds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 77, 32, generator=g) for _ in range(3)]


def _lora(unet, seed):
    lora = LoRA.for_model(unet, rank=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return lora


def test_one_region_over_the_whole_image_is_the_single_concept_path_and_an_empty_one_changes_nothing(pixel_model):
    m = pixel_model
    ca, cb, u = _conds()
    lora = _lora(m.unet, 1)
    with tuned(m, lora=lora):
        single = sample(m, ca, u, seed=3, steps=3, guidance=3.0)
    whole = Region(ca, torch.ones(16, 16), lambda: tuned(m, lora=lora))
    empty = Region(cb, torch.zeros(16, 16), lambda: tuned(m, lora=_lora(m.unet, 2)))
    assert torch.equal(sample_regions(m, [whole], u, seed=3, steps=3, guidance=3.0), single), "bit-identical"
    assert torch.equal(sample_regions(m, [whole, empty], u, seed=3, steps=3, guidance=3.0), single), \
        "a concept with an empty region is never computed"
    assert not torch.equal(sample(m, ca, u, seed=3, steps=3, guidance=3.0), single), "the LoRA matters"


def test_each_region_s_prediction_sees_only_its_own_lora(pixel_model):
    """One DDIM step is elementwise in ε, so after it the left half is the run with concept A's LoRA alone and the
    right half the run with B's alone, bit for bit; each differs from the other concept's run on its side."""
    m = pixel_model
    ca, cb, u = _conds()
    la, lb = _lora(m.unet, 1), _lora(m.unet, 2)
    left, right = box_mask((0, 0, 0.5, 1), 16, 16), box_mask((0.5, 0, 1, 1), 16, 16)
    out = sample_regions(m, [Region(ca, left, lambda: tuned(m, lora=la)), Region(cb, right, lambda: tuned(m, lora=lb))],
                         u, seed=3, steps=1, guidance=3.0)
    with tuned(m, lora=la):
        only_a = sample(m, ca, u, seed=3, steps=1, guidance=3.0)
    with tuned(m, lora=lb):
        only_b = sample(m, cb, u, seed=3, steps=1, guidance=3.0)
    assert torch.equal(out[..., :8], only_a[..., :8]) and torch.equal(out[..., 8:], only_b[..., 8:])
    assert not torch.equal(out[..., :8], only_b[..., :8]) and not torch.equal(out[..., 8:], only_a[..., 8:])


def test_instantbooth_concepts_composited_and_a_background_where_no_region_is(pixel_model):
    m = pixel_model
    ca, cb, u = _conds()
    ib = make_instantbooth(m.unet, 32, gate=0.8)
    hooks = InstantBoothHooks(m.unet, ib, torch.randn(10, 32), beta=1.0)
    hooks.remove()
    out = sample_regions(m, [Region(ca, box_mask((0, 0, 0.5, 1), 16, 16), hooks.attached)], u, background=cb,
                         seed=3, steps=1, guidance=3.0)
    with hooks.attached():
        with_concept = sample(m, ca, u, seed=3, steps=1, guidance=3.0)
    background = sample(m, cb, u, seed=3, steps=1, guidance=3.0)
    assert torch.equal(out[..., :8], with_concept[..., :8]) and torch.equal(out[..., 8:], background[..., 8:])
    assert not hooks._handles, "the concept's hooks are off outside its own prediction"
    with pytest.raises(ValueError, match="uncovered"):
        sample_regions(m, [Region(ca, box_mask((0, 0, 0.5, 1), 16, 16))], u, steps=1)


def test_sampling_at_a_non_square_size(pixel_model):
    _, _, u = _conds()
    out = sample(pixel_model, _conds()[0], u, steps=1, height=8, width=24)
    assert out.shape == (1, 3, 8, 24)


# ------------------------------------------------------------------------------------------------------------------
# the command line, on the toy world


@pytest.fixture(scope="module")
def two_subjects(tmp_path_factory):
    from boothkit.backend.imageio import save_png
    from boothkit.toyworld import domain

    root = tmp_path_factory.mktemp("subjects")
    heldout = domain.identities("heldout")
    for name, ident in (("cat", heldout[0]), ("robot", next(i for i in heldout if i.class_name == "robot"))):
        (root / name).mkdir()
        for i, s in enumerate(domain.identity_renders(ident, 2, 1)):
            save_png(s.image, root / name / f"{i}.png")
            save_png(s.mask.expand(3, -1, -1), root / name / f"{i}_mask.png")
    return root


@pytest.mark.parametrize("mode", ["composite", "residual"])
def test_generate_two_concepts_in_two_regions_writes_the_requested_size(tmp_path, two_subjects, mode):
    from boothkit.backend.imageio import save_png

    prompt = "a photo of a sks cat on grass at day" + (" with a zwx robot" if mode == "residual" else "")
    save_png(box_mask((0.5, 0, 1, 1), 16, 32).expand(3, -1, -1), tmp_path / "right.png")  # resampled to 32x64
    out = tmp_path / "two.png"
    assert generate(["--prompt", prompt, "--height", "32", "--width", "64", "--steps", "2", "--scale", "1",
                     "--regions-mode", mode, "--concept", f"images={two_subjects / 'cat'},box=0:0:0.5:1",
                     "--concept", f"images={two_subjects / 'robot'},identifier=zwx,mask={tmp_path / 'right.png'}",
                     "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (32, 64, 3)


@pytest.mark.parametrize("concepts,message", [
    (["images={d}/cat", "images={d}/robot,identifier=sks"], None),  # the file's sks and an explicit sks
    (["images={d}/cat,identifier=zwx", "images={d}/robot,identifier=zwx"], "identifier 'zwx' is given to two"),
    (["images={d}/cat,box=0:0:1.5:1"], "within [0, 1]"),
    (["images={d}/cat,box=0:0:1"], "four numbers"),
    (["images={d}/nothing"], "no such file"),
    (["images={d}/cat,mask={d}/none.png"], "no such mask"),
    (["photos={d}/cat"], "KIND one of images, quicktune, e4t"),
    (["images={d}/cat,colour=red"], "unknown setting 'colour'"),
])
def test_generate_refuses_bad_concept_specs(two_subjects, concepts, message, capsys, tmp_path):
    argv = ["--prompt", "a photo of a cat", "--out", str(tmp_path / "x.png")]
    for c in concepts:
        argv += ["--concept", c.format(d=two_subjects)]
    if message is None:  # found once the files are read: one line from the command, exit 2 there (cli.py)
        with pytest.raises(ValueError, match="bound to the identifier 'sks'"):
            generate(argv + ["--steps", "1"])
        return
    with pytest.raises(SystemExit) as e:
        generate(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("extra,message", [
    (["--images", "x"], "does not go with --images"),
    (["--regions-mode", "residual", "--concept", "e4t={d}/cat"], "residual limits InstantBooth"),
])
def test_generate_refuses_concepts_with_options_that_do_not_go_together(two_subjects, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        generate(["--prompt", "a cat", "--concept", f"images={two_subjects}/cat"]
                 + [x.format(d=two_subjects) for x in extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_eval_pairs_scores_one_pair_in_one_context(tmp_path):
    from boothkit.commands.eval import main as evaluate

    out = tmp_path / "pairs"
    assert evaluate(["--pairs", "--subjects", "2", "--contexts", "1", "--samples", "1", "--steps", "2",
                     "--threads", "1", "--methods", "base", "instantbooth", "instantbooth-residual", "e4t-0",
                     "--out", str(out)]) == 0
    table = json.loads((out / "pairs.json").read_text())
    assert list(table["methods"]) == ["base", "instantbooth", "instantbooth-residual", "e4t-0"]
    for name, row in table["methods"].items():
        assert row["swap_margin"] == pytest.approx(row["own"] - row["other"])
        assert {"own", "other", "context", "context_vs_base", "mode"} <= set(row), name
    assert table["methods"]["instantbooth-residual"]["mode"] == "residual"
    assert table["settings"]["canvas"] == [32, 64] and len(table["settings"]["pairs"]) == 1
    assert (out / "pairs.md").exists() and Image.open(out / "pairs.png").size == (5 * 64, 32)
    with pytest.raises(ValueError, match="only InstantBooth"):
        evaluate(["--pairs", "--subjects", "2", "--methods", "quicktune-residual", "--out", str(tmp_path / "q")])


@pytest.mark.slow
def test_generate_composites_two_tuned_concepts_from_their_files(tmp_path, two_subjects):
    """A quick-tune pair (embedding + LoRA beside) and an E4T concept, as `boothkit tune` writes them, each in its
    half; the same E4T concept over the whole image is `--e4t-concept`'s image, bit for bit."""
    from boothkit.commands.tune import main as tune

    assert tune(["--images", str(two_subjects / "robot"), "--class-noun", "robot", "--stage1-steps", "1",
                 "--stage2-steps", "1", "--out", str(tmp_path), "--name", "rob", "--threads", "1"]) == 0
    assert tune(["--method", "e4t", "--image", str(two_subjects / "cat" / "0.png"), "--class-noun", "cat",
                 "--steps", "1", "--out", str(tmp_path), "--threads", "1"]) == 0
    e4t, qt = tmp_path / "sks_e4t.safetensors", tmp_path / "rob.safetensors"
    common = ["--prompt", "a photo of a sks cat on grass at day", "--steps", "2", "--scale", "1", "--threads", "1"]
    assert generate(common + ["--height", "32", "--width", "64", "--concept", f"e4t={e4t},box=0:0:0.5:1",
                              "--concept", f"quicktune={qt},identifier=zwx,box=0.5:0:1:1,prompt=a photo of a robot, "
                              "on grass at day", "--out", str(tmp_path / "two.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "two.png")).shape == (32, 64, 3)
    generate(common + ["--concept", f"e4t={e4t}", "--out", str(tmp_path / "one.png")])
    generate(common + ["--e4t-concept", str(e4t), "--out", str(tmp_path / "single.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), np.asarray(Image.open(tmp_path / "single.png")))
