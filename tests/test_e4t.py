import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_quicktune import assert_untouched, images, make_model, make_sdxl, snapshot
from test_train_instantbooth import write_dataset
from tiny_models import tiny_clip_vision, tiny_sd_folder, training_world, write_config

from boothkit.backend.e4t import E4T, E4TConfig, DomainEncoder, WeightOffsets, attention_targets, fix_scales
from boothkit.backend.embedding import load_embedding
from boothkit.backend.files import FormatError, NonFiniteError, read_safetensors, write_safetensors
from boothkit.backend.e4t import load_e4t, save_e4t
from boothkit.hosts.diffusers import e4t as de
from boothkit.hosts.diffusers import common

pytestmark = pytest.mark.usefixtures("one_thread")

SD15_UNET = [320, 640, 1280, 1280, 1280]


@pytest.mark.parametrize("word_dims,vision_dim", [([768], 1024), ([1024], 1280), ([768, 1280], 1280)],
                         ids=["sd1", "sd2", "sdxl"])
def test_encoder_shapes_at_sd_widths_and_zero_start(word_dims, vision_dim):
    c = E4TConfig(family="sd1", word_dims=word_dims, vision_dim=vision_dim, vision_layers=[6, 12, 18, 24],
                  unet_dims=SD15_UNET, targets=[], target_shapes=[], hidden=64)
    enc = DomainEncoder(c)
    out = enc(torch.randn(2, 4, vision_dim), [torch.randn(2, d) for d in SD15_UNET])
    assert [tuple(o.shape) for o in out] == [(2, w) for w in word_dims]
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out), "an untrained encoder predicts the class word"
    with pytest.raises(ValueError, match="denoiser features"):
        enc(torch.randn(2, 4, vision_dim), [torch.randn(2, 320)])


def test_offsets_are_w_times_one_plus_delta_and_exact_at_zero():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    c = E4TConfig(family="toy", word_dims=[4], vision_dim=4, vision_layers=[1], unet_dims=[4], targets=["lin"],
                  target_shapes=[[5, 6]], rank=2)
    off = WeightOffsets(c)
    x = torch.randn(3, 6)
    base = lin(x)
    with off.applied({"lin": lin}):
        assert torch.equal(lin(x), base), "Δ = 0 must be the untouched layer, bit for bit"
    with torch.no_grad():
        off.offsets[0].up.normal_()
    delta = off.offsets[0].delta()
    with off.applied({"lin": lin}):
        y = lin(x)
    torch.testing.assert_close(y, F.linear(x, lin.weight * (1 + delta), lin.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, base)
    assert torch.equal(lin(x), base), "removed on exit"
    assert "forward" not in vars(lin) and len(lin._forward_hooks) == 0
    with off.applied({"lin": lin}):
        with off.bypassed():
            assert torch.equal(lin(x), base), "bypassed: the layer's own forward"
        torch.testing.assert_close(lin(x), y, rtol=0, atol=0)
    # a forward another tool put on the instance (accelerate's offload hooks do) is what remains afterwards
    lin.forward = lambda t: torch.zeros(3, 5)
    with off.applied({"lin": lin}):
        torch.testing.assert_close(lin(x), y, rtol=0, atol=0)
    assert torch.equal(lin(x), torch.zeros(3, 5))
    del lin.forward
    # removal is last-in, first-out: offsets under another set of offsets are not silently left applied
    under, over = off.attach({"lin": lin})[0], WeightOffsets(c).attach({"lin": lin})[0]
    with pytest.raises(RuntimeError, match="remove it first"):
        under.remove()
    over.remove()
    torch.testing.assert_close(lin(x), y, rtol=0, atol=0)
    under.remove()
    under.remove()  # a second remove does nothing
    assert "forward" not in vars(lin) and torch.equal(lin(x), base)
    with pytest.raises(ValueError, match="no module for offsets"):
        with off.applied({}):
            pass
    diffs = off.weight_diffs({"lin": lin.weight})
    torch.testing.assert_close(lin.weight + diffs["lin"], lin.weight * (1 + delta))


def test_offsets_read_the_weight_the_host_computes_per_call():
    """A host whose layers compute their weight in the forward (ComfyUI low-VRAM: a LoRA loaded before is applied per
    call, not stored) hands ``weight_of``: the offsets then scale that weight, and nothing is captured at attach."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    patch = torch.randn(5, 6)
    c = E4TConfig(family="toy", word_dims=[4], vision_dim=4, vision_layers=[1], unet_dims=[4], targets=["lin"],
                  target_shapes=[[5, 6]], rank=2)
    off = WeightOffsets(c)
    calls = []

    def weight_of(module, x):
        calls.append(module)
        return module.weight + patch, module.bias

    off.weight_of = weight_of
    x = torch.randn(3, 6)
    with off.applied({"lin": lin}), torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight + patch, lin.bias), rtol=0, atol=0)
        off.offsets[0].up.normal_()
        delta = off.offsets[0].delta()
        torch.testing.assert_close(lin(x), F.linear(x, (lin.weight + patch) * (1 + delta), lin.bias))
    assert calls == [lin, lin]
    assert "forward" not in vars(lin)


def test_comfyui_layer_weight_of_a_plain_layer_is_trainable(tmp_path):
    """A layer that is not one of ComfyUI's cast layers hands its own weight to the offsets, copied when it is an
    inference tensor (as ComfyUI loads them), so that the tune's backward pass can save it."""
    from comfy_stubs import stubbed_comfy

    with stubbed_comfy(tmp_path):
        from boothkit.hosts.comfy.e4t import layer_weight
    with torch.inference_mode():
        lin = torch.nn.Linear(6, 5)
    c = E4TConfig(family="toy", word_dims=[4], vision_dim=4, vision_layers=[1], unet_dims=[4], targets=["lin"],
                  target_shapes=[[5, 6]], rank=2)
    off = WeightOffsets(c)
    off.weight_of = layer_weight
    x = torch.randn(3, 6)
    with off.applied({"lin": lin}):
        y = lin(x)
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=0, atol=0)
        y.sum().backward()
    assert off.offsets[0].up.grad is not None


