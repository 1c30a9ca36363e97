import pytest
import torch
from tiny_models import tiny_clip_text, tiny_clip_vision, tiny_tokenizer, tiny_unet

from boothkit.backend.instantbooth import InstantBooth, InstantBoothConfig, timestep_window
from boothkit.hosts.diffusers.instantbooth import (InstantBoothHooks, adapter_layout, condition_with_concept,
                                                   encode_images, encode_prompt)


def make_instantbooth(unet, ctx, family="toy", vision=(16, 24, 17), gate=0.0):
    cfg = InstantBoothConfig(vision_global_dim=vision[0], vision_token_dim=vision[1], tokens_per_image=vision[2],
                             ctx_dim=ctx, layout=adapter_layout(unet), family=family, image_size=32)
    ib = InstantBooth(cfg).eval()
    with torch.no_grad():
        for a in ib.adapters:
            a.gate.fill_(gate)
    return ib


def run(unet, ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(2, 77, ctx, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample


def test_layout_read_from_unet():
    unet = tiny_unet(depth=2)
    lay = adapter_layout(unet)
    # CrossAttnDown(8ch) has 1 transformer of depth 2; mid (16ch) 1; CrossAttnUp (8ch) has 2 (layers_per_block + 1)
    assert lay.depths == [2, 2, 2, 2] and lay.dims == [8, 8, 16, 16, 8, 8, 8, 8]
    assert lay.levels == [0, 0, 1, 1, 0, 0, 0, 0] and lay.heads == [2] * 8


@pytest.mark.parametrize("family,ctx", [("sd1", 768), ("sd2", 1024), ("sdxl", 2048)])
def test_gate_zero_and_beta_zero_are_bit_identical_and_removal_restores(family, ctx):
    unet = tiny_unet(cross_attention_dim=ctx)
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    base = run(unet, ctx)
    f_p = torch.randn(34, ctx)
    with InstantBoothHooks(unet, make_instantbooth(unet, ctx, family, gate=0.0), f_p, beta=1.0):
        assert torch.equal(run(unet, ctx), base), "γ=0 must give the unpatched output exactly"
    ib = make_instantbooth(unet, ctx, family, gate=0.8)
    with InstantBoothHooks(unet, ib, f_p, beta=0.0):
        assert torch.equal(run(unet, ctx), base), "β=0 must give the unpatched output exactly"
    with InstantBoothHooks(unet, ib, f_p, beta=0.3):
        patched = run(unet, ctx)
    assert not torch.allclose(patched, base, atol=1e-4), "an active adapter changes the output"
    assert torch.equal(run(unet, ctx), base), "removing the hooks restores the exact output"
    for k, v in unet.state_dict().items():
        assert torch.equal(v, state_before[k]), f"base weight {k} changed"


def test_adapter_sees_the_residual_stream_after_self_attention():
    """The hook result equals running the block by hand with y += adapter residual between attn1 and attn2."""
    unet = tiny_unet()
    ib = make_instantbooth(unet, 32, gate=0.5)
    f_p = torch.randn(10, 32)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    h, ctx = torch.randn(2, 64, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        y = block.attn1(block.norm1(h)) + h
        y = y + ib.adapters[0].residual(y, f_p[None], beta=0.7)
        y = block.attn2(block.norm2(y), encoder_hidden_states=ctx) + y
        expected = block.ff(block.norm3(y)) + y
        with InstantBoothHooks(unet, ib, f_p, beta=0.7):
            got = block(h, encoder_hidden_states=ctx)
    assert torch.allclose(got, expected, atol=1e-6)


def test_skipping_levels_changes_only_those_blocks():
    unet = tiny_unet()
    ib = make_instantbooth(unet, 32, gate=0.8)
    f_p = torch.randn(10, 32)
    lay = ib.config.layout
    base = run(unet, 32)
    with InstantBoothHooks(unet, ib, f_p, 0.5, enabled=lay.select(skip_levels=[0, 1])):
        assert torch.equal(run(unet, 32), base), "all levels skipped = no adapter"
    with InstantBoothHooks(unet, ib, f_p, 0.5, enabled=lay.select(skip_levels=[0])) as hooks:
        assert not torch.equal(run(unet, 32), base)
        assert [kv is not None for kv in hooks.kv] == [False, True, False, False], "only level 1 keeps its adapter"


def test_the_adapters_act_only_inside_their_timestep_window():
    """start/end percent as ComfyUI counts them (progress p = timestep (1 - p)(T - 1)): outside the window the UNet's
    output is the plain one bit for bit, inside it the output of hooks without a window."""
    assert timestep_window(0.0, 1.0, 1000) is None, "the whole of sampling needs no window"
    assert timestep_window(0.2, 1.0, 1000) == pytest.approx((0.0, 799.2))
    assert timestep_window(0.25, 0.5, 1001) == pytest.approx((500.0, 750.0))
    lo, hi = timestep_window(1.0, 1.0, 1000)
    assert not any(lo <= t <= hi for t in range(1000)), "start = end: the adapters never act"
    with pytest.raises(ValueError, match="start_percent 0.6 and end_percent 0.4"):
        timestep_window(0.6, 0.4, 1000)
    unet = tiny_unet()
    ib = make_instantbooth(unet, 32, gate=0.8)
    f_p = torch.randn(10, 32)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)

    def at(t):
        with torch.no_grad():
            return unet(x, torch.tensor(t), encoder_hidden_states=cond).sample

    window = timestep_window(0.2, 1.0, 1000)
    for t in (900, 800, 799, 10):
        with InstantBoothHooks(unet, ib, f_p, 1.0):
            everywhere = at(t)
        with InstantBoothHooks(unet, ib, f_p, 1.0, window=window):
            windowed = at(t)
        if t > 799.2:
            assert torch.equal(windowed, at(t)), f"t={t}: before the window the adapters add nothing"
            assert not torch.equal(everywhere, at(t))
        else:
            assert torch.equal(windowed, everywhere), f"t={t}: inside the window the adapters act as without one"


def test_mismatched_file_is_rejected():
    ib = make_instantbooth(tiny_unet(depth=2), 32)
    with pytest.raises(ValueError, match="do not match the InstantBooth file"):
        InstantBoothHooks(tiny_unet(depth=1), ib, torch.randn(4, 32), 0.3)


def test_concept_from_images_into_the_encoded_prompt(tmp_path):
    unet = tiny_unet()
    vision = tiny_clip_vision()
    ib = make_instantbooth(unet, 32, vision=(16, 24, 17))
    images = torch.rand(3, 3, 48, 48)
    masks = torch.zeros(3, 1, 48, 48)
    masks[:, :, 10:30, 12:40] = 1
    g, t, _ = encode_images(vision, images, masks, ib)
    assert g.shape == (3, 16) and t.shape == (3, 17, 24)
    concept = ib.encode(g, t, class_noun="cat")
    assert concept.f_p.shape == (51, 32)

    tok = tiny_tokenizer(tmp_path)
    te = tiny_clip_text(hidden=32, vocab=len(tok.get_vocab()))
    prompt = "a photo of sks cat on grass"
    cond = encode_prompt(te, tok, prompt)
    out = condition_with_concept(cond, tok, prompt, concept, alpha=0.4)
    row = tok(prompt).input_ids.index(tok.convert_tokens_to_ids("sks</w>"))
    assert torch.allclose(out[0, row], 0.4 * concept.f_c)
    others = [i for i in range(77) if i != row]
    assert torch.equal(out[0, others], cond[0, others])
    with pytest.raises(ValueError, match="does not contain the identifier 'sks'"):
        condition_with_concept(cond, tok, "a photo of a cat", concept, 0.4)