def test_modulation_starts_at_zero_and_a_concept_folds_into_the_weight_diffs():
    """The encoder's output-channel scales s are 0 untrained (the base layer bit for bit), scale each item's outputs
    while an objective runs, and once fixed to a concept's photo are part of W ∘ Δ: the weight-diff file is exact."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    c = E4TConfig(family="toy", word_dims=[4], vision_dim=4, vision_layers=[1], unet_dims=[4], targets=["lin"],
                  target_shapes=[[5, 6]], rank=2, hidden=8, modulation_rank=3)
    e4t = E4T(c)
    tokens = torch.randn(2, 1, 4)
    x = torch.randn(2, 7, 6)
    scales = e4t.encoder.scales(tokens)
    assert [list(s.shape) for s in scales] == [[2, 5]] and not any(s.any() for s in scales)
    with e4t.offsets.applied({"lin": lin}), e4t.offsets.scaled(scales):
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias)), "s = 0 and Δ = 0: the untouched layer"
    with torch.no_grad():
        for p in e4t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    scales = e4t.encoder.scales(tokens)
    assert not torch.allclose(scales[0][0], scales[0][1]), "a scale per photo"
    delta = e4t.offsets.offsets[0].delta()
    with torch.no_grad(), e4t.offsets.applied({"lin": lin}), e4t.offsets.scaled(scales):
        y = lin(x)
    expected = (1 + scales[0][:, None]) * F.linear(x, lin.weight * (1 + delta)) + lin.bias
    torch.testing.assert_close(y, expected)
    fix_scales(e4t, tokens[1:])
    with torch.no_grad(), e4t.offsets.applied({"lin": lin}):
        y1 = lin(x)
        diff = e4t.offsets.weight_diffs({"lin": lin.weight})["lin"]
    torch.testing.assert_close(y1[1], expected[1])
    torch.testing.assert_close(y1, F.linear(x, lin.weight + diff, lin.bias))
    assert E4T(E4TConfig(**{**vars(c), "modulation_rank": 0})).encoder.scales(tokens) is None


def test_an_e4t_copies_with_an_objectives_scales_set():
    """An objective leaves its scales (tensors of its graph) set until the next one: a copy taken then holds them
    detached, with the same values, and the original keeps its own."""
    c = E4TConfig(family="toy", word_dims=[4], vision_dim=4, vision_layers=[1], unet_dims=[4], targets=["lin"],
                  target_shapes=[[5, 6]], rank=2, hidden=8, modulation_rank=3)
    e4t = E4T(c)
    with torch.no_grad():
        e4t.encoder.modulation[-1].weight.normal_()
    e4t.offsets.scales = e4t.encoder.scales(torch.randn(2, 1, 4))
    assert e4t.offsets.scales[0].grad_fn is not None
    twin = copy.deepcopy(e4t)
    assert twin.offsets.scales[0].grad_fn is None and e4t.offsets.scales[0].grad_fn is not None
    torch.testing.assert_close(twin.offsets.scales[0], e4t.offsets.scales[0].detach())
    assert twin.offsets.scales[0].data_ptr() != e4t.offsets.scales[0].data_ptr()


def toy_setup(tmp_path, model=None, **overrides):
    model = model or make_model(tmp_path)
    vision = tiny_clip_vision()
    config = de.new_config(model, vision, "cat", "sks", hidden=16, **overrides)
    return model, vision, E4T(config)


def test_config_covers_every_linear_of_the_transformer_blocks(tmp_path):
    model, vision, e4t = toy_setup(tmp_path)
    c = e4t.config
    modules = dict(model.unet.named_modules())
    attn = [n for n in modules if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    ff = [n for n in modules if n.endswith((".ff.net.0.proj", ".ff.net.2"))]
    assert attn and ff and attention_targets(c.targets) == attn  # every attention projection, in module order
    assert set(ff) <= set(c.targets) and c.targets == [n for n in modules if n in set(c.targets)]
    assert all(isinstance(modules[n], torch.nn.Linear) and ".attentions." in n for n in c.targets)
    # the Linear layers outside the transformer blocks (time embedding, resnets' time projections) keep no offsets
    outside = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and ".attentions." not in n]
    assert outside and not set(outside) & set(c.targets)
    assert all(list(modules[n].weight.shape) == s for n, s in zip(c.targets, c.target_shapes))
    assert c.unet_dims == list(model.unet.config.block_out_channels) + [model.unet.config.block_out_channels[-1]]
    assert c.word_dims == [32] and c.vision_layers == [1, 2]


def test_untrained_e4t_is_exactly_the_class_word_prompt(tmp_path):
    """Prediction 0 and Δ = 0: the identifier's embedding is the class word's and the denoiser is untouched."""
    model, vision, e4t = toy_setup(tmp_path)
    host = de.E4THost(model, e4t, ["a photo of sks cat"])
    x = torch.randn(1, 3, 16, 16)
    t = torch.tensor([30])
    cv = de.class_vectors(model, "cat")
    feats = host.features(x, t, host.encode([v[None, None] for v in cv], torch.tensor([0])))
    assert [f.shape[-1] for f in feats] == e4t.config.unet_dims
    pred = e4t.encoder(torch.randn(1, 2, 24), feats)
    cond = host.encode(e4t.vectors([v[None] for v in cv], pred), torch.tensor([0]))
    with e4t.offsets.applied(host.modules):
        out = host.predict(x, t, cond)
    plain = common.encode_prompt(model, "a photo of cat cat")
    assert torch.equal(cond, plain)
    assert torch.equal(out, model.unet(x, t, encoder_hidden_states=plain).sample)


@pytest.mark.parametrize("modulation_rank", [0, 2])
def test_tune_leaves_the_model_untouched_and_files_round_trip(tmp_path, modulation_rank):
    model, vision, e4t = toy_setup(tmp_path, modulation_rank=modulation_rank)
    snap = snapshot(model)
    vision_state = {k: v.clone() for k, v in vision.state_dict().items()}
    pre = {k: v.clone() for k, v in e4t.state_dict().items()}
    img = images(1)[0]
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    seen = []
    concept = de.e4t_tune(model, vision, e4t, img, mask, "cat", steps=3, lr=1e-2,
                          on_progress=lambda d, n, loss: seen.append(d))
    assert concept.result.ok and concept.result.steps == 3 and seen == [1, 2, 3]
    assert_untouched(model, snap)
    assert all(torch.equal(v, vision_state[k]) for k, v in vision.state_dict().items())
    assert all(torch.equal(v, pre[k]) for k, v in e4t.state_dict().items()), "the pre-trained E4T is not tuned"
    tuned = concept.e4t.state_dict()
    assert any(not torch.equal(tuned[k], pre[k]) for k in pre if ".up" in k), "the offsets were tuned"
    assert concept.embedding.vectors["emb_params"].shape == (1, 32)

    paths = concept.save(model, tmp_path / "out", "my cat", stock=True, stock_dtype=None)
    assert sorted(paths) == ["e4t", "embedding", "lora"]
    emb = load_embedding(paths["embedding"], family="toy")
    torch.testing.assert_close(emb.vectors["emb_params"], concept.embedding.vectors["emb_params"])
    tensors, meta = read_safetensors(paths["lora"])
    assert meta["method"] == "e4t" and len(tensors) == len(e4t.config.targets)
    assert all(k.startswith("lora_unet_") and k.endswith(".diff") for k in tensors)
    # the diff file is the tuned offsets exactly: W + diff == W ∘ (1 + Δ)
    name = e4t.config.targets[0]
    w = model.unet.get_submodule(name).weight
    diff = tensors[f"lora_unet_{name.replace('.', '_')}.diff"]
    torch.testing.assert_close(w + diff, w * (1 + concept.e4t.offsets.deltas()[name].detach()))
    with pytest.raises(FileExistsError):
        concept.save(model, tmp_path / "out", "my cat")
    _check_compact_concept(model, concept, paths["e4t"], modulation_rank)

    # sampling with the concept: offsets only inside, the model itself unchanged after
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    cond = common.encode_prompt(model, "a photo of sks cat", concept.embedding)
    with concept.applied(model) as unet:
        with_offsets = unet(x, t, encoder_hidden_states=cond).sample
    assert not torch.equal(with_offsets, model.unet(x, t, encoder_hidden_states=cond).sample)
    assert_untouched(model, snap)
    # the diff file added to a copy of the denoiser samples as the concept does (the photo's scales are in the diffs)
    unet = copy.deepcopy(model.unet)
    with torch.no_grad():
        for n in e4t.config.targets:
            unet.get_submodule(n).weight += tensors[f"lora_unet_{n.replace('.', '_')}.diff"]
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=cond).sample, with_offsets, rtol=1e-4, atol=1e-5)
    scales = concept.e4t.offsets.scales
    assert (scales is None) == (modulation_rank == 0)
    assert modulation_rank == 0 or all(list(s.shape) == [w] for s, (w, _) in zip(scales, e4t.config.target_shapes))
    assert modulation_rank == 0 or any(float(s.abs().sum()) > 0 for s in scales), "the tune moved the scales"


def test_tune_gives_the_encoder_its_own_rate(tmp_path):
    """tune_encoder_lr: the encoder moves by about its own rate in a first Adam step, the offsets by the tune's."""
    model, vision, e4t = toy_setup(tmp_path)
    e4t.config.tune_encoder_lr = 1e-6
    concept = de.e4t_tune(model, vision, e4t, images(1)[0], steps=1, lr=1e-2)
    pre, post = e4t.state_dict(), concept.e4t.state_dict()
    moved = {k: float((post[k] - pre[k]).abs().max()) for k in pre}
    enc = [v for k, v in moved.items() if k.startswith("encoder.")]
    off = [v for k, v in moved.items() if k.startswith("offsets.")]
    assert max(enc) <= 1.5e-6 and max(enc) > 0, "the encoder moved at tune_encoder_lr"
    assert 0.5e-2 < max(off) <= 1.5e-2, "the offsets moved at the tune's rate"


def test_tune_flip_adds_the_mirror_image_and_each_step_draws_both(tmp_path, monkeypatch):
    import boothkit.backend.e4t as backend

    model, vision, e4t = toy_setup(tmp_path)
    e4t.config.tune_flip, e4t.config.tune_batch = True, 3
    img = images(1)[0]
    mask = torch.zeros(1, 16, 16)
    mask[:, 2:14, 2:8] = 1  # left of centre: its mirror is not itself
    drawn, real = [], backend.objective

    def spy(e4t, batch, *a, **kw):
        drawn.append((batch.x0.clone(), batch.masks.clone(), batch.class_tokens.clone()))
        return real(e4t, batch, *a, **kw)

    monkeypatch.setattr(backend, "objective", spy)
    de.e4t_tune(model, vision, e4t, img, mask, "cat", steps=2, lr=1e-2)
    (x0, m0, t0), (x1, m1, t1) = drawn
    assert x0.shape[0] == 3 and not torch.equal(x0[0], x0[1])
    torch.testing.assert_close(x0[1], x0[0].flip(-1))
    torch.testing.assert_close(m0[1], m0[0].flip(-1))
    assert torch.equal(x0[2], x0[0]) and torch.equal(t0[2], t0[0]) and not torch.equal(t0[0], t0[1])
    assert torch.equal(x1[0], x0[1]) and torch.equal(x1[1], x0[0]), "the next step starts from the next image"
    drawn.clear()
    e4t.config.tune_flip = False
    de.e4t_tune(model, vision, e4t, img, mask, "cat", steps=1, lr=1e-2)
    assert all(torch.equal(x, drawn[0][0][0]) for x in drawn[0][0]), "without tune_flip: the one image only"


def test_tune_max_timestep_keeps_the_draws_below_it(tmp_path, monkeypatch):
    import boothkit.backend.e4t as backend

    model, vision, e4t = toy_setup(tmp_path)
    n = de.schedule_of(model).num_timesteps
    seen, real = [], backend.objective

    def spy(e4t, batch, features, encode, predict, *a, **kw):
        assert kw["background"] is False, "the tune leaves reg_background out"

        def recording(x, t, cond):
            seen.append(t.clone())
            return predict(x, t, cond)
        return real(e4t, batch, features, encode, recording, *a, **kw)

    monkeypatch.setattr(backend, "objective", spy)
    e4t.config.tune_batch = 8
    e4t.config.tune_max_timestep = 0.1
    de.e4t_tune(model, vision, e4t, images(1)[0], steps=3, lr=1e-2)
    low = torch.cat(seen)
    assert low.numel() == 24 and int(low.max()) < round(0.1 * n)
    seen.clear()
    e4t.config.tune_max_timestep = 1.0
    de.e4t_tune(model, vision, e4t, images(1)[0], steps=3, lr=1e-2)
    assert int(torch.cat(seen).max()) >= round(0.1 * n), "the whole schedule by default"
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="tune_max_timestep"):
            E4TConfig(**{**e4t.config.__dict__, "tune_max_timestep": bad})


def test_tune_cross_kv_off_keeps_the_cross_attention_keys_and_values(tmp_path):
    model, vision, e4t = toy_setup(tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():  # a pre-trained state: Δ ≠ 0 everywhere
        for o in e4t.offsets.offsets:
            o.up.normal_(std=1e-2)
    e4t.config.tune_cross_kv = False
    concept = de.e4t_tune(model, vision, e4t, images(1)[0], steps=2, lr=1e-2)
    kv = [i for i, n in enumerate(e4t.config.targets) if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert kv and len(kv) < len(e4t.config.targets)
    for i, (pre, post) in enumerate(zip(e4t.offsets.offsets, concept.e4t.offsets.offsets)):
        same = torch.equal(pre.up, post.up) and torch.equal(pre.down, post.down)
        assert same == (i in kv), e4t.config.targets[i]
    # the kept offsets still apply: the saved weight diff holds them
    assert float(concept.e4t.offsets.deltas()[e4t.config.targets[kv[0]]].abs().sum()) > 0


def test_tune_targets_moves_only_the_matching_offsets(tmp_path):
    model, vision, e4t = toy_setup(tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():
        for o in e4t.offsets.offsets:
            o.up.normal_(std=1e-2)
    e4t.config.tune_targets = r"\.ff\."
    concept = de.e4t_tune(model, vision, e4t, images(1)[0], steps=2, lr=1e-2)
    ff = [i for i, n in enumerate(e4t.config.targets) if ".ff." in n]
    assert ff and len(ff) < len(e4t.config.targets)
    for i, (pre, post) in enumerate(zip(e4t.offsets.offsets, concept.e4t.offsets.offsets)):
        moved = not (torch.equal(pre.up, post.up) and torch.equal(pre.down, post.down))
        assert moved == (i in ff), e4t.config.targets[i]
    for bad, why in (("attn[", "not a regular expression"), ("no_such_layer", "matches none of the")):
        with pytest.raises(ValueError, match=re.escape(why)):
            E4TConfig(**{**e4t.config.__dict__, "tune_targets": bad})


def test_zero_steps_is_the_encoder_alone_and_cancel_stops(tmp_path):
    model, vision, e4t = toy_setup(tmp_path)
    img = images(1)[0]
    zero = de.e4t_tune(model, vision, e4t, img, steps=0)
    assert zero.result is None
    assert all(torch.equal(a, b) for a, b in zip(zero.e4t.state_dict().values(), e4t.state_dict().values()))
    calls = []
    cancelled = de.e4t_tune(model, vision, e4t, img, steps=10, should_cancel=lambda: len(calls) >= 2,
                            on_progress=lambda d, n, loss: calls.append(d))
    assert cancelled.result.status == "cancelled" and cancelled.result.steps == 2


def test_sdxl_predicts_both_embeddings(tmp_path):
    model = make_sdxl(tmp_path)
    model, vision, e4t = toy_setup(tmp_path, model)
    assert e4t.config.word_dims == [32, 48]
    concept = de.e4t_tune(model, vision, e4t, images(1)[0], steps=1, lr=1e-2)
    assert {k: tuple(v.shape) for k, v in concept.embedding.vectors.items()} == {"clip_l": (1, 32),
                                                                                 "clip_g": (1, 48)}


def test_file_round_trip_and_errors(tmp_path):
    model, vision, e4t = toy_setup(tmp_path)
    with torch.no_grad():
        for p in e4t.parameters():
            p.add_(torch.randn_like(p))
    path = save_e4t(tmp_path / "e.safetensors", e4t)
    back = load_e4t(path, family="toy")
    assert back.config == e4t.config
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), e4t.state_dict().values()))
    with pytest.raises(FormatError, match="pre-trained for base family 'toy'"):
        load_e4t(path, family="sd1")
    tensors, meta = read_safetensors(path)
    write_safetensors(tmp_path / "bad.safetensors", tensors, {**meta, "format": "boothkit.instantbooth"})
    with pytest.raises(FormatError, match="not an E4T file"):
        load_e4t(tmp_path / "bad.safetensors")
    tensors.pop(next(iter(tensors)))
    write_safetensors(tmp_path / "short.safetensors", tensors, meta)
    with pytest.raises(FormatError, match="missing"):
        load_e4t(tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match="one-token class word"):
        de.class_vectors(model, "photo cat")


def test_train_two_steps_writes_the_file_tune_loads(tmp_path, capsys):
    from boothkit.commands.train import main as train_main
    from boothkit.commands.tune import main as tune_main

    sd, vision, data, val = training_world(tmp_path, validation=2)
    cfg = write_config(tmp_path / "e4t.toml", sd, vision, data, val,
                       method=dict(category="cat", lr=1e-2, hidden=16, modulation_rank=2, sample_steps=2,
                                   validation_images=1),
                       train=dict(batch_size=2, steps=2, checkpoint_every=2))
    out = tmp_path / "run"
    assert train_main(["e4t", "--config", str(cfg), "--output-dir", str(out)]) == 0
    tensors, meta = read_safetensors(out / "e4t.safetensors")
    assert meta["format"] == "boothkit.e4t" and meta["family"] == "toy" and meta["class_word"] == "cat"
    assert all(k.startswith(("encoder.", "offsets.")) for k in tensors), "encoder and offsets only"
    assert any(k.startswith("encoder.modulation.") for k in tensors) and any(k.startswith("encoder.bases.")
                                                                             for k in tensors)
    assert json.loads(meta["training"])["config"]["train"]["steps"] == 2
    e4t = load_e4t(out / "e4t.safetensors", family="toy")
    assert any(float(o.up.detach().abs().sum()) > 0 for o in e4t.offsets.offsets), "the offsets were trained"
    assert e4t.config.modulation_rank == 2
    assert float(e4t.encoder.modulation[-1].weight.abs().sum()) > 0, "the photo's scales were trained"
    assert (out / "checkpoints" / "checkpoint-0000002.safetensors").exists()
    assert list((out / "samples").glob("*.png"))

    image = next(p for p in sorted(data.glob("*.png")) if not p.stem.endswith("_mask"))
    code = tune_main(["--method", "e4t", "--image", str(image), "--class-noun", "cat", "--out", str(tmp_path / "c"),
                      "--model", str(sd), "--e4t", str(out / "e4t.safetensors"), "--clip-vision",
                      str(tmp_path / "vision"), "--steps", "2", "--name", "kitty", "--stock-export"])
    assert code == 0
    assert (tmp_path / "c" / "kitty_e4t.safetensors").exists() and (tmp_path / "c" / "kitty.safetensors").exists()
    diffs, _ = read_safetensors(tmp_path / "c" / "kitty_lora.safetensors")
    assert {t.dtype for t in diffs.values()} == {torch.float16}, "the stock export is fp16"
    printed = capsys.readouterr().out
    assert f"--e4t-concept {tmp_path / 'c' / 'kitty_e4t.safetensors'}" in printed and "--model " + str(sd) in printed


@pytest.mark.parametrize("modulation_rank", [0, 2])
def test_gradient_checkpointing_gives_the_same_tune(tmp_path, modulation_rank):
    """The offsets and the photo's scales stay applied through the backward pass, which checkpointing's
    recomputation needs."""
    model, vision, e4t = toy_setup(tmp_path, modulation_rank=modulation_rank)
    if modulation_rank:
        with torch.no_grad():  # scales that are not zero from the first step
            e4t.encoder.modulation[-1].weight.normal_(std=0.5)
    img = images(1)[0]
    plain = de.e4t_tune(model, vision, e4t, img, steps=3, lr=1e-2)
    model.unet.enable_gradient_checkpointing()
    model.unet.train()
    try:
        ckpt = de.e4t_tune(model, vision, e4t, img, steps=3, lr=1e-2)
    finally:
        model.unet.disable_gradient_checkpointing()
        model.unet.eval()
    assert ckpt.result.ok
    torch.testing.assert_close(torch.tensor(ckpt.result.losses), torch.tensor(plain.result.losses))
    for a, b in zip(ckpt.e4t.parameters(), plain.e4t.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_tune_cli_on_the_toy_world_with_the_shipped_file(tmp_path, capsys):
    """`boothkit tune --method e4t --image FILE` with its defaults: the toy base and its shipped, verified E4T file."""
    from boothkit.backend.imageio import save_png
    from boothkit.toyworld import domain
    from boothkit.commands.tune import main as tune_main

    sample = domain.identity_renders(domain.identities("heldout")[0], 1, 0)[0]
    save_png(sample.image, tmp_path / "subject.png")
    save_png(sample.mask.expand(3, -1, -1), tmp_path / "subject_mask.png")
    assert tune_main(["--method", "e4t", "--image", str(tmp_path / "subject.png"), "--class-noun",
                      domain.CLASS_NOUNS[sample.identity.class_name][0], "--out", str(tmp_path / "out"),
                      "--steps", "2"]) == 0
    assert f"--e4t-concept {tmp_path / 'out' / 'sks_e4t.safetensors'}" in capsys.readouterr().out
    from boothkit.backend.e4t import load_e4t_concept

    concept = load_e4t_concept(tmp_path / "out" / "sks_e4t.safetensors", family="toy")
    assert concept.embedding.vectors["emb_params"].shape == (1, 64) and concept.identifier == "sks"
    assert not (tmp_path / "out" / "sks_lora.safetensors").exists(), "the stock export only when asked"


def test_validation_compares_with_the_base_model_on_the_same_draws(tmp_path):
    """Untrained, E4T's validation loss is the base model's exactly; once the offsets move, only E4T's changes, and
    the training offsets are back in place afterwards."""
    from boothkit.hosts.diffusers.loading import load_sd
    from boothkit.training.data import FolderDataset
    from boothkit.training.e4t import E4TSettings, E4TTraining

    sd = tiny_sd_folder(tmp_path / "sd", with_vae=False)
    ds = FolderDataset(write_dataset(tmp_path / "data", n=3), 32)
    method = E4TTraining(load_sd(sd), tiny_clip_vision(), ds, E4TSettings(category="cat", hidden=16), validation=ds)
    first = method.validate()
    assert first["denoising_loss"] == first["denoising_loss_base"] > 0
    assert first["identifier_shift"] == 0  # an untrained encoder predicts 0: the identifier is the class word
    with torch.no_grad():
        for o in method.e4t.offsets.offsets:
            o.up.normal_(std=0.5)
    second = method.validate()
    assert second["denoising_loss"] != first["denoising_loss"]
    assert second["denoising_loss_base"] == first["denoising_loss_base"]  # computed once, reused
    method._base_loss = None  # recomputed with the offsets moved: the training offsets must be off for it
    third = method.validate()
    assert third["denoising_loss_base"] == first["denoising_loss_base"]
    assert third == second, "offsets re-attached once, not stacked"
    with torch.no_grad():
        method.e4t.encoder.mlp[-1].bias.fill_(1.0)
    # every prediction is then all ones: |scale · 1| / |class word| per validation image, averaged
    width = method.e4t.config.word_dims[0]
    words = method.val_set["words"][:16]
    expected = sum(method.e4t.config.scale * width ** 0.5 / method._vectors(w)[0].norm().item() for w in words)
    assert method.validate()["identifier_shift"] == pytest.approx(expected / len(words), rel=1e-4)


def test_reg_background_holds_the_background_to_the_base_model(tmp_path):
    """The term is the squared difference off the mask between the model with the offsets and the base model: 0 for
    an untrained E4T, λ · that difference once the offsets move, gradients to the offsets only through it when the
    mask is empty; the offsets are back on afterwards."""
    from boothkit.backend import e4t as B

    model, vision, e4t = toy_setup(tmp_path)
    host = de.E4THost(model, e4t, ["a photo of sks cat"])
    x0 = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    cv = [v[None].repeat(2, 1) for v in de.class_vectors(model, "cat")]
    batch = B.Batch(x0, torch.randn(2, 2, 24), cv, torch.zeros(2, dtype=torch.long), mask)

    def loss(reg, b=batch, **kw):
        e4t.config.reg_background = reg
        return B.objective(e4t, b, host.features, host.encode, host.predict, host.schedule, host.modules,
                           torch.Generator().manual_seed(3), **kw)

    with e4t.offsets.applied(host.modules):
        assert torch.equal(loss(1.0), loss(0.0)), "an untrained E4T is the base model: nothing to hold"
        with torch.no_grad():
            for o in e4t.offsets.offsets:
                o.up.normal_(std=0.3)
        # the drift by hand, on the same draw as the objective's
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, host.schedule.num_timesteps, (2,), generator=g)
        x_t = host.schedule.add_noise(x0, noise, t)
        cond = host.encode([v.unsqueeze(1) for v in cv], batch.prompt_ids)
        with torch.no_grad():
            tuned = host.predict(x_t, t, cond)
            with e4t.offsets.bypassed():
                base = host.predict(x_t, t, cond)
        assert e4t.offsets.enabled and not torch.allclose(tuned, base)
        off = 1 - mask
        drift = ((tuned - base) ** 2 * off).sum() / (off.sum() * 3)
        assert drift > 0
        torch.testing.assert_close(loss(0.5) - loss(0.0), 0.5 * drift, rtol=1e-4, atol=1e-7)
        assert torch.equal(loss(1.0, background=False), loss(0.0)), "left out when asked (the tune)"
        # all of the image the subject's: no background, no term
        full = B.Batch(x0, batch.class_tokens, cv, batch.prompt_ids, torch.ones_like(mask))
        torch.testing.assert_close(loss(1.0, full), loss(0.0, full))
        # an empty mask: the denoising term is 0, the prediction 0, so the gradient is the drift's alone
        empty = B.Batch(x0, batch.class_tokens, cv, batch.prompt_ids, torch.zeros_like(mask))
        total = loss(1.0, empty)
        torch.testing.assert_close(total, ((tuned - base) ** 2).mean(), rtol=1e-4, atol=1e-7)
        total.backward()
    assert any(o.up.grad is not None and o.up.grad.abs().sum() > 0 for o in e4t.offsets.offsets)


def test_reg_background_needs_the_masked_loss(tmp_path):
    from boothkit.hosts.diffusers.loading import load_sd
    from boothkit.training.data import FolderDataset
    from boothkit.training.e4t import E4TSettings, E4TTraining

    sd = tiny_sd_folder(tmp_path / "sd", with_vae=False)
    ds = FolderDataset(write_dataset(tmp_path / "data", n=2), 32)
    with pytest.raises(ValueError, match="masked_loss"):
        E4TTraining(load_sd(sd), tiny_clip_vision(), ds, E4TSettings(category="cat", hidden=16, reg_background=1.0))
    method = E4TTraining(load_sd(sd), tiny_clip_vision(), ds,
                         E4TSettings(category="cat", hidden=16, reg_background=1.0, masked_loss=True))
    assert method.e4t.config.reg_background == 1.0  # written into the file with the rest of the config


def test_the_sd15_recipe_runs_on_tiny_models(tmp_path):
    """training/configs/e4t_sd15.toml is a runnable recipe: every key is a setting, and two steps run on tiny
    models with only its paths and sizes overridden; its method settings reach the file."""
    from pathlib import Path

    from boothkit.commands.train import main as train_main

    sd, _, data, val = training_world(tmp_path, validation=2)
    recipe = Path(__file__).parents[1] / "training" / "configs" / "e4t_sd15.toml"
    out = tmp_path / "run"
    sets = [f"model.base={sd}", f"model.clip_vision={tmp_path / 'vision'}", f"data.train={data}",
            f"data.validation={val}", "train.batch_size=2", "train.grad_accum=1", "train.checkpoint_every=2",
            "method.sample_steps=2", "method.validation_images=1"]
    argv = ["e4t", "--config", str(recipe), "--output-dir", str(out), "--steps", "2"]
    assert train_main(argv + [a for s in sets for a in ("--set", s)]) == 0
    e4t = load_e4t(out / "e4t.safetensors", family="toy")
    c = e4t.config
    assert (c.rank, c.scale, c.reg_embedding, c.reg_offsets, c.modulation_rank, c.tune_steps) == (1, 0.1, 0.01, 0.01,
                                                                                                  0, 15)
    assert c.class_word == "cat"
    settings = json.loads(read_safetensors(out / "e4t.safetensors")[1]["training"])["config"]["method"]
    assert settings["lr"] == 1.6e-5 and settings["gradient_checkpointing"] is True


def _check_compact_concept(model, concept, path, modulation_rank):
    """The compact file holds what sampling needs: loaded back, it samples exactly as the tuned concept does."""
    from boothkit.backend.e4t import E4T_CONCEPT_FORMAT

    tensors, meta = read_safetensors(path)
    assert meta["format"] == E4T_CONCEPT_FORMAT and meta["method"] == "e4t" and meta["family"] == "toy"
    assert meta["identifier"] == "sks" and meta["class_word"] == "cat" and json.loads(meta["widths"]) == {"emb_params": 32}
    assert json.loads(meta["targets"]) == concept.e4t.config.targets
    assert not any(k.startswith("encoder.") for k in tensors), "no encoder in the compact file"
    assert sum(k.startswith("scale.") for k in tensors) == (len(concept.e4t.config.targets) if modulation_rank else 0)
    loaded = de.load_concept(path, model)
    torch.testing.assert_close(loaded.embedding.vectors["emb_params"], concept.embedding.vectors["emb_params"],
                               rtol=0, atol=0)
    for name, d in concept.e4t.offsets.deltas().items():
        torch.testing.assert_close(loaded.offsets.deltas()[name], d.detach(), rtol=0, atol=0)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    cond = common.encode_prompt(model, "a photo of sks cat", loaded.embedding)
    with concept.applied(model) as unet:
        want = unet(x, t, encoder_hidden_states=cond).sample
    with de.offsets_applied(model, loaded.offsets) as unet:
        got = unet(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, model.unet(x, t, encoder_hidden_states=cond).sample)


def test_compact_concept_refuses_what_does_not_fit(tmp_path):
    from boothkit.backend.e4t import load_e4t_concept

    model, vision, e4t = toy_setup(tmp_path)
    concept = de.e4t_tune(model, vision, e4t, images(1)[0], None, "cat", steps=1)
    path = concept.save(model, tmp_path, "c")["e4t"]
    with pytest.raises(FormatError, match="'family' is 'toy', but the model is 'sd1'"):
        load_e4t_concept(path, family="sd1")
    with pytest.raises(FormatError, match="'widths' gives 'emb_params' 32 wide.*768"):
        load_e4t_concept(path, widths={"emb_params": 768})
    tensors, meta = read_safetensors(path)
    cases = {
        "format": ({**meta, "format": "boothkit.e4t"}, tensors, "'format' is 'boothkit.e4t', expected 'boothkit.e4t_concept'"),
        "version": ({**meta, "version": "9"}, tensors, "'version' is 9, expected <= 1"),
        "rank": ({**meta, "rank": "2"}, tensors, r"has shape .*implies"),
        "missing": (meta, {k: v for k, v in tensors.items() if not k.startswith("embedding.")}, "missing \\['embedding.emb_params'\\]"),
        "nan": (meta, {**tensors, "embedding.emb_params": torch.full_like(tensors["embedding.emb_params"], float("nan"))}, "NaN"),
        "targets": ({**meta, "targets": "[]"}, tensors, "'targets' is '\\[\\]', expected a non-empty"),
    }
    for name, (m, t, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in t.items()}, str(bad), metadata=m)  # BoothKit's writer refuses NaN
        with pytest.raises(NonFiniteError if name == "nan" else FormatError, match=message):
            load_e4t_concept(bad)
    moved = {k.replace("offset.", "offset.nowhere.").replace("scale.", "scale.nowhere."): v for k, v in tensors.items()}
    other = write_safetensors(tmp_path / "other.safetensors", moved,
                              {**meta, "targets": json.dumps(["nowhere." + n for n in json.loads(meta["targets"])])})
    assert load_e4t_concept(other).offsets.names[0].startswith("nowhere.")  # a valid file ...
    with pytest.raises(FormatError, match="denoiser has no module 'nowhere.*another architecture"):
        de.load_concept(other, model)  # ... for another denoiser


def test_stock_export_weight_diffs_apply_as_the_concept_does(tmp_path):
    """`generate --embedding X --lora X_lora` (E4T's stock export, here at the model's fp32) gives the denoiser the
    concept's offsets: W + diff against W ∘ (1 + Δ), the same outputs up to rounding."""
    from boothkit.backend.e4t import load_weight_diff

    model, vision, e4t = toy_setup(tmp_path, modulation_rank=2)
    concept = de.e4t_tune(model, vision, e4t, images(1)[0], None, "cat", steps=2, lr=1e-2)
    paths = concept.save(model, tmp_path, "c", stock=True, stock_dtype=None)
    diffs, meta = load_weight_diff(paths["lora"], family="toy")
    assert meta["identifier"] == "sks" and len(diffs) == len(e4t.config.targets)
    with pytest.raises(FormatError, match="'family' is 'toy', but the model is 'sd1'"):
        load_weight_diff(paths["lora"], family="sd1")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 40])
    cond = common.encode_prompt(model, "a photo of sks cat", concept.embedding).expand(2, -1, -1)
    base = model.unet(x, t, encoder_hidden_states=cond).sample
    with concept.applied(model) as unet:
        want = unet(x, t, encoder_hidden_states=cond).sample
    with de.weight_diffs_applied(model, diffs) as unet:
        got = unet(x, t, encoder_hidden_states=cond).sample
    assert not torch.allclose(want, base, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.unet(x, t, encoder_hidden_states=cond).sample, base), "hooks removed on exit"
    with pytest.raises(ValueError, match="another base model"):
        with de.weight_diffs_applied(model, {"lora_unet_nowhere": next(iter(diffs.values()))}):
            pass
